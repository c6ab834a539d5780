"""The bench "node": a network namespace, a CNI config, a loopback registry with the images,
a cgroup parent, and the cleanup of all of it.

Everything network-facing lives in a namespace made here: the registry listens on that
namespace's loopback, both daemons run inside it (``nsenter --net``), the CNI bridge and the
pods hang off it. Nothing touches the machine's own network.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import secrets
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.monitor_memory import remove_cgroups
from tests.e2e.conftest import bridge_conflist
from tests.fixtures.daemon import CNI_PLUGIN_DIR
from tests.fixtures.netns import NetNS, entered
from tests.fixtures.oci import (
    Blob,
    Image,
    Layer,
    busybox_layer_builder,
    push_image,
)
from tests.fixtures.registry import Registry

CATATONIT = "/usr/bin/catatonit"
#: Debian packages the harness needs (binary -> package).
NEEDS = {
    "/usr/sbin/runc": "runc",
    "/usr/bin/containerd": "containerd",
    "/usr/bin/containerd-shim-runc-v2": "containerd",
    "/usr/bin/conmon": "conmon",
    "/usr/bin/docker-registry": "docker-registry",
    "/bin/busybox": "busybox-static",
    CATATONIT: "catatonit",
    "/usr/lib/cni/bridge": "containernetworking-plugins",
}


def ensure_packages() -> None:
    """apt-get install what is missing (Debian 12)."""
    missing = sorted({pkg for path, pkg in NEEDS.items() if not os.path.exists(path)})
    if not missing:
        return
    print(f"installing {' '.join(missing)}", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *missing],
                   check=True, env=env)


def _version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except OSError:
        return "missing"
    return (out.stdout or out.stderr).strip().splitlines()[0] if out.stdout or out.stderr else ""


def machine() -> dict[str, Any]:
    """What the numbers depend on (no host paths)."""
    cgroup = "v2" if os.path.exists("/sys/fs/cgroup/cgroup.controllers") else (
        "v1 hybrid" if os.path.isdir("/sys/fs/cgroup/unified") else "v1")
    return {
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "cgroup": cgroup,
        "python": platform.python_version(),
        "runc": _version(["runc", "--version"]),
        "containerd": _version(["containerd", "--version"]),
        "loadavg_at_start": os.getloadavg(),
    }


def random_layer(index: int, size: int, file_size: int = 1 << 20) -> Blob:
    """A gzip layer of ``size`` bytes in ``file_size`` files, ~7/8 random bytes each (so
    gzip shrinks it little, as real binaries and compressed assets)."""
    layer = Layer()
    layer.add_dir(f"data{index}")
    text = (b"moorage benchmark filler line\n" * ((file_size // 8) // 30 + 1))[: file_size // 8]
    for i in range(max(1, size // file_size)):
        layer.add_file(f"data{index}/f{i:05d}", os.urandom(file_size - len(text)) + text)
    return layer.build("gzip")


@dataclass
class Images:
    busybox: str = ""
    pause: str = ""
    big: str = ""
    big_layers: list[Blob] = field(default_factory=list)
    #: Small images of their own (busybox plus a small random layer each), for pulls and
    #: removals that a figure or the soak makes while other work runs.
    small: list[str] = field(default_factory=list)

    @property
    def big_bytes(self) -> int:
        return sum(b.size for b in self.big_layers)


@dataclass
class Node:
    """The shared environment of one bench run. ``close()`` removes everything."""

    #: The big image's size; 0 pushes none.
    big_mib: int = 300
    big_layer_count: int = 6
    small_images: int = 0
    base: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="cribench-")))
    ns: NetNS | None = None
    registry: Registry | None = None
    images: Images = field(default_factory=Images)
    cgroup_parent: str = field(default_factory=lambda: f"/cribench-{secrets.token_hex(4)}")
    _cleanups: list[Callable[[], None]] = field(default_factory=list)

    @property
    def ns_path(self) -> str:
        assert self.ns is not None
        return self.ns.path

    @property
    def cni_conf_dir(self) -> Path:
        return self.base / "net.d"

    @property
    def cni_bin_dir(self) -> Path:
        return CNI_PLUGIN_DIR

    @property
    def rootfs(self) -> Path:
        """A plain busybox root filesystem (for the ``runc run`` floor)."""
        return self.base / "floor-rootfs"

    def on_close(self, fn: Callable[[], None]) -> None:
        self._cleanups.append(fn)

    def setup(self) -> Node:
        self.ns = NetNS.create("crib")
        self.on_close(self.ns.delete)
        self.cni_conf_dir.mkdir()
        # One bridge network for every runtime (same bridge, same IPAM store and subnet).
        (self.cni_conf_dir / "10-bridge.conflist").write_text(
            json.dumps(bridge_conflist(self.base, name="cribench")))
        self.on_close(lambda: remove_cgroups(self.cgroup_parent))
        with entered(self.ns_path):
            self.registry = Registry(workdir=self.base / "registry").start()
            self.on_close(self.registry.stop)
            self._push_images()
        self._make_rootfs()
        return self

    def _push_images(self) -> None:
        assert self.registry is not None
        reg = self.registry
        push_image(reg, "bench/busybox", "1", Image.busybox())
        self.images.busybox = reg.ref("bench/busybox", "1")
        pause = Layer()
        pause.add_dir("usr").add_dir("usr/bin")
        pause.add_file("usr/bin/catatonit", Path(CATATONIT).read_bytes(), mode=0o755)
        push_image(reg, "bench/pause", "1",
                   Image(layers=[pause.build("gzip")], entrypoint=[CATATONIT, "-P"], cmd=None))
        self.images.pause = reg.ref("bench/pause", "1")
        for i in range(self.small_images):
            layers = [busybox_layer_builder().build("gzip"), random_layer(i, 256 << 10, 64 << 10)]
            push_image(reg, f"bench/small{i}", "1", Image(layers=layers))
            self.images.small.append(reg.ref(f"bench/small{i}", "1"))
        if not self.big_mib:
            return
        per_layer = (self.big_mib << 20) // self.big_layer_count
        layers = [busybox_layer_builder().build("gzip")]
        layers += [random_layer(i, per_layer) for i in range(self.big_layer_count)]
        push_image(reg, "bench/big", "1", Image(layers=layers))
        self.images.big = reg.ref("bench/big", "1")
        self.images.big_layers = layers

    def _make_rootfs(self) -> None:
        tar = busybox_layer_builder().tar_bytes()
        self.rootfs.mkdir()
        with tempfile.TemporaryFile() as f:
            f.write(tar)
            f.seek(0)
            with tarfile.open(fileobj=f) as t:
                t.extractall(self.rootfs, filter="tar")

    def write_blobs(self, directory: Path) -> list[tuple[Path, Blob]]:
        """The big image's layer blobs as files (for "unpack alone")."""
        directory.mkdir(parents=True, exist_ok=True)
        out = []
        for blob in self.images.big_layers:
            path = directory / blob.digest.split(":", 1)[1]
            path.write_bytes(blob.data)
            out.append((path, blob))
        return out

    def close(self) -> None:
        while self._cleanups:
            fn = self._cleanups.pop()
            try:
                fn()
            except Exception as e:  # keep cleaning
                print(f"cleanup: {e}", flush=True)
        unmount_under(self.base)
        shutil.rmtree(self.base, ignore_errors=True)


def mounts_under(base: Path) -> list[str]:
    prefix = str(base).rstrip("/") + "/"
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            target = line.split()[4].replace("\\040", " ")
            if target.startswith(prefix):
                found.append(target)
    return found


def unmount_under(base: Path) -> None:
    """Lazily unmount whatever a runtime left mounted under our temp dir (deepest first)."""
    for target in sorted(mounts_under(base), key=len, reverse=True):
        with contextlib.suppress(OSError):
            subprocess.run(["umount", "-l", target], capture_output=True, timeout=30)

