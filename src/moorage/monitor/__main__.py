"""``python -P -S -m moorage.monitor server --runroot DIR`` | ``... run``.

``server``: the monitor server (:mod:`moorage.monitor.server`); prints one JSON line on
stdout when it listens (``{"pid", "digest", "version"}``) or failed (``{"error"}``).

``run``: one monitor in this fresh interpreter, without a server (the costly way, kept for
comparison in ``bench/monitor_memory.py`` and as a fallback): stdin must be a connected unix
socket; the create request is read from it as one JSON line, the answer is written to it.
The process forks twice so that the monitor's parent is init, like the server's monitors.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence


def _usage() -> int:
    sys.stderr.write(
        "usage: python -m moorage.monitor server --runroot DIR\n"
        "       python -m moorage.monitor run   (a request on stdin, a unix socket)\n"
    )
    return 2


def _run_one() -> int:
    from moorage.monitor import monitor
    from moorage.monitor.protocol import MAX_REQUEST

    conn = os.dup(0)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)
    buf = b""
    while b"\n" not in buf and len(buf) <= MAX_REQUEST:
        chunk = os.read(conn, 65536)
        if not chunk:
            return 1
        buf += chunk
    if os.fork() != 0:
        return 0
    monitor.prepare_signals()
    monitor.catch_children()
    os.setsid()
    if os.fork() != 0:
        os._exit(0)
    monitor.run(conn, buf.split(b"\n", 1)[0])


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) == 3 and args[0] == "server" and args[1] == "--runroot":
        from moorage.monitor.server import serve

        serve(args[2])
    if args == ["run"]:
        return _run_one()
    return _usage()


if __name__ == "__main__":
    sys.exit(main())
