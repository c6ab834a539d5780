"""The ``moorage`` command: run the daemon, print the effective config or the version."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from moorage import CRI_API_VERSION, __version__, config, log

#: grpc core experiments the daemon turns off (see ``main``).
GRPC_EXPERIMENTS = "-event_engine_listener"


def _git_commit() -> str:
    """The commit moorage runs from: its git checkout's, else the one the installer recorded."""
    here = Path(__file__).resolve().parent
    recorded = here / "COMMIT"
    if recorded.exists():
        return recorded.read_text().strip() or "unknown"
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=5, check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moorage", description="A Kubernetes CRI runtime.")
    p.add_argument("--config", type=Path,
                   help=f"main config file (default {config.DEFAULT_CONFIG})")
    p.add_argument("--config-dir", type=Path,
                   help="drop-in dir, *.toml in lexical order "
                   f"(default {config.DEFAULT_CONFIG_DIR})")
    p.add_argument("--listen", type=Path, help="unix socket path for the CRI server")
    p.add_argument("--stream-address", help="address of the exec/attach/port-forward server")
    p.add_argument("--stream-port", type=int, help="its TCP port (0: a free one)")
    p.add_argument("--root", type=Path, help="persistent state directory")
    p.add_argument("--runroot", type=Path, help="volatile state directory")
    p.add_argument("--registries-conf", type=Path, help="containers-registries.conf(5) file")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", choices=["text", "json"])
    p.add_argument("--cgroup-manager", choices=["cgroupfs", "systemd"])
    p.add_argument("--default-runtime", help="runtime handler for pods that name none")
    p.add_argument("--cni-config-dir", type=Path, help="CNI network config dir")
    p.add_argument("--cni-plugin-dir", type=Path, action="append",
                   help="CNI plugin dir (repeatable; replaces the configured list)")
    p.add_argument("--enable-metrics", action="store_const", const=True, default=None,
                   help="serve Prometheus metrics (GET /metrics)")
    p.add_argument("--metrics-host", help="address of the metrics endpoint (127.0.0.1)")
    p.add_argument("--metrics-port", type=int, help="port of the metrics endpoint (9090)")
    sub = p.add_subparsers(dest="command")
    sub.add_parser("run", help="run the daemon (the default)")
    sub.add_parser("config", help="print the effective configuration as commented TOML")
    sub.add_parser("version", help="print the version, CRI API version and git commit")
    wipe = sub.add_parser("wipe", help="remove every pod and container (refused while the "
                          "daemon runs)")
    wipe.add_argument("--images", action="store_true", help="remove every image too")
    status = sub.add_parser("status", help="ask the running daemon (over its socket)")
    status.add_argument("what", choices=["info", "config", "containers"])
    status.add_argument("id", nargs="?", help="container id or prefix, for 'containers'")
    return p


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in config.FLAG_KEYS}


def effective_config(argv: list[str]) -> config.Config:
    """The configuration ``moorage ARGV`` runs with: flags over drop-ins over the main file.
    Raises ``config.ConfigError``."""
    args = _parser().parse_args(argv)
    return config.load(args.config, args.config_dir, _overrides(args))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "version":
        print(f"moorage {__version__}\nCRI API {CRI_API_VERSION}\ngit commit {_git_commit()}")
        return 0
    overrides = _overrides(args)
    try:
        cfg = config.load(args.config, args.config_dir, overrides)
    except config.ConfigError as e:
        print(f"moorage: {e}", file=sys.stderr)
        return 2
    if args.command == "config":
        sys.stdout.write(config.render(cfg))
        return 0
    if args.command == "status":
        from moorage import status

        return status.main(cfg.api.listen, args.what, args.id)
    if args.command == "wipe":
        import asyncio

        from moorage import daemon as daemon_

        log.setup(cfg.log_level, cfg.log_format)
        try:
            pods, containers, images = asyncio.run(daemon_.wipe(cfg, args.images))
        except daemon_.StartError as e:
            print(f"moorage wipe: {e}", file=sys.stderr)
            return 1
        print(f"removed {pods} pods, {containers} containers, {images} images")
        return 0
    # grpc's listener on its newer event engine reads each connection on a thread of its
    # own and hands every read over: ~15 context switches per call against ~10 with the
    # older one, and ~20 % more CPU per call (docs/performance.md). Set before grpc is
    # imported; a value given in the environment wins.
    os.environ.setdefault("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS)
    from moorage import daemon  # grpc is imported only when the daemon runs

    def reload() -> config.Config:
        return config.load(args.config, args.config_dir, overrides)

    try:
        daemon.run(cfg, reload)
    except daemon.StartError as e:
        print(f"moorage: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
