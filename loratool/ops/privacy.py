"""What in a LoRA's metadata tells strangers about the trainer's machine, and its removal.

Shared by ``validate`` (which reports it) and ``metadata strip --privacy`` (which removes
exactly what is reported):

* **paths** — absolute paths anywhere in a metadata value (or inside a JSON value, keys
  included): Windows drive paths (``C:\\Users\\name\\…``), UNC paths (``\\\\server\\share``),
  POSIX paths with at least two segments (``/home/name/…``, ``/Users/name/…``,
  ``/content/drive/…``), ``~/…`` and ``~name/…``, ``file://`` URLs. The user name is
  named when the path shows it. Stripping cuts each path to its last component (the
  key is kept: ``ss_sd_model_name`` still names the base model).
* **dataset folder names** — the keys of ``ss_dataset_dirs``, ``ss_reg_dataset_dirs``
  and ``ss_tag_frequency``, and the ``image_dir``/``metadata_file``/``tag_frequency``
  folders inside ``ss_datasets``. Stripping removes those keys.

``modelspec.thumbnail`` and ``data:`` URLs are never scanned (base64 is full of slashes).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from loratool import jsonstrict

# (pattern, group holding the user name or 0). First match at a position wins.
_STOP = r"\"'\s,;|<>"
PATH_PATTERNS: tuple[re.Pattern[str], ...] = (
    re.compile(r"file://[^" + _STOP + r"]+"),
    re.compile(r"(?<![\w\\])\\\\[\w.$-]+\\[^" + _STOP + r"]+"),  # UNC
    re.compile(r"(?<![\w])[A-Za-z]:[\\/][^\"'\n,;|<>]*"),  # C:\… (spaces allowed)
    re.compile(r"(?<![\w.:/~\\])/(?:[^/" + _STOP + r":]+/)+[^/" + _STOP + r"]*"),  # /a/b…
    re.compile(r"(?<![\w])~[\w.-]*[\\/][^" + _STOP + r"]*"),  # ~/… ~name/…
)
USER_PATTERNS: tuple[re.Pattern[str], ...] = (
    re.compile(r"(?i)[A-Za-z]:[\\/]+(?:users|documents and settings)[\\/]+([^\\/\"'\n]+)"),
    re.compile(r"/(?:home|Users)/([^/" + _STOP + r"]+)"),
    re.compile(r"~([A-Za-z_][\w.-]*)[\\/]"),
)
SKIPPED_KEYS = frozenset({"modelspec.thumbnail"})
DATASET_KEYS = ("ss_dataset_dirs", "ss_reg_dataset_dirs", "ss_tag_frequency")


@dataclass(frozen=True)
class PrivacyHit:
    """One private detail in one metadata key: ``kind`` is ``path`` or ``dataset-names``."""

    key: str
    kind: str
    detail: str  # the first path found, or the folder names (comma-separated)
    user: str | None = None
    count: int = 1


def find_paths(text: str) -> list[str]:
    """Absolute paths in a string, in order of appearance (no overlaps)."""
    spans: list[tuple[int, int]] = []
    for pattern in PATH_PATTERNS:
        for m in pattern.finditer(text):
            if not any(s < m.end() and m.start() < e for s, e in spans):
                spans.append((m.start(), m.end()))
    return [text[s:e].rstrip(" .") for s, e in sorted(spans)]


def user_in(path: str) -> str | None:
    for pattern in USER_PATTERNS:
        m = pattern.search(path)
        if m:
            return m.group(1).strip()
    return None


def _strings(value: str) -> Iterator[str]:
    """The strings inside a metadata value: itself, or every key and string of its JSON."""
    parsed = _json(value)
    if not isinstance(parsed, (dict, list)):
        yield value
        return
    stack: list[Any] = [parsed]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, str):
            yield node


def _json(value: str) -> Any:
    if value[:1] not in ("{", "["):
        return None
    try:
        return jsonstrict.loads(value)
    except (ValueError, RecursionError):
        return None


def _scanned(key: str, value: str) -> bool:
    return key not in SKIPPED_KEYS and not value.startswith("data:")


def dataset_names(key: str, value: str) -> list[str]:
    """Dataset folder names a kohya dataset key holds (empty for other keys)."""
    parsed = _json(value)
    if key in DATASET_KEYS and isinstance(parsed, dict):
        return [str(k) for k in parsed]
    if key == "ss_datasets" and isinstance(parsed, list):
        names: list[str] = []
        for ds in parsed:
            if not isinstance(ds, dict):
                continue
            for sub in ds.get("subsets") or []:
                if isinstance(sub, dict):
                    names += [str(sub[f]) for f in ("image_dir", "metadata_file") if sub.get(f)]
            if isinstance(ds.get("tag_frequency"), dict):
                names += [str(k) for k in ds["tag_frequency"]]
        return list(dict.fromkeys(names))
    return []


def privacy_hits(metadata: dict[str, str]) -> list[PrivacyHit]:
    """Every private detail in a metadata map, one hit per (key, kind)."""
    hits: list[PrivacyHit] = []
    for key, value in metadata.items():
        if not _scanned(key, value):
            continue
        paths = [p for s in _strings(value) for p in find_paths(s)]
        if paths:
            user = next((u for u in map(user_in, paths) if u), None)
            hits.append(PrivacyHit(key, "path", paths[0], user, len(paths)))
        names = dataset_names(key, value)
        if names:
            hits.append(PrivacyHit(key, "dataset-names", ", ".join(names), None, len(names)))
    return hits


def redact_paths(text: str) -> str:
    """Each absolute path cut to its last component (``C:\\Users\\bob\\m.safetensors`` → ``m.safetensors``)."""
    for path in sorted(set(find_paths(text)), key=len, reverse=True):
        text = text.replace(path, _last_component(path))
    return text


def _last_component(path: str) -> str:
    parts = [p for p in re.split(r"[\\/]+", path) if p]
    last = parts[-1] if parts else ""
    user = user_in(path)
    return "" if last in ("~", user) or re.fullmatch(r"[A-Za-z]:|~[\w.-]*|file:", last) else last


def _map_strings(node: Any, fn: Callable[[str], str]) -> Any:
    if isinstance(node, dict):
        return {fn(k) if isinstance(k, str) else k: _map_strings(v, fn) for k, v in node.items()}
    if isinstance(node, list):
        return [_map_strings(v, fn) for v in node]
    return fn(node) if isinstance(node, str) else node


def strip_private(metadata: dict[str, str]) -> tuple[dict[str, str], list[str], list[str]]:
    """Metadata without what :func:`privacy_hits` reports: paths redacted in place, dataset
    folder keys removed. Returns (new metadata, redacted keys, removed keys)."""
    hits = privacy_hits(metadata)
    removed = sorted({h.key for h in hits if h.kind == "dataset-names"})
    redacted = sorted({h.key for h in hits if h.kind == "path"} - set(removed))
    out = {k: v for k, v in metadata.items() if k not in removed}
    for key in redacted:
        parsed = _json(out[key])
        if isinstance(parsed, (dict, list)):
            out[key] = json.dumps(_map_strings(parsed, redact_paths), ensure_ascii=False, allow_nan=False)
        else:
            out[key] = redact_paths(out[key])
    return out, redacted, removed
