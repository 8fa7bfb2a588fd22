"""Civitai-compatible registry client, verified downloader and sidecars (no torch here)."""

from loratool.registry.client import RegistryClient, Timeouts
from loratool.registry.config import RegistrySettings, resolve
from loratool.registry.download import FetchOptions, FetchResult, fetch_version
from loratool.registry.files import FileChoice, Target, parse_target, sanitize_filename, select_file
from loratool.registry.lookup import LookupResult, lookup_files
from loratool.registry.retry import RetryPolicy

__all__ = [
    "FetchOptions", "FetchResult", "FileChoice", "LookupResult", "RegistryClient",
    "RegistrySettings", "RetryPolicy", "Target", "Timeouts", "fetch_version", "lookup_files",
    "check_target", "parse_target", "resolve", "resolve_version", "sanitize_filename", "select_file",
]


def check_target(client: RegistryClient, target: Target) -> None:
    """Refuse a URL on another site than the selected registry (its token must not go there)."""
    from loratool.errors import UsageError
    from loratool.registry.client import origin

    if target.origin and origin(target.origin) != origin(client.base_url):
        raise UsageError(target.origin, f"URL is not on the selected registry {client.base_url}; "
                                        "pass --registry to use that site")


def resolve_version(client: RegistryClient, target: Target) -> dict:
    """The version JSON a :class:`Target` names (a model's newest version by default)."""
    from loratool.errors import RegistryError

    check_target(client, target)
    if target.version_id is not None:
        return client.version(target.version_id)
    model = client.model(int(target.model_id or 0))
    versions = model.get("modelVersions") or []
    if not versions:
        raise RegistryError(f"model {target.model_id}", "model has no published versions")
    return client.version(int(versions[0]["id"]))
