"""The SPDY/3 header dictionary, written from the spec text, against the Go library's copy."""

from __future__ import annotations

import re
import zlib
from pathlib import Path

import pytest

from moorage.streaming.spdy.dictionary import DICTIONARY

GO_DICTIONARY = Path("/usr/share/gocode/src/github.com/docker/spdystream/spdy/dictionary.go")


def test_length_and_landmarks() -> None:
    assert len(DICTIONARY) == 1423
    assert DICTIONARY.startswith(b"\x00\x00\x00\x07options\x00\x00\x00\x04head")
    assert b"\x00\x00\x00\x06origin100101201" in DICTIONARY
    assert DICTIONARY.endswith(b"charset=utf-8charset=iso-8859-1,utf-,*,enq=0.")
    # zlib identifies a preset dictionary by its Adler-32 (FDICT), as both peers must agree.
    assert zlib.adler32(DICTIONARY) == 0xE3C6A7C2


@pytest.mark.skipif(not GO_DICTIONARY.exists(),
                    reason="needs golang-github-docker-spdystream-dev")
def test_same_as_the_go_library() -> None:
    text = GO_DICTIONARY.read_text()
    body = text[text.index("headerDictionary = []byte{"):]
    body = body[:body.index("}")]
    go = bytes(int(x, 16) for x in re.findall(r"0x([0-9a-fA-F]{2})", body))
    assert len(go) == 1423
    assert go == DICTIONARY
