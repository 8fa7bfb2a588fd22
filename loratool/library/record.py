"""The per-file work of ``scan``: one adapter path in, one record (a plain dict) out.

:func:`read_record` is a pure function of a :class:`ReadTask` (the path, whether it is a
file or an adapter folder, and what to compute): it opens nothing but that path, raises
nothing (what went wrong is the record's ``error``) and returns only JSON-safe values, so
a process pool — or, later, a cluster executor — can map it over a library. The scanner
adds what only the walk knows (root, size, mtime, inode, sidecars) before storing it.

Header only unless asked: ``hashes`` reads the whole file once (sha256, AutoV1/V2/V3),
``validate`` runs :func:`loratool.ops.validate.validate` with its data pass (that one
imports torch). Safetensors files are described without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from loratool.jsonstrict import finite_or_none

# Metadata keys that name the base model an adapter was trained on (kohya, modelspec).
BASE_MODEL_KEYS = (
    "ss_base_model_version", "modelspec.architecture", "ss_v2", "ss_sd_model_name",
    "ss_new_sd_model_hash", "ss_sd_model_hash",
)
# The one-word base model shown and queried (``base_model``): the first of these present.
BASE_MODEL_PRIMARY = ("ss_base_model_version", "modelspec.architecture", "ss_sd_model_name")
TITLE_KEYS = ("modelspec.title", "ss_output_name")
HASH_FIELDS = ("sha256", "autov1", "autov2", "autov3")

# What the worker fills in; every key is always present (None / [] / {} when unknown).
READ_FIELDS: dict[str, Any] = {
    "format": None, "variant": None, "family": None, "network_types": [], "components": {},
    "modules": None, "rank": {"min": None, "max": None}, "alpha": {"min": None, "max": None},
    "dtypes": [], "complete": None, "base_model": None, "base_model_metadata": {}, "title": None,
    "warnings": [], "hashes": None, "validation": None, "error": None,
}


@dataclass(frozen=True)
class ReadTask:
    """What to read: ``path`` (a file, or an adapter folder when ``folder``) and extras."""

    path: str
    folder: bool = False
    hashes: bool = False
    validate: bool = False


def read_record(task: ReadTask) -> dict[str, Any]:
    """Describe one adapter file or folder (see the module docstring); never raises for a
    bad file — an unreadable, truncated or non-adapter file gets ``error`` (a truncated one
    still gets what its header says, as ``inspect`` does)."""
    from loratool.errors import LoraToolError
    from loratool.ops.inspect import inspect

    record: dict[str, Any] = {k: _fresh(v) for k, v in READ_FIELDS.items()}
    try:
        report = inspect(task.path, hashes=task.hashes)
    except LoraToolError as err:
        record["error"] = err.message
        if task.hashes:
            record["hashes"] = _hashes_only(task.path)
    except Exception as exc:  # a bug in a reader: recorded, so one file never stops a scan
        record["error"] = f"internal error ({exc.__class__.__name__}: {exc}); please report it"
    else:
        _describe(record, report)
        if report.error is not None:
            record["error"] = report.error.message
    if task.validate:
        try:
            record["validation"] = _validation(task.path)
        except Exception as exc:  # a bug in a check: said in the record, the scan goes on
            record["error"] = record["error"] or f"validate: internal error ({exc.__class__.__name__}: {exc}); please report it"
    return record


def _fresh(value: Any) -> Any:
    return dict(value) if isinstance(value, dict) else list(value) if isinstance(value, list) else value


def _describe(record: dict[str, Any], report: Any) -> None:
    meta: dict[str, str] = report.metadata or {}
    record.update(
        format=report.format, variant=report.variant or None, family=report.family,
        network_types=list(report.network_types), components=dict(report.components),
        modules=report.modules, rank=dict(report.rank), alpha=finite_or_none(dict(report.alpha)),
        dtypes=list(report.dtypes), complete=report.complete, warnings=list(report.warnings),
        base_model=next((meta[k] for k in BASE_MODEL_PRIMARY if meta.get(k)), None),
        base_model_metadata={k: meta[k] for k in BASE_MODEL_KEYS if k in meta},
        title=next((meta[k] for k in TITLE_KEYS if meta.get(k)), None),
    )
    if report.hashes is not None:
        record["hashes"] = report.hashes


def _hashes_only(path: str) -> dict[str, Any] | None:
    """Hashes of a file the reader refused (a checkpoint, a broken header): duplicates are
    still worth finding. None when even that fails (or for a folder)."""
    import os

    from loratool.errors import LoraToolError
    from loratool.io.hashing import compute_hashes

    if not os.path.isfile(path):
        return None
    try:
        return compute_hashes(path).as_dict()
    except LoraToolError:
        return None


def _validation(path: str) -> dict[str, Any]:
    """validate's verdict in brief: ok, counts per severity, the codes found."""
    from loratool.ops.validate import validate

    report = validate(path, allow_pickle=True)
    counts = report.counts
    return {"ok": counts["error"] == 0, "counts": counts, "codes": report.codes}


def validation_status(record: dict[str, Any]) -> str:
    """``ok`` / ``warnings`` / ``errors`` from a record's validation; ``unchecked`` without."""
    v = record.get("validation")
    if not v:
        return "unchecked"
    counts = v.get("counts") or {}
    return "errors" if counts.get("error") else "warnings" if counts.get("warning") else "ok"


def autov3_of(record: dict[str, Any]) -> str | None:
    """The record's AutoV3 (single weights file only)."""
    h = record.get("hashes")
    value = h.get("autov3") if isinstance(h, dict) else None
    return value if isinstance(value, str) else None
