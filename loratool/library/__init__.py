"""Libraries of adapters on disk: the folder walk that ``inspect`` stands on, and ``scan``,
which keeps a SQLite catalog of whole libraries (:func:`scan`, :func:`open_catalog`).

Names are imported on first use, so ``inspect`` (which only walks) never loads sqlite3.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from loratool.library.walk import WalkEntry, walk

if TYPE_CHECKING:
    from loratool.library.catalog import Catalog, default_db_path, open_catalog
    from loratool.library.scanner import LibraryReport, ScanResult, scan

_LAZY = {
    "Catalog": "loratool.library.catalog", "default_db_path": "loratool.library.catalog",
    "open_catalog": "loratool.library.catalog", "LibraryReport": "loratool.library.scanner",
    "ScanResult": "loratool.library.scanner", "scan": "loratool.library.scanner",
}

__all__ = ["Catalog", "LibraryReport", "ScanResult", "WalkEntry", "default_db_path", "open_catalog", "scan", "walk"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'loratool.library' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
