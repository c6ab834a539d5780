#!/usr/bin/env bash
# Builds the moorage kind node image and creates a one-node cluster with it.
# Needs docker and kind on the machine; run from anywhere.
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
name=${CLUSTER_NAME:-moorage}
docker build -f "$here/deploy/kind/Dockerfile" -t moorage-kind-node "$here"
kind create cluster --name "$name" --config "$here/deploy/kind/cluster.yaml" \
  --image moorage-kind-node
kubectl --context "kind-$name" get nodes -o wide
