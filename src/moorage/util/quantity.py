"""Kubernetes resource quantities ("64Mi", "10M", "1.5G", "65536") as whole numbers."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_SUFFIXES = {
    "": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
}
_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([kMGTPE]i?|)\s*$")


def parse_quantity(text: str) -> int:
    """The value of a quantity, rounded up to a whole number; ValueError says why not."""
    m = _RE.match(text)
    if m is None or (m.group(2) == "ki"):
        raise ValueError(f"{text!r} is not a quantity (like 64Mi, 10M or 65536)")
    try:
        value = Decimal(m.group(1)) * _SUFFIXES[m.group(2)]
    except (InvalidOperation, KeyError) as e:
        raise ValueError(f"{text!r} is not a quantity") from e
    whole = int(value)
    return whole + 1 if value > whole else whole
