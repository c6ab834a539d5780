"""The SPDY/3 header compression dictionary (draft-mbelshe-httpbis-spdy-00, section 2.6.10.1).

Header blocks of SYN_STREAM, SYN_REPLY and HEADERS frames are zlib streams primed with this
dictionary. The spec prints it as a C array of 1423 bytes. It is written here as what it
is: 65 strings that each carry a 32-bit big-endian length (header names and common
values), then 585 bytes of plain text (status codes, reason phrases, dates, media types).
``tests/unit/test_spdy_dictionary.py`` checks it against the Go library's copy when that is
installed (Debian's golang-github-docker-spdystream-dev).
"""

from __future__ import annotations

import struct

#: The length-prefixed part, in the spec's order.
_WORDS = (
    "options", "head", "post", "put", "delete", "trace", "accept", "accept-charset",
    "accept-encoding", "accept-language", "accept-ranges", "age", "allow", "authorization",
    "cache-control", "connection", "content-base", "content-encoding", "content-language",
    "content-length", "content-location", "content-md5", "content-range", "content-type",
    "date", "etag", "expect", "expires", "from", "host", "if-match", "if-modified-since",
    "if-none-match", "if-range", "if-unmodified-since", "last-modified", "location",
    "max-forwards", "pragma", "proxy-authenticate", "proxy-authorization", "range", "referer",
    "retry-after", "server", "te", "trailer", "transfer-encoding", "upgrade", "user-agent",
    "vary", "via", "warning", "www-authenticate", "method", "get", "status", "200 OK",
    "version", "HTTP/1.1", "url", "public", "set-cookie", "keep-alive", "origin",
)

#: The plain part that follows, unprefixed and with no separators of its own.
_TAIL = (
    "100101201202205206300302303304305306307402405406407408409410411412413414415416417"
    "502504505"
    "203 Non-Authoritative Information"
    "204 No Content"
    "301 Moved Permanently"
    "400 Bad Request"
    "401 Unauthorized"
    "403 Forbidden"
    "404 Not Found"
    "500 Internal Server Error"
    "501 Not Implemented"
    "503 Service Unavailable"
    "Jan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec"
    " 00:00:00"
    " Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMT"
    "chunked,text/html,image/png,image/jpg,image/gif,application/xml,application/xhtml+xml,"
    "text/plain,text/javascript,public"
    "privatemax-age=gzip,deflate,sdch"
    "charset=utf-8charset=iso-8859-1,utf-,*,enq=0."
)


def _build() -> bytes:
    out = bytearray()
    for word in _WORDS:
        raw = word.encode("ascii")
        out += struct.pack(">I", len(raw)) + raw
    out += _TAIL.encode("ascii")
    return bytes(out)


#: The dictionary bytes (1423 of them).
DICTIONARY = _build()
