"""``python -m moorage.image.unpack``: unpack one layer from stdin into a directory.

See the package docstring for the output contract. The order of the steps matters:

1. import everything, and look up every codec, that the unpack needs (and nothing more:
   the daemon starts one helper per layer, and imports are most of a helper's start-up);
2. enter a private mount namespace and chroot into the destination;
3. refuse all imports from then on: the file system is now the layer, and code must never be
   loaded from it;
4. decompress, hash and apply the tar stream.
"""

from __future__ import annotations

# Step 1: every module the helper uses is imported here, before the chroot.
import codecs
import contextlib
import ctypes
import errno
import json
import os
import signal
import sys
import zlib  # noqa: F401  (tarfile imports it lazily on some errors)
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from moorage.image.unpack import NICE
from moorage.image.unpack.apply import apply_layer
from moorage.image.unpack.rules import LayerError, LayerLimitError
from moorage.image.unpack.stream import COMPRESSIONS, Compression, LayerStream, open_source

if TYPE_CHECKING:
    from importlib.machinery import ModuleSpec
    from types import ModuleType

EXIT_OK = 0
EXIT_FAILED = 1  # the machine failed; the layer may be fine
EXIT_REFUSED = 2  # the layer was refused
EXIT_LIMIT = 3  # the layer passed a configured bound

_PR_SET_PDEATHSIG = 1
_CLONE_NEWNS = 0x00020000
_MS_REC = 0x4000
_MS_PRIVATE = 1 << 18


class _NoImports:
    """After the chroot every import would read files that the layer controls.

    A meta path finder by protocol (``importlib.abc`` costs 30 ms of imports).
    """

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> ModuleSpec | None:
        raise ImportError(f"import of {fullname!r} refused inside the layer chroot")


USAGE = (
    "usage: python -m moorage.image.unpack --dest DIR --compression {gzip,zstd,none} "
    "[--max-size BYTES] [--max-entries N]\n"
    "Unpack one layer tar from stdin into an empty directory (for overlayfs)."
)
EXIT_USAGE = 64  # as argparse's 2 would read as "refused"


class UsageError(Exception):
    """Bad command line (the daemon never writes one)."""


class _Args:
    """The command line. Parsed by hand: argparse costs 10 ms of imports per layer."""

    def __init__(self, argv: Sequence[str]) -> None:
        values: dict[str, str] = {}
        args = list(argv)
        while args:
            option = args.pop(0)
            if option not in ("--dest", "--compression", "--max-size", "--max-entries"):
                raise UsageError(f"unknown argument {option!r}")
            if not args:
                raise UsageError(f"{option} needs a value")
            values[option] = args.pop(0)
        for required in ("--dest", "--compression"):
            if required not in values:
                raise UsageError(f"{required} is required")
        self.dest = values["--dest"]
        compression = values["--compression"]
        if compression not in COMPRESSIONS:
            raise UsageError(f"--compression must be one of {', '.join(COMPRESSIONS)}")
        self.compression: Compression = compression
        self.max_size = _count(values, "--max-size")
        self.max_entries = _count(values, "--max-entries")


def _count(values: dict[str, str], option: str) -> int | None:
    text = values.get(option)
    if text is None:
        return None
    try:
        number = int(text)
    except ValueError:
        raise UsageError(f"{option} must be a whole number, got {text!r}") from None
    if number < 0:
        raise UsageError(f"{option} must not be negative, got {number}")
    return number


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


def _yield_to_the_daemon() -> None:
    """Lower the helper's CPU priority by :data:`NICE`.

    A pull runs several helpers at once and each is CPU-bound; at the daemon's priority
    they delay every wake-up of the daemon's RPC threads (on 2 busy CPUs, ListContainers
    took a median 10 ms during a pull, 5 ms with the helpers at nice 5, 3 ms at 10).
    Niced, they still take every idle cycle, so a pull on an idle machine is as fast;
    under contention they give way, to the daemon and to other work.
    """
    with contextlib.suppress(OSError):
        os.nice(NICE)


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
    tb = e.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        lines.append(f"  {code.co_filename}:{tb.tb_lineno} in {code.co_name}")
        tb = tb.tb_next
    lines.append(f"{type(e).__name__}: {e}")
    sys.stderr.write("\n".join(lines) + "\n")
    sys.stderr.flush()


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _Args(sys.argv[1:] if argv is None else argv)
    except UsageError as e:
        sys.stderr.write(f"{USAGE}\nerror: {e}\n")
        return EXIT_USAGE
    os.umask(0)
    # Codecs are found by importing modules; look up those tarfile uses while we still can.
    for name in ("utf-8", "ascii", "latin-1"):
        codecs.lookup(name)
    try:
        _die_with_parent()
        _yield_to_the_daemon()
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
        _emit({"error": str(e), "errno": e.errno})
        return EXIT_FAILED
    except Exception as e:
        _report_crash(e)
        _emit({"error": f"internal error: {type(e).__name__}: {e}"})
        return EXIT_FAILED
    _emit({"diff_id": layer.diff_id, "size": layer.size, "entries": entries})
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
