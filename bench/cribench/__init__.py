"""The CRI benchmark harness: python -m bench.cri_bench (see bench/README.md)."""
