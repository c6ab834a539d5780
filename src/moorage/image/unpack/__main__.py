"""``python -m moorage.image.unpack``: unpack one layer from stdin into a directory.

See the package docstring for the output contract. The order of the steps matters:

1. import everything, and look up every codec, that the unpack needs;
2. enter a private mount namespace and chroot into the destination;
3. refuse all imports from then on: the file system is now the layer, and code must never be
   loaded from it;
4. decompress, hash and apply the tar stream.
"""

from __future__ import annotations

# Step 1: every module the helper uses is imported here, before the chroot.
import argparse
import codecs
import ctypes
import errno
import json
import os
import signal
import sys
import traceback
import zlib  # noqa: F401  (tarfile imports it lazily on some errors)
from collections.abc import Sequence
from importlib.abc import MetaPathFinder
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any

from moorage.image.unpack.apply import apply_layer
from moorage.image.unpack.rules import LayerError, LayerLimitError
from moorage.image.unpack.stream import COMPRESSIONS, Compression, LayerStream, open_source

EXIT_OK = 0
EXIT_FAILED = 1  # the machine failed; the layer may be fine
EXIT_REFUSED = 2  # the layer was refused
EXIT_LIMIT = 3  # the layer passed a configured bound

_PR_SET_PDEATHSIG = 1
_CLONE_NEWNS = 0x00020000
_MS_REC = 0x4000
_MS_PRIVATE = 1 << 18


class _NoImports(MetaPathFinder):
    """After the chroot every import would read files that the layer controls."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> ModuleSpec | None:
        raise ImportError(f"import of {fullname!r} refused inside the layer chroot")


class _Args(argparse.Namespace):
    dest: str
    compression: Compression
    max_size: int | None
    max_entries: int | None


def _parse_args(argv: Sequence[str] | None) -> _Args:
    parser = argparse.ArgumentParser(
        prog="python -m moorage.image.unpack",
        description="Unpack one layer tar from stdin into an empty directory (for overlayfs).",
    )
    parser.add_argument("--dest", required=True, help="existing empty layer directory")
    parser.add_argument("--compression", required=True, choices=COMPRESSIONS)
    parser.add_argument("--max-size", type=int, default=None, help="uncompressed bytes at most")
    parser.add_argument("--max-entries", type=int, default=None, help="tar entries at most")
    return parser.parse_args(argv, namespace=_Args())


def _check_dest(dest: str) -> None:
    if not os.path.isdir(dest) or os.path.islink(dest):
        raise OSError(errno.ENOTDIR, f"destination {dest!r} is not a directory")
    if os.listdir(dest):
        raise OSError(errno.ENOTEMPTY, f"destination {dest!r} is not empty")


def _libc_call(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _die_with_parent() -> None:
    """A helper outliving a killed daemon would race the cleanup of its directory."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong]
    _libc_call(libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL), "prctl(PR_SET_PDEATHSIG)")


def _confine(dest: str) -> None:
    """Step 2 and 3: private mount namespace, chroot, no more imports."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.unshare.argtypes = [ctypes.c_int]
    libc.mount.argtypes = [
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_ulong,
        ctypes.c_void_p,
    ]
    _libc_call(libc.unshare(_CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _libc_call(libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None), "mount --make-rprivate /")
    os.chroot(dest)
    os.chdir("/")
    sys.meta_path.insert(0, _NoImports())
    sys.path.clear()
    sys.path_importer_cache.clear()


def _emit(payload: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(payload) + "\n")
    sys.stdout.flush()


def _report_crash(e: BaseException) -> None:
    """A short traceback on stderr that reads no source files (they would be the layer's)."""
    lines = ["unpack helper crashed:"]
    for frame, lineno in traceback.walk_tb(e.__traceback__):
        lines.append(f"  {frame.f_code.co_filename}:{lineno} in {frame.f_code.co_name}")
    lines.append(f"{type(e).__name__}: {e}")
    sys.stderr.write("\n".join(lines) + "\n")
    sys.stderr.flush()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    os.umask(0)
    # Codecs are found by importing modules; look up those tarfile uses while we still can.
    for name in ("utf-8", "ascii", "latin-1"):
        codecs.lookup(name)
    try:
        _die_with_parent()
        raw = open(0, "rb", buffering=0, closefd=False)  # noqa: SIM115 (stdin, left open)
        layer = LayerStream(open_source(raw, args.compression), args.compression, args.max_size)
        _check_dest(args.dest)
        _confine(args.dest)
        entries = apply_layer(layer, args.max_entries)
    except LayerLimitError as e:
        _emit({"error": str(e)})
        return EXIT_LIMIT
    except LayerError as e:
        _emit({"error": str(e)})
        return EXIT_REFUSED
    except OSError as e:
        _emit({"error": str(e)})
        return EXIT_FAILED
    except Exception as e:
        _report_crash(e)
        _emit({"error": f"internal error: {type(e).__name__}: {e}"})
        return EXIT_FAILED
    _emit({"diff_id": layer.diff_id, "size": layer.size, "entries": entries})
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
