"""Sidecar files beside a downloaded model, as A1111's Civitai Helper writes them.

``<stem>.civitai.info`` holds the version JSON; ``<stem>.preview.<ext>`` the first preview
image. Both are written to a temporary file and renamed into place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import requests

from loratool.io.writer import atomic_write_bytes
from loratool.terminal import safe, safe_json

PREVIEW_MAX_BYTES = 32 * 1024 * 1024
# Content-Type -> extension for preview images we accept.
IMAGE_TYPES: dict[str, str] = {"image/png": "png", "image/jpeg": "jpeg", "image/webp": "webp",
                               "image/gif": "gif"}


def stem_of(model_path: Path) -> str:
    return model_path.name.rsplit(".", 1)[0] if "." in model_path.name else model_path.name


def write_info(model_path: Path, version: dict[str, Any]) -> Path:
    path = model_path.with_name(f"{stem_of(model_path)}.civitai.info")
    return atomic_write_bytes(path, safe_json(version, indent=4).encode("utf-8"))


def preview_url(version: dict[str, Any]) -> str | None:
    for image in version.get("images") or []:
        if image.get("url") and image.get("type", "image") == "image":
            return str(image["url"])
    return None


def write_preview(session: requests.Session, model_path: Path, version: dict[str, Any],
                  timeout: tuple[float, float]) -> tuple[Path | None, str | None]:
    """Fetch the first preview image; returns (path, None) or (None, warning)."""
    url = preview_url(version)
    if url is None:
        return None, "version has no preview image"
    try:
        with session.get(url, stream=True, timeout=timeout) as resp:
            ctype = resp.headers.get("Content-Type", "").split(";")[0].strip().lower()
            if resp.status_code != 200 or ctype not in IMAGE_TYPES:
                return None, f"preview not saved (HTTP {resp.status_code}, {safe(ctype) or 'no type'})"
            data = bytearray()
            for chunk in resp.iter_content(256 * 1024):
                data += chunk
                if len(data) > PREVIEW_MAX_BYTES:
                    return None, "preview not saved (larger than 32 MiB)"
    except requests.RequestException:
        return None, "preview not saved (connection failed)"
    path = model_path.with_name(f"{stem_of(model_path)}.preview.{IMAGE_TYPES[ctype]}")
    return atomic_write_bytes(path, bytes(data)), None
