"""Shared pytest fixtures: real registries (Debian's docker-registry) on loopback.

Session-scoped: ``registry`` (anonymous HTTP), ``auth_registry`` (Basic, alice/secret),
``token_registry`` (Bearer tokens from our loopback token server; alice/secret, and
anonymous pull for repositories under ``public/``), ``tls_registry`` (HTTPS with a
test CA, anonymous), ``schema1_registry`` (anonymous, accepts schema 1 pushes).
Function-scoped: ``fresh_registry`` (a factory taking ``Registry`` keyword arguments).
Also ``busybox_image`` (an ``Image`` for this machine, gzip layer).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.oci import BUSYBOX, Image
from tests.fixtures.registry import DOCKER_REGISTRY, Registry, registry_available

RegistryFactory = Callable[..., Registry]


def _require_registry() -> None:
    if not registry_available():
        pytest.skip(f"{DOCKER_REGISTRY} is missing (Debian package docker-registry)")


def _session_registry(
    tmp_path_factory: pytest.TempPathFactory, name: str, **kwargs: Any
) -> Iterator[Registry]:
    _require_registry()
    workdir: Path = tmp_path_factory.mktemp(name)
    with Registry(workdir=workdir, **kwargs) as reg:
        yield reg


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    yield from _session_registry(tmp_path_factory, "registry")


@pytest.fixture(scope="session")
def auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    yield from _session_registry(
        tmp_path_factory, "auth-registry", auth="basic", users={"alice": "secret"}
    )


@pytest.fixture(scope="session")
def token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    yield from _session_registry(
        tmp_path_factory,
        "token-registry",
        auth="token",
        users={"alice": "secret"},
        public_prefixes=("public/",),
    )


@pytest.fixture(scope="session")
def tls_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    yield from _session_registry(tmp_path_factory, "tls-registry", tls=True)


@pytest.fixture(scope="session")
def schema1_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    yield from _session_registry(tmp_path_factory, "schema1-registry", schema1=True)


@pytest.fixture
def fresh_registry(tmp_path: Path) -> Iterator[RegistryFactory]:
    """``fresh_registry(auth=..., tls=..., ...)`` starts a registry for this test only."""
    _require_registry()
    started: list[Registry] = []

    def factory(**kwargs: Any) -> Registry:
        workdir = tmp_path / f"registry-{len(started)}"
        reg = Registry(workdir=workdir, **kwargs)
        started.append(reg)
        return reg.start()

    try:
        yield factory
    finally:
        for reg in reversed(started):
            reg.stop()


@pytest.fixture(scope="session")
def busybox_image() -> Image:
    if not BUSYBOX.exists():
        pytest.skip(f"{BUSYBOX} is missing (Debian package busybox-static)")
    return Image.busybox()


@pytest.fixture(autouse=True, scope="session")
def _no_leftover_monitor_servers() -> Iterator[None]:
    """Daemons of module-scoped fixtures and of tests that keep their state outside
    ``tmp_path`` leave monitor servers too: reap every one the session started. Pods with
    no cgroup parent live under ``/moorage``, which the daemon leaves in place (as CRI-O
    its parent): the session removes it where it made it and it is empty."""
    import glob

    parents = [p for p in glob.glob("/sys/fs/cgroup/*/") if not os.path.isdir(p + "moorage")]
    yield
    from tests.fixtures.daemon import STARTED_RUNROOTS, kill_monitor_servers

    kill_monitor_servers(STARTED_RUNROOTS)
    for parent in parents:
        with contextlib.suppress(OSError):  # absent, or not empty: someone else's now
            os.rmdir(parent + "moorage")


@pytest.fixture(autouse=True)
def _no_leftover_processes(tmp_path: Path) -> Iterator[None]:
    """Kill what a test's daemons left running in its temp dir: monitor servers and
    monitors outlive the daemon by design, so a test's end must reap them."""
    yield
    import signal

    prefix = str(tmp_path)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            continue
        if cwd == prefix or cwd.startswith(prefix + "/"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry), signal.SIGKILL)
