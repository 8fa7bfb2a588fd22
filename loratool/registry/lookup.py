"""Identify local files through the registry's by-hash endpoints.

Full SHA256 first (one batch request for many files), then AutoV3 — the hash of the
tensor data only, which still matches when a file's header was edited.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loratool.errors import LoraToolError
from loratool.io.hashing import FileHashes, compute_hashes
from loratool.registry.client import RegistryClient


@dataclass
class LookupResult:
    path: Path
    hashes: FileHashes | None = None
    version: dict[str, Any] | None = None
    matched_by: str | None = None  # "sha256" | "autov3"
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def found(self) -> bool:
        return self.version is not None

    def as_dict(self) -> dict[str, Any]:
        v = self.version or {}
        model = v.get("model") or {}
        return {
            "path": str(self.path),
            "hashes": self.hashes.as_dict() if self.hashes else None,
            "found": self.found,
            "matched_by": self.matched_by,
            "model_id": v.get("modelId"),
            "version_id": v.get("id"),
            "model_name": model.get("name"),
            "version_name": v.get("name"),
            "type": model.get("type"),
            "base_model": v.get("baseModel"),
            "air": v.get("air"),
            "error": self.error,
        }


def lookup_files(client: RegistryClient, paths: list[Path],
                 on_hash: Callable[[Path], Callable[[int], None] | None] | None = None) -> list[LookupResult]:
    """Hash each file and identify it; unreadable files get ``error`` instead of stopping the rest."""
    results = [LookupResult(p) for p in paths]
    for r in results:
        try:
            r.hashes = compute_hashes(r.path, on_hash(r.path) if on_hash else None)
        except LoraToolError as err:
            r.error = err.message
    hashed = [r for r in results if r.hashes]
    if len(hashed) > 1:
        found = client.by_hashes([r.hashes.sha256 for r in hashed if r.hashes])
        for r in hashed:
            if r.hashes and r.hashes.sha256 in found:
                r.version, r.matched_by = found[r.hashes.sha256], "sha256"
    for r in hashed:
        if r.found or r.hashes is None:
            continue
        # (hash to send, how it matched); the single-file path tries SHA256 here too.
        tries = [(r.hashes.sha256, "sha256")] if len(hashed) == 1 else []
        if r.hashes.autov3:
            tries.append((r.hashes.autov3, "autov3"))
        for digest, how in tries:
            version = client.by_hash(digest)
            if version is not None:
                r.version, r.matched_by = version, how
                break
    return results
