"""Libraries of adapters on disk: the folder walk that ``inspect`` (and ``scan``) stand on."""

from loratool.library.walk import WalkEntry, walk

__all__ = ["WalkEntry", "walk"]
