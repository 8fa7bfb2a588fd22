"""Sidecar files: what A1111, Civitai Helper, Forge and ComfyUI keep beside a model.

A model ``<stem>.safetensors`` (or an adapter folder ``<stem>/``) owns the files in its
folder named ``<stem>`` + one of :data:`SIDECAR_SUFFIXES`: ``.civitai.info`` (Civitai
Helper's version JSON), ``.preview.png|jpg|jpeg|webp|gif`` (Civitai Helper, A1111's extra
networks), ``.png`` and the other image types (A1111's plain preview), ``.json`` (A1111's
user metadata: activation text, preferred weight), ``.metadata.json`` (ComfyUI LoRA
Manager) and ``.txt`` (descriptions, trigger words). Pairing is by exact stem, from file
names only: nothing is opened.

A ``.civitai.info`` or ``.preview.*`` file whose stem names no model is an orphan (the
model was deleted or renamed); plain ``.json``/``.txt``/image files only count when they
pair, since a library folder may hold any of those for other reasons.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

IMAGE_TYPES = ("png", "jpg", "jpeg", "webp", "gif")
# suffix after the model's stem -> kind of sidecar. Matched case-insensitively, longest first.
SIDECAR_SUFFIXES: dict[str, str] = {
    ".civitai.info": "civitai-info",
    **{f".preview.{ext}": "preview" for ext in IMAGE_TYPES},
    **{f".{ext}": "image" for ext in IMAGE_TYPES},
    ".metadata.json": "json",
    ".json": "json",
    ".txt": "txt",
}
# Kinds that exist only as a model's sidecar: unpaired, they are orphans.
ORPHAN_KINDS = frozenset({"civitai-info", "preview"})
_BY_LENGTH = sorted(SIDECAR_SUFFIXES, key=len, reverse=True)


def model_stem(path: str, folder: bool = False) -> str:
    """The name sidecars start with: the file name without its extension (a folder's name)."""
    name = os.path.basename(path.rstrip(os.sep))
    return name if folder or "." not in name else name.rsplit(".", 1)[0]


def sidecar_kind(name: str) -> str | None:
    """The kind of sidecar a file name could be (``None``: not a sidecar name)."""
    lower = name.lower()
    return next((SIDECAR_SUFFIXES[s] for s in _BY_LENGTH if lower.endswith(s) and len(name) > len(s)), None)


def pair(models: Iterable[tuple[str, bool]], others: Iterable[str]) -> tuple[dict[str, list[str]], list[str]]:
    """Sidecars per model and the orphans.

    ``models``: (path, is_folder) of each adapter; ``others``: paths of the other files
    found. Returns ({model path: sorted sidecar names}, sorted orphan sidecar paths)."""
    stems: dict[tuple[str, str], list[str]] = {}  # (folder, stem) -> model paths
    result: dict[str, list[str]] = {}
    for path, folder in models:
        stems.setdefault((os.path.dirname(path), model_stem(path, folder)), []).append(path)
        result[path] = []
    orphans: list[str] = []
    for path in others:
        folder, name = os.path.split(path)
        lower = name.lower()
        owners: list[str] | None = None
        orphan_kind = False
        for suffix in _BY_LENGTH:
            if not lower.endswith(suffix) or len(name) == len(suffix):
                continue
            orphan_kind = orphan_kind or SIDECAR_SUFFIXES[suffix] in ORPHAN_KINDS
            owners = stems.get((folder, name[: -len(suffix)]))
            if owners:
                break
        if owners:
            for owner in owners:
                result[owner].append(name)
        elif orphan_kind:
            orphans.append(path)
    return {k: sorted(v) for k, v in result.items()}, sorted(orphans)
