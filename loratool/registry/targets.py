"""What the user pointed at (a model id, a version id, a model page or download URL),
and the version JSON it names."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

from loratool.errors import RegistryError, UsageError
from loratool.registry.client import RegistryClient, origin


@dataclass(frozen=True)
class Target:
    """What the user pointed at: a model, or one version of it."""

    model_id: int | None = None
    version_id: int | None = None
    origin: str | None = None  # scheme://host of a URL the user gave


# URL path pattern -> which id it names.
_URL_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^/api/download/models/(\d+)/?$"), "version"),
    (re.compile(r"^/api/v1/model-versions/(\d+)/?$"), "version"),
    (re.compile(r"^/api/v1/models/(\d+)/?$"), "model"),
    (re.compile(r"^/models/(\d+)(?:/[^/]*)?/?$"), "model"),
)


def parse_target(ref: str | None, version: int | None) -> Target:
    """``MODEL_ID``, ``--version ID`` or a model page / download URL → :class:`Target`."""
    if version is not None:
        if ref:
            raise UsageError(ref, "give either MODEL_ID/URL or --version, not both")
        return Target(version_id=version)
    if not ref:
        raise UsageError(None, "give a MODEL_ID, a model URL or --version ID")
    if ref.isdigit():
        return Target(model_id=int(ref))
    parts = urlsplit(ref)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UsageError(ref, "not a model id or a registry URL")
    site = f"{parts.scheme}://{parts.netloc}"
    for pattern, kind in _URL_PATTERNS:
        m = pattern.match(parts.path)
        if not m:
            continue
        if kind == "version":
            return Target(version_id=int(m.group(1)), origin=site)
        vid = parse_qs(parts.query).get("modelVersionId", [None])[0]
        return Target(model_id=int(m.group(1)),
                      version_id=int(vid) if vid and vid.isdigit() else None, origin=site)
    raise UsageError(ref, "not a model page (/models/<id>) or download link (/api/download/models/<id>)")


def check_target(client: RegistryClient, target: Target) -> None:
    """Refuse a URL on another site than the selected registry (its token must not go there)."""
    if target.origin and origin(target.origin) != origin(client.base_url):
        raise UsageError(target.origin, f"URL is not on the selected registry {client.base_url}; "
                                        "pass --registry to use that site")


def resolve_version(client: RegistryClient, target: Target) -> dict[str, Any]:
    """The version JSON a :class:`Target` names (a model's newest version by default)."""
    check_target(client, target)
    if target.version_id is not None:
        return client.version(target.version_id)
    model = client.model(int(target.model_id or 0))
    versions = model.get("modelVersions") or []
    if not versions:
        raise RegistryError(f"model {target.model_id}", "model has no published versions")
    return client.version(int(versions[0]["id"]))
