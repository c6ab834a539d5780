"""The node image of the VM lane: Debian 12 (systemd, D-Bus, the cloud kernel) made by
debootstrap, with everything the node needs pre-seeded, since the VM has no network.

- ``/srv/moorage-debs``: a local apt repository (flat, ``deb [trusted=yes] file:...``) of
  the packages ``deploy/install.sh`` installs, downloaded by the chroot's own apt. It is
  the image's only apt source: ``apt-get update`` and ``apt-get install`` in install.sh
  work offline as on a machine with a mirror.
- ``/srv/moorage-wheels``: the Python packages of ``requirements.lock``, downloaded on
  the host (install.sh's pip finds them through ``PIP_NO_INDEX``/``PIP_FIND_LINKS``).
- ``/opt/moorage-lane``: a venv with pytest and moorage's dependencies for the lane's
  tests; moorage itself comes from the project's source, mounted at ``/root/moorage``
  from a disk made at each run (so the image does not change with the source).
- ``moorage-lane.service`` runs ``tests/vm/guest.sh`` from that source after boot.

The host's apt sources name the Debian mirror; nothing here does. Stdlib only: this runs
before any virtualenv exists.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SUITE = "bookworm"
#: Bump to rebuild every cached image (a change of this file also does).
FORMAT = 1
#: The node itself: systemd as init, udev, D-Bus (the systemd cgroup driver talks to
#: systemd over it), the kernel and its initramfs, and kmod to load overlay, bridge,
#: veth and netfilter modules.
BASE_PACKAGES = ("systemd-sysv", "udev", "dbus", "kmod", "linux-image-cloud-amd64",
                 "initramfs-tools")
#: What the lane's tests use beside the node: crun (a second runtime handler), the
#: registry and busybox of tests/fixtures, python3-venv for the tests' venv.
LANE_PACKAGES = ("crun", "docker-registry", "busybox-static", "python3", "python3-venv")
#: Python packages of the lane's venv besides moorage's dependencies (which include what
#: tests/conftest.py imports).
LANE_PYTHON = ("pytest", "pytest-asyncio", "pytest-timeout")
LOCK = ROOT / "requirements.lock"
INSTALL_SH = ROOT / "deploy" / "install.sh"
GUEST_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8",
             "DEBIAN_FRONTEND": "noninteractive"}


def log(message: str) -> None:
    print(f"[lane] {message}", flush=True)


def run(*cmd: str | Path, env: dict[str, str] | None = None, quiet: bool = True) -> None:
    """Run a command; on failure, show its output and raise."""
    out = subprocess.run([str(c) for c in cmd], env=env, stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE if quiet else None,
                         stderr=subprocess.STDOUT if quiet else None, text=True)
    if out.returncode != 0:
        if out.stdout:
            sys.stdout.write(out.stdout[-6000:])
        raise RuntimeError(f"{shlex.join(str(c) for c in cmd)}: exit status {out.returncode}")


# -- inputs ---------------------------------------------------------------------------------


def debian_mirror() -> str:
    """The host's Debian mirror for the suite, from its apt sources (deb822 ``.sources``
    files, then ``sources.list`` lines)."""
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        for stanza in re.split(r"\n\s*\n", Path(path).read_text()):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line or line[:1].isspace():
                    continue
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.strip()
            if ("deb" in fields.get("types", "").split()
                    and SUITE in fields.get("suites", "").split()
                    and "main" in fields.get("components", "").split()
                    and fields.get("enabled", "yes") != "no" and fields.get("uris")):
                return fields["uris"].split()[0]
    for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            continue
        for line in text.splitlines():
            words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
            if len(words) >= 4 and words[0] == "deb" and words[2] == SUITE and "main" in words[3:]:
                return words[1]
    raise RuntimeError(f"the host's apt sources name no Debian {SUITE} mirror with 'main'")


def install_packages() -> list[str]:
    """The Debian packages ``deploy/install.sh`` installs (its ``apt-get install`` lines)."""
    text = INSTALL_SH.read_text().replace("\\\n", " ")
    names: list[str] = []
    for line in text.splitlines():
        words = line.split()
        if "apt-get" not in words or "install" not in words:
            continue
        for word in words[words.index("install") + 1:]:
            if word.startswith((">", "2>", "&", ";", "|")):
                break
            if not word.startswith("-") and re.fullmatch(r"[a-z0-9][a-z0-9+.-]+", word):
                names.append(word)
    if not names:
        raise RuntimeError(f"found no 'apt-get install' packages in {INSTALL_SH}")
    return names


def python_requirements() -> list[str]:
    """moorage's dependencies (pyproject) and the lane's test packages, as pip arguments."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {re.split(r"[<>=!~ ;\[]", r, maxsplit=1)[0].lower(): r
              for r in project["optional-dependencies"]["test"]}
    return [*project["dependencies"], *(wanted.get(p, p) for p in LANE_PYTHON)]


def cache_key() -> str:
    """What the image is made of: this file, the packages, the Python requirements."""
    h = hashlib.sha256()
    h.update(Path(__file__).read_bytes())
    h.update(f"{FORMAT}\n{install_packages()}\n{python_requirements()}\n".encode())
    h.update(LOCK.read_bytes())
    return h.hexdigest()[:20]


# -- the build ------------------------------------------------------------------------------


def _chroot(tree: Path, *cmd: str) -> None:
    run("chroot", tree, *cmd, env=GUEST_ENV)


def _seed_debs(tree: Path, packages: list[str]) -> int:
    """Download ``packages`` (and what they need beyond the base system) with the chroot's
    apt into a local repository, and make it the image's only apt source."""
    archives = tree / "var/cache/apt/archives"
    for deb in archives.glob("*.deb"):
        deb.unlink()  # debootstrap's own, already installed
    _chroot(tree, "apt-get", "update", "-qq")
    _chroot(tree, "apt-get", "install", "-y", "-qq", "--download-only", *packages)
    repo = tree / "srv/moorage-debs"
    repo.mkdir(parents=True)
    entries = []
    for deb in sorted(archives.glob("*.deb")):
        shutil.move(deb, repo / deb.name)
        control = subprocess.run(["dpkg-deb", "-f", str(repo / deb.name)], check=True,
                                 capture_output=True, text=True).stdout.rstrip("\n")
        data = (repo / deb.name).read_bytes()
        entries.append(f"{control}\nFilename: ./{deb.name}\nSize: {len(data)}\n"
                       f"SHA256: {hashlib.sha256(data).hexdigest()}\n")
    (repo / "Packages").write_text("\n".join(entries))
    (tree / "etc/apt/sources.list").write_text(
        "# The node lane's image has no network: install.sh's packages come from here.\n"
        "deb [trusted=yes] file:/srv/moorage-debs ./\n")
    for lists in (tree / "var/lib/apt/lists").glob("*"):
        if lists.is_file():
            lists.unlink()
    return len(entries)


def _seed_wheels(tree: Path, work: Path) -> int:
    """Download the lock's packages on the host (every one the daemon, the tests and the
    build install, hashes checked) into ``/srv/moorage-wheels``."""
    wheels = tree / "srv/moorage-wheels"
    venv = work / "pip-venv"
    run(sys.executable, "-m", "venv", venv)
    run(venv / "bin/pip", "download", "-q", "-d", wheels, "-r", LOCK)
    return len(list(wheels.iterdir()))


def _lane_venv(tree: Path) -> None:
    _chroot(tree, "python3", "-m", "venv", "/opt/moorage-lane")
    _chroot(tree, "/opt/moorage-lane/bin/pip", "install", "-q", "--no-index",
            "--find-links", "/srv/moorage-wheels", *python_requirements())
    site = next((tree / "opt/moorage-lane/lib").glob("python3*/site-packages"))
    # moorage itself: the source disk mounted at /root/moorage at each run.
    (site / "moorage-source.pth").write_text("/root/moorage/src\n")


LANE_UNIT = """\
[Unit]
Description=moorage node lane (tests/vm/guest.sh)
After=multi-user.target dev-hvc0.device
Requires=dev-hvc0.device
RequiresMountsFor=/root/moorage

[Service]
Type=oneshot
ExecStart=/bin/bash /root/moorage/tests/vm/guest.sh
StandardOutput=tty
StandardError=inherit
TTYPath=/dev/hvc0

[Install]
WantedBy=multi-user.target
"""


def _configure(tree: Path) -> None:
    etc = tree / "etc"
    (etc / "fstab").write_text("/dev/vda / ext4 rw,noatime 0 1\n"
                               "/dev/vdb /root/moorage ext4 rw,noatime 0 2\n")
    (etc / "hostname").write_text("moorage-node\n")
    (etc / "hosts").write_text("127.0.0.1 localhost\n127.0.1.1 moorage-node\n"
                               "::1 localhost ip6-localhost ip6-loopback\n")
    (tree / "root/moorage").mkdir(exist_ok=True)
    (etc / "systemd/system/moorage-lane.service").write_text(LANE_UNIT)
    wants = etc / "systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    (wants / "moorage-lane.service").symlink_to("/etc/systemd/system/moorage-lane.service")
    # No login prompts on the consoles: nobody logs in.
    for unit in ("serial-getty@ttyS0.service", "getty@tty1.service"):
        (etc / "systemd/system" / unit).symlink_to("/dev/null")
    (etc / "machine-id").write_text("")  # made at first boot
    # No fsync per file in dpkg (as Debian's build chroots): the VM's disk is thrown away.
    (etc / "dpkg/dpkg.cfg.d/moorage-lane").write_text("force-unsafe-io\n")


def build(dest: Path, work: Path) -> None:
    """Build the image into ``dest`` (``vmlinuz``, ``initrd.img``, ``disk.img``)."""
    mirror = debian_mirror()
    tree = work / "root"
    log(f"debootstrap {SUITE} (minbase) from {mirror}")
    run("debootstrap", "--variant=minbase",
        "--include=" + ",".join((*BASE_PACKAGES, *LANE_PACKAGES)), SUITE, tree, mirror)
    packages = install_packages()
    log(f"pre-seeding install.sh's packages: {' '.join(packages)}")
    debs = _seed_debs(tree, packages)
    wheels = _seed_wheels(tree, work)
    log(f"seeded {debs} .debs and {wheels} Python distributions; making the tests' venv")
    _lane_venv(tree)
    _configure(tree)
    for name, pattern in (("vmlinuz", "vmlinuz-*"), ("initrd.img", "initrd.img-*")):
        found = sorted((tree / "boot").glob(pattern))
        if not found:
            raise RuntimeError(f"debootstrap left no /boot/{pattern}")
        shutil.copyfile(found[-1], dest / name)
    disk = dest / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(6 << 30)  # sparse; the containers' images and layers live here too
    run("mkfs.ext4", "-q", "-F", "-L", "moorage-node", "-d", tree, disk)
    os.sync()
