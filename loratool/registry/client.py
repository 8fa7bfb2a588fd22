"""A client for Civitai's REST API v1 (or any registry that speaks it).

The token goes only into an ``Authorization: Bearer`` header, and only on requests to the
registry's own origin. Redirects are never followed automatically: API redirects are
followed by hand (token dropped on any other origin) and the download endpoint's 307 is
returned to the caller, who fetches the storage URL with a clean session.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests

from loratool import __version__
from loratool.errors import RegistryError
from loratool.registry.retry import RETRY_STATUSES, RetryPolicy
from loratool.terminal import safe

log = logging.getLogger("loratool.registry")

USER_AGENT = f"loratool/{__version__} (Civitai-compatible registry client)"
BATCH_LIMIT = 100  # POST /model-versions/by-hash takes at most 100 hashes
MAX_REDIRECTS = 5

# status -> what it means to the user (REGISTRY.md §1.6 error table).
STATUS_MESSAGES: dict[int, str] = {
    400: "bad request",
    401: "unauthorized: API token missing or invalid (use --token, LORATOOL_TOKEN or CIVITAI_API_TOKEN)",
    403: "forbidden: early access, or not permitted for this account",
    404: "not found",
    410: "gone: the model is archived and not available for download",
    429: "rate limited by the registry",
}


def origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme.lower(), (parts.netloc or "").lower()


@dataclass
class Timeouts:
    connect: float = 10.0
    stall: float = 60.0  # seconds without a byte before a read gives up

    def pair(self) -> tuple[float, float]:
        return (self.connect, self.stall)


@dataclass
class RegistryClient:
    """Talks to one registry, named by its site root (e.g. ``https://civitai.com``)."""

    base_url: str
    token: str | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy.from_env)
    timeouts: Timeouts = field(default_factory=Timeouts)
    session: requests.Session = field(default_factory=requests.Session)

    def __post_init__(self) -> None:
        self.base_url = self.base_url.rstrip("/")
        self.session.headers["User-Agent"] = USER_AGENT
        self._origin = origin(self.base_url)

    def __repr__(self) -> str:
        return f"RegistryClient({self.base_url!r}, token={'set' if self.token else None})"

    # -- plumbing -----------------------------------------------------------------------

    def api_url(self, path: str) -> str:
        return f"{self.base_url}/api/v1/{path.lstrip('/')}"

    def is_own(self, url: str) -> bool:
        return origin(url) == self._origin

    def _headers(self, url: str, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = dict(extra or {})
        if self.token and self.is_own(url):
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    def send(self, method: str, url: str, *, follow: bool = True, **kw: Any) -> requests.Response:
        """One request with retries on 429/5xx/connection errors; redirects followed by hand."""
        for attempt in range(self.retry.attempts + 1):
            try:
                resp = self._send_once(method, url, follow=follow, **kw)
            except (requests.ConnectionError, requests.Timeout) as exc:
                if attempt >= self.retry.attempts:
                    raise RegistryError(_safe(url), f"cannot reach the registry: {_reason(exc)}") from None
                self.retry.sleep(self.retry.backoff(attempt))
                continue
            if resp.status_code not in RETRY_STATUSES or attempt >= self.retry.attempts:
                return resp
            wait = self.retry.delay(attempt, resp.headers.get("Retry-After"))
            if wait is None:
                return resp
            log.debug("%s %s -> %s, retrying in %.2fs", method, _safe(url), resp.status_code, wait)
            resp.close()
            self.retry.sleep(wait)
        raise AssertionError("unreachable")

    def _send_once(self, method: str, url: str, *, follow: bool, **kw: Any) -> requests.Response:
        headers = kw.pop("headers", None)
        for _ in range(MAX_REDIRECTS + 1):
            resp = self.session.request(method, url, headers=self._headers(url, headers),
                                        allow_redirects=False, timeout=self.timeouts.pair(), **kw)
            log.debug("%s %s -> %s", method, _safe(url), resp.status_code)
            if not (follow and resp.is_redirect):
                return resp
            nxt = urljoin(url, resp.headers["Location"])
            if origin(url)[0] == "https" and origin(nxt)[0] != "https":
                raise RegistryError(_safe(url), "refusing a redirect from https to plain http")
            resp.close()
            url = nxt
        raise RegistryError(_safe(url), f"more than {MAX_REDIRECTS} redirects")

    def get_json(self, path: str, params: Any = None) -> Any:
        url = self.api_url(path)
        return self._json(url, self.send("GET", url, params=params))

    def post_json(self, path: str, body: Any) -> Any:
        url = self.api_url(path)
        return self._json(url, self.send("POST", url, json=body))

    def _json(self, url: str, resp: requests.Response) -> Any:
        if resp.status_code >= 400:
            raise http_error(url, resp)
        ctype = resp.headers.get("Content-Type", "")
        try:
            # Strict JSON: NaN/Infinity (which Python's parser takes) never reach our output.
            return json.loads(resp.content, parse_constant=_not_json)
        except NonStandardJSON:
            raise RegistryError(_safe(url), "registry answered with non-standard JSON (NaN/Infinity)") from None
        except (ValueError, RecursionError):
            kind = "an HTML page" if "html" in ctype else f"{safe(ctype) or 'untyped'} content"
            raise RegistryError(_safe(url), f"registry answered with {kind}, not JSON") from None

    # -- endpoints ----------------------------------------------------------------------

    def model(self, model_id: int) -> dict[str, Any]:
        return self.get_json(f"models/{int(model_id)}")

    def version(self, version_id: int) -> dict[str, Any]:
        return self.get_json(f"model-versions/{int(version_id)}")

    def by_hash(self, digest: str) -> dict[str, Any] | None:
        """The version holding a file with this hash (any type), or None when unknown."""
        try:
            return self.get_json(f"model-versions/by-hash/{digest.upper()}")
        except RegistryError as err:
            if getattr(err, "status", None) == 404:
                return None
            raise

    def by_hashes(self, sha256s: list[str]) -> dict[str, dict[str, Any]]:
        """Batch look-up of full SHA256s: ``{SHA256: version}`` for those found."""
        wanted = [h.upper() for h in sha256s]
        found: dict[str, dict[str, Any]] = {}
        for i in range(0, len(wanted), BATCH_LIMIT):
            chunk = wanted[i : i + BATCH_LIMIT]
            versions = self.post_json("model-versions/by-hash", chunk)
            for version in versions if isinstance(versions, list) else []:
                for f in version.get("files") or []:
                    sha = str((f.get("hashes") or {}).get("SHA256", "")).upper()
                    if sha in chunk:
                        found.setdefault(sha, version)
        return found

    def search(self, params: dict[str, Any], limit: int) -> Iterator[dict[str, Any]]:
        """Models matching ``params``, following ``metadata.nextCursor`` up to ``limit`` items."""
        query = {k: v for k, v in params.items() if v not in (None, "", [])}
        cursor = None
        seen = 0
        while seen < limit:
            page = dict(query, limit=min(100, limit - seen))
            if cursor:
                page["cursor"] = cursor
            data = self.get_json("models", page)
            items = data.get("items") or []
            for item in items[: limit - seen]:
                yield item
                seen += 1
            cursor = (data.get("metadata") or {}).get("nextCursor")
            if not cursor or not items:
                return

    def download_location(self, version_id: int, params: dict[str, Any] | None = None) -> str:
        """Resolve ``/api/download/models/{id}`` to the storage URL (a fresh signature each call)."""
        url = f"{self.base_url}/api/download/models/{int(version_id)}"
        resp = self.send("GET", url, params=params or None, follow=False, stream=True)
        if resp.status_code >= 400:
            raise http_error(url, resp)
        resp.close()
        if resp.is_redirect:
            target = urljoin(resp.url, resp.headers["Location"])
            if self.is_own(target) and "/login" in urlsplit(target).path:
                raise RegistryError(_safe(url), STATUS_MESSAGES[401] + " (redirected to the login page)")
            if origin(url)[0] == "https" and origin(target)[0] != "https":
                raise RegistryError(_safe(url), "refusing a download redirect from https to plain http")
            return target
        if resp.status_code == 200:
            return resp.url  # served directly by the registry itself
        raise http_error(url, resp)


class HTTPRegistryError(RegistryError):
    """A registry error that came with an HTTP status."""

    def __init__(self, path: str, message: str, status: int) -> None:
        super().__init__(path, message)
        self.status = status


def http_error(url: str, resp: requests.Response) -> HTTPRegistryError:
    """Map an error response to one clear line, using the body's message when it has one."""
    status = resp.status_code
    base = STATUS_MESSAGES.get(status, "registry server error" if status >= 500 else "request refused")
    detail = ""
    try:
        body = resp.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        detail = str(body.get("message") or body.get("error") or "")
        if body.get("deadline"):
            detail += f" (early access until {body['deadline']})"
    text = f"HTTP {status}: {base}"
    if detail and detail.lower() not in base.lower():
        text += f" — {safe(detail[:200])}"
    if status in RETRY_STATUSES:
        text += " (gave up after retries)"
    return HTTPRegistryError(_safe(url), text, status)


def _safe(url: str) -> str:
    """A URL fit for messages: no query string (signed URLs carry credentials there)."""
    parts = urlsplit(url)
    return safe(f"{parts.scheme}://{parts.netloc}{parts.path}")


def _reason(exc: Exception) -> str:
    return "connection timed out" if isinstance(exc, requests.Timeout) else "connection failed"


class NonStandardJSON(ValueError):
    """NaN, Infinity or -Infinity in a registry answer."""


def _not_json(constant: str) -> Any:
    raise NonStandardJSON(constant)


def dumps(data: Any) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False)
