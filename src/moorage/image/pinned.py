"""Pinned images (``image.pinned_images``): images kubelet's image GC must keep.

The patterns and their matching are CRI-O's ``pinned_images``, so a list written for
CRI-O pins the same images here. Each pattern is matched, case-insensitively, against
every name of an image (its repo tags and repo digests, fully qualified as ListImages
reports them):

- ``name`` (no ``*``): exact; the whole name must equal it.
- ``text*``: a glob; CRI-O turns it into the unanchored expression ``text.*``, so the
  name must *contain* ``text`` (``registry.k8s.io/pause*`` is, in effect, a prefix).
- ``*text*``: a keyword; the name must contain ``text``.

The config refuses any other use of ``*`` (CRI-O silently never matches it).
"""

from __future__ import annotations

from collections.abc import Iterable

from moorage.image.store import Image


class PinnedImages:
    def __init__(self, patterns: Iterable[str]) -> None:
        self.patterns = tuple(patterns)
        self._exact: set[str] = set()
        self._contains: list[str] = []
        for pattern in self.patterns:
            if pattern.endswith("*"):
                self._contains.append(pattern.strip("*").casefold())
            else:
                self._exact.add(pattern.casefold())

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def matches_name(self, name: str) -> bool:
        folded = name.casefold()
        return folded in self._exact or any(text in folded for text in self._contains)

    def __call__(self, image: Image) -> bool:
        """Whether ``image`` is pinned: any of its names matches any pattern."""
        return any(self.matches_name(n) for n in (*image.repo_tags, *image.repo_digests))
