"""Starting moorage's own helper programs (unpacker, pinns, ...) with fork+exec."""

from __future__ import annotations

import os
from pathlib import Path

import moorage


def helper_env() -> dict[str, str]:
    """The daemon's environment, with this moorage first on the helper's import path.

    Helpers run as ``python -P -m moorage.<helper>``: ``-P`` keeps the working directory off
    the path, and PYTHONPATH makes them import the same moorage the daemon runs.
    """
    env = dict(os.environ)
    package_root = str(Path(moorage.__file__).resolve().parent.parent)
    old = env.get("PYTHONPATH")
    env["PYTHONPATH"] = f"{package_root}{os.pathsep}{old}" if old else package_root
    return env
