"""The layer unpacker: a helper program that turns one layer tar into an overlayfs lower dir.

Run as ``python -m moorage.image.unpack --dest DIR --compression gzip|zstd|none
[--max-size BYTES] [--max-entries N]`` with the compressed layer on stdin. The helper enters
a private mount namespace, chroots into ``DIR`` and applies every tar entry itself, so the
kernel confines every path to the layer directory. OCI whiteouts become overlayfs whiteouts
on the way.

Output contract (one JSON object on stdout):

- exit 0: ``{"diff_id": "sha256:<hex>", "size": <uncompressed bytes>, "entries": <n>}``
- exit 2: ``{"error": "..."}``: the layer was refused (hostile or corrupt input)
- exit 3: ``{"error": "..."}``: the layer passed ``--max-size`` or ``--max-entries``
- exit 1: ``{"error": "..."}``: the machine failed (no space, bad destination, crash)

The daemon side lives in :mod:`moorage.image.unpacker`; this package is imported only by the
helper process and by tests (it keeps ``__init__`` free of imports on purpose).
"""

#: How much lower than the daemon's the CPU priority of pull work is: the unpack helpers
#: and the thread that hashes and writes each download (see _yield_to_the_daemon).
NICE = 10
