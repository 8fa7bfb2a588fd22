"""Which registry to talk to and with which token: flags, environment, then the YAML config.

The config file (``$XDG_CONFIG_HOME/loratool/config.yaml``, default ``~/.config``)::

    default: civitai
    registries:
      civitai: {url: https://civitai.com, token: 0123abcd...}
      mirror:  {url: https://models.example.org}

Precedence — registry: ``--registry`` (a URL or a name from the file), ``LORATOOL_REGISTRY``,
the file's ``default``, then https://civitai.com. Token: ``--token``, ``LORATOOL_TOKEN``,
``CIVITAI_API_TOKEN`` (only when the registry is Civitai's own site, so that a Civitai key
is never sent to another registry), then the selected registry's ``token`` in the file.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from loratool.errors import UsageError

DEFAULT_REGISTRY = "https://civitai.com"
REGISTRY_ENV = "LORATOOL_REGISTRY"
CIVITAI_HOSTS = ("civitai.com", "civitai.red")


def is_civitai(url: str) -> bool:
    host = (urlsplit(url).hostname or "").lower()
    return any(host == h or host.endswith("." + h) for h in CIVITAI_HOSTS)


# environment variable -> which registries it may be sent to, in order of precedence.
TOKEN_ENVS: tuple[tuple[str, Callable[[str], bool]], ...] = (
    ("LORATOOL_TOKEN", lambda url: True),
    ("CIVITAI_API_TOKEN", is_civitai),
)
SETTABLE = ("default", "registries.<name>.url", "registries.<name>.token")


def config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "loratool" / "config.yaml"


@dataclass(frozen=True)
class RegistrySettings:
    """A resolved registry: site root, optional token, and where each came from."""

    url: str
    token: str | None
    name: str | None = None
    url_source: str = "default"
    token_source: str | None = None

    def __repr__(self) -> str:  # never show the token
        return f"RegistrySettings(url={self.url!r}, name={self.name!r}, token={'set' if self.token else None})"


def load_config(path: Path | None = None) -> dict[str, Any]:
    path = path or config_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise UsageError(path, f"cannot read config: {exc.strerror or exc}") from None
    import yaml  # only when there is a config file to read

    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise UsageError(path, f"config is not valid YAML ({exc.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise UsageError(path, "config must be a YAML mapping")
    regs = data.get("registries", {})
    if not isinstance(regs, dict) or not all(isinstance(v, dict) for v in regs.values()):
        raise UsageError(path, "'registries' must map names to {url, token}")
    return data


def save_config(data: dict[str, Any], path: Path | None = None) -> Path:
    """Write the config atomically, readable only by its owner (it may hold tokens)."""
    import yaml

    from loratool.io.writer import atomic_write_bytes

    text = yaml.safe_dump(data, sort_keys=False)
    return atomic_write_bytes(path or config_path(), text.encode("utf-8"), mode=0o600)


def set_value(data: dict[str, Any], key: str, value: str) -> dict[str, Any]:
    """Apply ``config set KEY VALUE`` to a config mapping (returns a new mapping)."""
    out = dict(data)
    parts = key.split(".")
    if parts == ["default"]:
        out["default"] = value
        return out
    if len(parts) == 3 and parts[0] == "registries" and parts[2] in ("url", "token") and parts[1]:
        regs = {k: dict(v) for k, v in out.get("registries", {}).items()}
        entry = regs.setdefault(parts[1], {})
        entry[parts[2]] = normalise_url(value) if parts[2] == "url" else value
        out["registries"] = regs
        return out
    raise UsageError(key, f"unknown config key; settable: {', '.join(SETTABLE)}")


def normalise_url(url: str) -> str:
    """A registry site root: scheme and host (and any path prefix), no trailing slash."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UsageError(url, "registry must be an http(s) URL such as https://civitai.com")
    if parts.query or parts.fragment or "@" in parts.netloc:
        raise UsageError(url, "registry URL must not carry a query, fragment or credentials")
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


def resolve(registry: str | None = None, token: str | None = None,
            config: dict[str, Any] | None = None) -> RegistrySettings:
    """Resolve the registry and token from flags, environment and config (see module doc)."""
    cfg = load_config() if config is None else config
    regs: dict[str, dict[str, Any]] = cfg.get("registries", {})
    choice, source = registry, "--registry"
    if not choice and os.environ.get(REGISTRY_ENV):
        choice, source = os.environ[REGISTRY_ENV], REGISTRY_ENV
    if not choice and cfg.get("default"):
        choice, source = str(cfg["default"]), "config"
    name = None
    if not choice:
        url, source = DEFAULT_REGISTRY, "default"
    elif choice in regs:
        name = choice
        if not regs[choice].get("url"):
            raise UsageError(config_path(), f"registry {choice!r} has no url")
        url = normalise_url(str(regs[choice]["url"]))
    elif "://" in choice:
        url = normalise_url(choice)
        name = next((n for n, r in regs.items() if r.get("url") and normalise_url(str(r["url"])) == url), None)
    else:
        raise UsageError(choice, f"no registry of that name in {config_path()}")
    tok, tok_source = token, "--token" if token else None
    for env, applies in TOKEN_ENVS:
        if not tok and os.environ.get(env) and applies(url):
            tok, tok_source = os.environ[env], env
    if not tok and name and regs[name].get("token"):
        tok, tok_source = str(regs[name]["token"]), "config"
    return RegistrySettings(url=url, token=tok or None, name=name, url_source=source,
                            token_source=tok_source)
