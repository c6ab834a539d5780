"""The unpack helper's command line and start-up: one helper runs per layer, so what it
imports before the chroot is paid for every layer of every pull. No root needed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from moorage.image.unpack.__main__ import EXIT_USAGE, UsageError, _Args
from moorage.util.helper import helper_env

#: Modules the helper used to import that cost more start-up than the unpack of a small
#: layer (argparse, importlib.abc pulling importlib.resources, tempfile, pathlib,
#: dataclasses pulling inspect), or that only zstd layers need.
HEAVY = ("argparse", "importlib.abc", "tempfile", "pathlib", "dataclasses", "inspect",
         "zstandard", "traceback")


def test_helper_imports_stay_lean() -> None:
    probe = (
        "import sys, json; import moorage.image.unpack.__main__; "
        f"print(json.dumps([m for m in {list(HEAVY)!r} if m in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-P", "-c", probe], env=helper_env(), cwd="/",
                         capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


def test_arguments() -> None:
    args = _Args(["--dest", "/d", "--compression", "zstd", "--max-size", "10",
                  "--max-entries", "0"])
    assert (args.dest, args.compression, args.max_size, args.max_entries) == (
        "/d", "zstd", 10, 0)
    args = _Args(["--compression", "none", "--dest", "/x"])
    assert (args.max_size, args.max_entries) == (None, None)


@pytest.mark.parametrize(("argv", "message"), [
    ([], "--dest is required"),
    (["--dest", "/d"], "--compression is required"),
    (["--dest", "/d", "--compression", "bzip2"], "--compression must be one of"),
    (["--dest", "/d", "--compression", "gzip", "--max-size", "big"], "whole number"),
    (["--dest", "/d", "--compression", "gzip", "--max-entries", "-1"], "not be negative"),
    (["--dest", "/d", "--compression", "gzip", "--verbose"], "unknown argument '--verbose'"),
    (["--dest"], "--dest needs a value"),
])
def test_bad_arguments(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        _Args(argv)


def test_bad_command_line_exits_with_usage() -> None:
    out = subprocess.run(
        [sys.executable, "-P", "-m", "moorage.image.unpack", "--dest", "/nonexistent"],
        env=helper_env(), cwd="/", capture_output=True, text=True, stdin=subprocess.DEVNULL,
    )
    assert out.returncode == EXIT_USAGE
    assert "--compression is required" in out.stderr and "usage:" in out.stderr
    assert out.stdout == ""
