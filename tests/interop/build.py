"""Builds the Go interop programs of this directory, offline, with Debian's Go,
spdystream and gorilla/websocket (``golang-go``, ``golang-github-docker-spdystream-dev``,
``golang-github-gorilla-websocket-dev``)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

HERE = Path(__file__).parent
GOPATH = Path("/usr/share/gocode")
SPDYSTREAM = GOPATH / "src/github.com/moby/spdystream"
GORILLA = GOPATH / "src/github.com/gorilla/websocket"
GO = shutil.which("go") or "/usr/lib/go/bin/go"


def missing() -> str | None:
    """Why the Go programs cannot be built here (None: they can)."""
    if not os.path.exists(GO):
        return "needs Go (Debian package golang-go)"
    if not SPDYSTREAM.is_dir():
        return "needs spdystream (Debian package golang-github-docker-spdystream-dev)"
    if not GORILLA.is_dir():
        return "needs gorilla/websocket (Debian package golang-github-gorilla-websocket-dev)"
    return None


def build(name: str, out_dir: Path) -> Path:
    """``tests/interop/<name>`` built as ``out_dir/<name>``."""
    out = out_dir / name
    env = {**os.environ, "GO111MODULE": "off", "GOPATH": str(GOPATH),
           "GOCACHE": str(out_dir / "gocache"), "CGO_ENABLED": "0", "GOPROXY": "off"}
    subprocess.run([GO, "build", "-o", str(out), "."], cwd=HERE / name, env=env, check=True,
                   capture_output=True, timeout=300)
    return out
