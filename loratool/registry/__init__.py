"""Civitai-compatible registry client, verified downloader and sidecars (no torch here)."""

from loratool.registry.client import RegistryClient, Timeouts
from loratool.registry.config import RegistrySettings, resolve
from loratool.registry.download import FetchOptions, FetchResult, fetch_version
from loratool.registry.files import FileChoice, sanitize_filename, select_file
from loratool.registry.lookup import LookupResult, lookup_files
from loratool.registry.retry import RetryPolicy
from loratool.registry.targets import Target, check_target, parse_target, resolve_version

__all__ = [
    "FetchOptions", "FetchResult", "FileChoice", "LookupResult", "RegistryClient",
    "RegistrySettings", "RetryPolicy", "Target", "Timeouts", "fetch_version", "lookup_files",
    "check_target", "parse_target", "resolve", "resolve_version", "sanitize_filename", "select_file",
]
