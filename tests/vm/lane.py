"""The node lane's host side (``tests/vm/run.sh`` runs it as root).

1. The node image (``image.py``), cached under ``$MOORAGE_VM_CACHE`` (default
   ``/var/cache/moorage-vm``) by a hash of its inputs; other entries are removed, but the
   one used last.
2. A source disk: the work tree's files (tracked and untracked, not ignored) in an ext4
   image, mounted at ``/root/moorage`` in the VM, where ``deploy/install.sh`` and the tests
   run from.
3. qemu boots the kernel of the image with the image as root, read-only for the cache
   (``snapshot=on``), no network device. KVM where it boots, else TCG: some hosts have a
   ``/dev/kvm`` on which a Debian kernel never starts, so a kernel that prints nothing on
   the serial console within ``KVM_PROBE`` seconds means TCG.
4. The guest (``guest.sh``) writes its output to a virtio console (streamed here, kept
   apart from the kernel's serial console), and its results as a tar archive onto a third
   disk, read back here; then it powers the VM off.

Stdlib only. One VM at a time on this machine (a lock in the cache dir): TCG takes both
cores.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import image

ROOT = image.ROOT
CACHE = Path(os.environ.get("MOORAGE_VM_CACHE", "/var/cache/moorage-vm"))
#: Where the last run's results are kept: ``$MOORAGE_VM_RESULTS``, else ``<cache>/results``.
#: Seconds the VM may run (boot, install, tests) before it is killed.
TIMEOUT = float(os.environ.get("MOORAGE_VM_TIMEOUT", "1200"))
#: Seconds a kernel under KVM gets to print its banner.
KVM_PROBE = 10.0
RESULTS_SIZE = 64 << 20
log = image.log


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for {path} (another lane is building or running)")
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def node_image(work: Path) -> Path:
    """The cached image for the current inputs, built when missing."""
    key = image.cache_key()
    images = CACHE / "images"
    entry = images / key
    with locked(CACHE / "build.lock"):
        if (entry / "complete").exists():
            log(f"node image {key}: cached")
        else:
            began = time.monotonic()
            log(f"node image {key}: building")
            partial = images / f"{key}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            build_dir = work / "build"
            build_dir.mkdir()
            try:
                image.build(partial, build_dir)
            finally:
                shutil.rmtree(build_dir, ignore_errors=True)
            (partial / "complete").write_text(f"{time.time()}\n")
            partial.rename(entry)
            log(f"node image {key}: built in {time.monotonic() - began:.0f} s")
        (entry / "complete").touch()
        _clean_cache(images, keep=entry)
    return entry


def _clean_cache(images: Path, keep: Path) -> None:
    """Remove every entry but ``keep`` and the most recently used other one."""
    others = sorted((p for p in images.iterdir() if p != keep),
                    key=lambda p: (p / "complete").stat().st_mtime
                    if (p / "complete").exists() else 0, reverse=True)
    for old in others[1:] + [p for p in others[:1] if not (p / "complete").exists()]:
        log(f"removing old node image {old.name}")
        shutil.rmtree(old, ignore_errors=True)


def source_disk(work: Path) -> Path:
    """An ext4 image of the work tree's files (what git tracks or would, not ignored)."""
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], check=True, capture_output=True).stdout
    tree = work / "source"
    for name in sorted(set(listed.decode().split("\0")) - {""}):
        src = ROOT / name
        if not src.is_file():
            continue  # deleted in the work tree, not yet in git
        dst = tree / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst, follow_symlinks=False)
    disk = work / "source.img"
    with open(disk, "wb") as f:
        f.truncate(1 << 30)
    image.run("mkfs.ext4", "-q", "-F", "-L", "moorage-src", "-d", tree, disk)
    shutil.rmtree(tree)
    return disk


def qemu_command(entry: Path, source: Path, results: Path, work: Path, accel: str
                 ) -> list[str]:
    accel_args = (["-accel", "kvm", "-cpu", "qemu64"] if accel == "kvm"
                  else ["-accel", "tcg,thread=multi"])
    return [
        "qemu-system-x86_64", *accel_args, "-smp", "2", "-m", "3072",
        "-display", "none", "-no-reboot", "-nic", "none",
        "-kernel", str(entry / "vmlinuz"), "-initrd", str(entry / "initrd.img"),
        # 8 huge pages of 2 MiB, for the hugetlb limits; no "quiet": the banner is KVM's probe.
        "-append", "console=ttyS0 root=/dev/vda rw panic=-1 hugepages=8 "
                   "systemd.show_status=error",
        "-drive", f"file={entry / 'disk.img'},format=raw,if=virtio,snapshot=on,cache=unsafe",
        "-drive", f"file={source},format=raw,if=virtio,cache=unsafe",
        "-drive", f"file={results},format=raw,if=virtio,cache=unsafe",
        "-device", "virtio-rng-pci",
        "-serial", f"file:{work / 'console.log'}",
        "-device", "virtio-serial-pci",
        "-chardev", f"file,id=lane,path={work / 'lane.out'}",
        "-device", "virtconsole,chardev=lane",
    ]


class Follower:
    """Prints what a file gains, as it grows, each line after the seconds since ``began``."""

    def __init__(self, path: Path, began: float) -> None:
        self.path = path
        self.began = began
        self.offset = 0
        self.line_start = True

    def pump(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return
        if not data:
            return
        self.offset += len(data)
        stamp = f"[{time.monotonic() - self.began:4.0f}s] "
        for piece in data.decode(errors="replace").replace("\r\n", "\n").splitlines(True):
            sys.stdout.write((stamp if self.line_start else "") + piece)
            self.line_start = piece.endswith("\n")
        sys.stdout.flush()


def kvm_usable() -> bool:
    if os.environ.get("MOORAGE_VM_ACCEL") == "tcg":
        return False
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


def boot(entry: Path, source: Path, results: Path, work: Path) -> tuple[str, int | None]:
    """Run the VM to its end: (the accelerator used, qemu's exit status or None on
    timeout)."""
    accels = ["kvm", "tcg"] if kvm_usable() else ["tcg"]
    for accel in accels:
        for stale in ("console.log", "lane.out"):
            (work / stale).unlink(missing_ok=True)
        cmd = qemu_command(entry, source, results, work, accel)
        began = time.monotonic()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        log(f"booting the node ({accel}, qemu pid {proc.pid})")
        follow = Follower(work / "lane.out", began)
        probing = accel == "kvm"
        try:
            while proc.poll() is None:
                time.sleep(0.5)
                follow.pump()
                elapsed = time.monotonic() - began
                if probing:
                    if b"Linux version" in _read(work / "console.log"):
                        probing = False
                    elif elapsed > KVM_PROBE:
                        log(f"no kernel banner under KVM in {KVM_PROBE:.0f} s: using TCG")
                        break
                if elapsed > TIMEOUT:
                    log(f"the VM ran past {TIMEOUT:.0f} s: killing it")
                    return accel, None
            else:
                follow.pump()
                out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
                if out.strip():
                    log(f"qemu: {out.strip()}")
                return accel, proc.returncode
        finally:
            _stop(proc)
    raise AssertionError("unreachable")


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    if proc.stdout:
        proc.stdout.close()


def read_results(results: Path) -> dict[str, bytes]:
    try:
        with tarfile.open(results, "r:") as tar:
            return {m.name.removeprefix("./"): tar.extractfile(m).read()  # type: ignore[union-attr]
                    for m in tar.getmembers() if m.isfile()}
    except tarfile.ReadError:
        return {}


def main() -> int:
    began = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="moorage-vm-", dir="/var/tmp"))
    try:
        entry = node_image(work)
        built = time.monotonic()
        source = source_disk(work)
        results = work / "results.img"
        with open(results, "wb") as f:
            f.truncate(RESULTS_SIZE)
        with locked(CACHE / "vm.lock"):
            accel, code = boot(entry, source, results, work)
        got = read_results(results)
        keep = Path(os.environ.get("MOORAGE_VM_RESULTS", CACHE / "results"))
        shutil.rmtree(keep, ignore_errors=True)
        keep.mkdir(parents=True)
        for name, data in got.items():
            (keep / Path(name).name).write_bytes(data)
        if "status" not in got:
            log(f"the VM ended (qemu status {code}) without the lane's results; "
                "its serial console ended with:")
            tail = _read(work / "console.log").decode(errors="replace").splitlines()[-60:]
            print("\n".join(tail))
            return 1
        status = int(got["status"].decode().strip() or 1)
        if status != 0 and "moorage.journal" in got:
            log("the moorage service's journal ended with:")
            print("\n".join(got["moorage.journal"].decode(errors="replace").splitlines()[-80:]))
        end = time.monotonic()
        log(f"times: image {built - began:.0f} s, VM ({accel}) {end - built:.0f} s, "
            f"total {end - began:.0f} s")
        print("\n== node lane summary (from inside the VM) ==")
        sys.stdout.write(got.get("summary.txt", b"").decode(errors="replace"))
        print(f"== node lane: {'passed' if status == 0 else f'FAILED (status {status})'} "
              f"(JUnit files, logs and the service's journal in {keep}) ==")
        return status
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)
