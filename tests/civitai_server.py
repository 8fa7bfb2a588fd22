"""A Civitai-compatible test registry: two real HTTP servers on loopback.

* the registry (``http://127.0.0.1:<port>``) serves ``/api/v1/...`` JSON in the documented
  shapes and ``/api/download/models/{id}``, which answers 307 to a signed URL on
* the storage server (``http://localhost:<other port>``), which serves files with Range
  support and must never see the token.

Faults are injected per version (see :class:`Faults`). Every request is recorded with its
headers, and the storage server counts the body bytes it sent.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import re
import socket
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

TOKEN = "tok-S3CRET-9f8e7d6c5b4a39281706"
LOGIN_HTML = b"<!DOCTYPE html><html><head><title>Sign in</title></head><body>Log in</body></html>"


def write_safetensors(path: Path, n_values: int, seed: int = 0, metadata: dict[str, str] | None = None) -> Path:
    """A real (tiny) LoRA-shaped safetensors file: one F32 down/up pair, deterministic data."""
    rank = 4
    cols = max(1, n_values // (2 * rank))
    header: dict[str, Any] = {"__metadata__": metadata or {"ss_network_dim": "4"}}
    nbytes = rank * cols * 4
    header["lora_unet_x.lora_down.weight"] = {"dtype": "F32", "shape": [rank, cols], "data_offsets": [0, nbytes]}
    header["lora_unet_x.lora_up.weight"] = {"dtype": "F32", "shape": [cols, rank],
                                            "data_offsets": [nbytes, 2 * nbytes]}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    rng = random.Random(seed)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        left = 2 * nbytes
        while left:
            n = min(left, 1 << 20)
            fh.write(rng.randbytes(n))
            left -= n
    return path


def tiny_png() -> bytes:
    """A valid 1x1 PNG."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00")) + chunk(b"IEND", b"")


_HASH_CACHE: dict[tuple[str, int, int], dict[str, str]] = {}


def file_hashes(path: Path) -> dict[str, str]:
    """Civitai hashes computed independently of loratool (hashlib; cached per file state)."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _HASH_CACHE:
        _HASH_CACHE[key] = _compute_hashes(path)
    return dict(_HASH_CACHE[key])


def _compute_hashes(path: Path) -> dict[str, str]:
    whole = hashlib.sha256()
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        fh.seek(0)
        while block := fh.read(1 << 22):
            whole.update(block)
        tail = hashlib.sha256()
        fh.seek(8 + n if n < 16 * 1024 * 1024 else 8)
        while block := fh.read(1 << 22):
            tail.update(block)
    sha = whole.hexdigest().upper()
    return {"AutoV2": sha[:10], "AutoV3": tail.hexdigest().upper()[:12], "SHA256": sha}


@dataclass
class Faults:
    """What a version's download does wrong. Counters count down as faults fire."""

    api_429: int = 0            # download endpoint answers 429 + Retry-After this many times
    retry_after: str = "0"
    storage_500: int = 0        # storage answers 500 this many times
    drop_at: float | None = None  # storage closes the connection after this fraction of the body
    drops: int = 0              # ... this many times
    stall_at: float | None = None  # storage goes silent after this fraction ...
    stall_seconds: float = 0.0  # ... for this long, then closes
    stalls: int = 0
    html: bool = False          # storage answers 200 with an HTML login page
    html_as_binary: bool = False  # ... labelled application/octet-stream
    ignore_range: bool = False  # storage always answers 200 with the whole file
    login_redirect: bool = False  # download endpoint redirects to /login?reason=download-auth
    require_auth: bool = False
    status: int | None = None   # download endpoint answers this status (403, 404, 410)
    message: str | None = None  # ... with this "message" in its JSON body


@dataclass
class Version:
    id: int
    model_id: int
    path: Path
    name: str = "v1.0"
    file_name: str | None = None
    base_model: str = "SDXL 1.0"
    hashes: dict[str, str] | None = None  # override what the API lists
    faults: Faults = field(default_factory=Faults)
    fmt: str = "SafeTensor"
    extra_files: list[dict[str, Any]] = field(default_factory=list)
    scan: str = "Success"
    list_name: bool = True  # False: files[].name is empty; only Content-Disposition names it


@dataclass
class Record:
    server: str
    method: str
    target: str
    headers: dict[str, str]
    body_bytes: int = 0


class CivitaiTestServer:
    """Start with ``with CivitaiTestServer() as reg:``; add models with :meth:`add_model`."""

    def __init__(self, page_cap: int = 100) -> None:
        self.page_cap = page_cap
        self.models: dict[int, dict[str, Any]] = {}
        self.versions: dict[int, Version] = {}
        self.records: list[Record] = []
        self.signatures: dict[str, int] = {}
        self._sig = itertools.count(1)
        self._lock = threading.Lock()
        self.api = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, "api"))
        self.storage = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, "storage"))
        for srv in (self.api, self.storage):
            srv.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.api.server_address[1]}"
        self.storage_url = f"http://localhost:{self.storage.server_address[1]}"

    def __enter__(self) -> CivitaiTestServer:
        for srv in (self.api, self.storage):
            threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        for srv in (self.api, self.storage):
            srv.shutdown()
            srv.server_close()

    # -- fixture data -------------------------------------------------------------------

    def add_model(self, model_id: int, name: str, versions: list[Version], type_: str = "LORA",
                  tags: tuple[str, ...] = ("style",), creator: str = "tester") -> None:
        for v in versions:
            self.versions[v.id] = v
        self.models[model_id] = {
            "id": model_id, "name": name, "description": f"<p>{name}</p>", "type": type_,
            "nsfw": False, "nsfwLevel": 1, "availability": "Public", "supportsGeneration": False,
            "allowNoCredit": True, "allowCommercialUse": ["Image"], "allowDerivatives": True,
            "allowDifferentLicense": True, "minor": False, "poi": False, "sfwOnly": False,
            "stats": {"downloadCount": 1000 + model_id, "thumbsUpCount": 50, "thumbsDownCount": 1,
                      "commentCount": 3, "tippedAmountCount": 0},
            "creator": {"username": creator, "image": None}, "tags": list(tags),
            "_versions": [v.id for v in versions],
        }

    def model_json(self, model_id: int) -> dict[str, Any]:
        m = dict(self.models[model_id])
        vids = m.pop("_versions")
        m["modelVersions"] = [self.version_json(v, embedded=True) for v in vids]
        return m

    def version_json(self, vid: int, embedded: bool = False) -> dict[str, Any]:
        v = self.versions[vid]
        model = self.models[v.model_id]
        size = v.path.stat().st_size
        hashes = file_hashes(v.path) if v.hashes is None else v.hashes
        primary = {
            "id": vid * 10, "sizeKB": size / 1024, "name": (v.file_name or v.path.name) if v.list_name else "",
            "type": "Model",
            "pickleScanResult": v.scan, "pickleScanMessage": "No Pickle imports", "virusScanResult": v.scan,
            "virusScanMessage": None, "scannedAt": "2026-01-02T03:04:05.000Z",
            "metadata": {"format": v.fmt, "size": "pruned", "fp": "fp16"},
            "hashes": hashes, "primary": True,
            "downloadUrl": f"{self.url}/api/download/models/{vid}",
        }
        out: dict[str, Any] = {
            "id": vid, "modelId": v.model_id, "name": v.name, "baseModel": v.base_model,
            "baseModelType": "Standard", "air": f"urn:air:sdxl:lora:civitai:{v.model_id}@{vid}",
            "status": "Published", "availability": "Public", "nsfwLevel": 1,
            "createdAt": "2026-01-01T00:00:00.000Z", "updatedAt": "2026-01-02T00:00:00.000Z",
            "publishedAt": "2026-01-02T00:00:00.000Z", "trainedWords": [f"{model['name'].split()[0].lower()}_style"],
            "description": "<p>first release</p>", "uploadType": "Created", "usageControl": "Download",
            "stats": {"downloadCount": 10, "thumbsUpCount": 5, "thumbsDownCount": 0},
            "files": [primary, *v.extra_files],
            "images": [{"url": f"{self.storage_url}/images/{vid}.png", "nsfwLevel": 1, "width": 1,
                        "height": 1, "hash": "U00000fQfQfQfQfQfQfQfQfQfQfQ", "type": "image"}],
            "downloadUrl": f"{self.url}/api/download/models/{vid}",
        }
        if not embedded:
            out["model"] = {"name": model["name"], "type": model["type"], "nsfw": False, "poi": False}
        return out

    # -- helpers for tests --------------------------------------------------------------

    def seen(self, server: str) -> list[Record]:
        with self._lock:
            return [r for r in self.records if r.server == server]

    def storage_bytes(self) -> int:
        return sum(r.body_bytes for r in self.seen("storage"))

    def record(self, rec: Record) -> None:
        with self._lock:
            self.records.append(rec)

    def sign(self, vid: int) -> str:
        with self._lock:
            sig = f"sig{next(self._sig)}x{int(time.time())}"
            self.signatures[sig] = vid
        return sig

    def redeem(self, sig: str) -> int | None:
        """Signatures are single-use here, so a resumed download must ask for a fresh one."""
        with self._lock:
            return self.signatures.pop(sig, None)


def _handler(reg: CivitaiTestServer, role: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "civitai-test/1"

        def log_message(self, *args: Any) -> None:
            pass

        def _dispatch(self, method: str) -> None:
            self.rec = Record(role, method, self.path, {k: v for k, v in self.headers.items()})
            reg.record(self.rec)
            parts = urlsplit(self.path)
            self.query = parse_qs(parts.query)
            routes = API_ROUTES if role == "api" else STORAGE_ROUTES
            for (verb, pattern), fn in routes.items():
                m = re.fullmatch(pattern, parts.path)
                if verb == method and m:
                    fn(self, reg, *m.groups())
                    return
            self.send_json(404, {"error": "Not found"})

        def do_GET(self) -> None:
            self._dispatch("GET")

        def do_POST(self) -> None:
            self._dispatch("POST")

        def send_json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def send_bytes(self, status: int, data: bytes, ctype: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            self.rec.body_bytes += len(data)

        def authorised(self) -> bool:
            return self.headers.get("Authorization") == f"Bearer {TOKEN}"

    return Handler


# -- registry routes ----------------------------------------------------------------------

def _models(h: Any, reg: CivitaiTestServer) -> None:
    q = h.query
    text = (q.get("query") or [""])[0].lower()
    types = {t for v in q.get("types", []) for t in v.split(",")}
    bases = set(q.get("baseModels", []))
    items = []
    for mid in sorted(reg.models):
        m = reg.model_json(mid)
        if text and text not in m["name"].lower():
            continue
        if types and m["type"] not in types:
            continue
        if bases and not any(v["baseModel"] in bases for v in m["modelVersions"]):
            continue
        items.append(m)
    if (q.get("sort") or [""])[0] == "Most Downloaded":
        items.sort(key=lambda m: -m["stats"]["downloadCount"])
    start = int((q.get("cursor") or ["0"])[0])
    limit = min(int((q.get("limit") or ["100"])[0]), reg.page_cap)
    page = items[start : start + limit]
    nxt = start + limit if start + limit < len(items) else None
    meta = {"nextCursor": str(nxt) if nxt else None}
    if nxt:
        meta["nextPage"] = f"{reg.url}/api/v1/models?cursor={nxt}&limit={limit}"
    h.send_json(200, {"items": page, "metadata": meta})


def _model(h: Any, reg: CivitaiTestServer, mid: str) -> None:
    if int(mid) not in reg.models:
        h.send_json(404, {"error": f"No model with id {mid}"})
        return
    h.send_json(200, reg.model_json(int(mid)), {"Cache-Control": "public, s-maxage=300"})


def _version(h: Any, reg: CivitaiTestServer, vid: str) -> None:
    if int(vid) not in reg.versions:
        h.send_json(404, {"error": "Version not found"})
        return
    h.send_json(200, reg.version_json(int(vid)))


def _by_hash(h: Any, reg: CivitaiTestServer, digest: str) -> None:
    digest = digest.upper()
    for vid in sorted(reg.versions):
        body = reg.version_json(vid)
        if any(digest in (f.get("hashes") or {}).values() for f in body["files"]):
            h.send_json(200, body)
            return
    h.send_json(404, {"error": "Model not found"})


def _by_hash_batch(h: Any, reg: CivitaiTestServer) -> None:
    length = int(h.headers.get("Content-Length", "0"))
    wanted = json.loads(h.rfile.read(length) or b"[]")
    if not isinstance(wanted, list) or len(wanted) > 100 or not all(
            isinstance(x, str) and len(x) == 64 for x in wanted):
        h.send_json(400, {"error": "Expected an array of up to 100 SHA256 hashes"})
        return
    wanted = {x.upper() for x in wanted}
    out = [reg.version_json(vid) for vid in sorted(reg.versions)
           if any((f.get("hashes") or {}).get("SHA256") in wanted for f in reg.version_json(vid)["files"])]
    h.send_json(200, out)


def _download(h: Any, reg: CivitaiTestServer, vid: str) -> None:
    v = reg.versions.get(int(vid))
    if v is None:
        h.send_json(404, {"error": "File not found"})
        return
    f = v.faults
    if f.login_redirect:
        h.send_response(307)
        h.send_header("Location", f"/login?returnUrl=/model-versions/{vid}&reason=download-auth")
        h.send_header("Content-Length", "0")
        h.end_headers()
        return
    if f.require_auth and not h.authorised():
        h.send_json(401, {"error": "Unauthorized",
                          "message": "The creator of this asset requires you to be logged in to download it"})
        return
    if f.status:
        body = {403: {"error": "Early Access", "deadline": "2026-12-31T00:00:00.000Z",
                      "message": "This asset is in Early Access"},
                410: {"error": "Model archived, not available for download"}}.get(f.status,
                                                                                  {"error": "File not found"})
        if f.message is not None:
            body = {**body, "message": f.message}
        h.send_json(f.status, body)
        return
    if f.api_429 > 0:
        f.api_429 -= 1
        h.send_json(429, {"error": "We've noticed an unusual amount of downloading"},
                    {"Retry-After": f.retry_after})
        return
    h.send_response(307)
    h.send_header("Location", f"{reg.storage_url}/files/{vid}?sig={reg.sign(int(vid))}")
    h.send_header("Cache-Control", "no-store")
    h.send_header("Content-Length", "0")
    h.end_headers()


def _moved(h: Any, reg: CivitaiTestServer, mid: str) -> None:
    """An API answer that redirects to another host (which must not get the token)."""
    h.send_response(302)
    h.send_header("Location", f"{reg.storage_url}/api/v1/models/{mid}")
    h.send_header("Content-Length", "0")
    h.end_headers()


def _login(h: Any, reg: CivitaiTestServer) -> None:
    h.send_bytes(200, LOGIN_HTML, "text/html; charset=utf-8")


API_ROUTES = {
    ("GET", r"/api/v1/models"): _models,
    ("GET", r"/api/v1/models/(\d+)"): _model,
    ("GET", r"/api/v1/model-versions/(\d+)"): _version,
    ("GET", r"/api/v1/model-versions/by-hash/([0-9A-Za-z]+)"): _by_hash,
    ("POST", r"/api/v1/model-versions/by-hash"): _by_hash_batch,
    ("GET", r"/api/download/models/(\d+)"): _download,
    ("GET", r"/login"): _login,
    ("GET", r"/api/v1/moved/(\d+)"): _moved,
}


# -- storage routes -----------------------------------------------------------------------

def _file(h: Any, reg: CivitaiTestServer, vid: str) -> None:
    sig = (h.query.get("sig") or [""])[0]
    if reg.redeem(sig) != int(vid):
        h.send_bytes(403, b"<Error><Code>AccessDenied</Code></Error>", "application/xml")
        return
    v = reg.versions[int(vid)]
    f = v.faults
    if f.storage_500 > 0:
        f.storage_500 -= 1
        h.send_json(500, {"error": "internal"})
        return
    if f.html or f.html_as_binary:
        h.send_bytes(200, LOGIN_HTML, "application/octet-stream" if f.html_as_binary else "text/html")
        return
    size = v.path.stat().st_size
    start = 0
    m = re.fullmatch(r"bytes=(\d+)-", h.headers.get("Range", ""))
    if m and not f.ignore_range:
        start = int(m.group(1))
        if start >= size:
            h.send_response(416)
            h.send_header("Content-Range", f"bytes */{size}")
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
    h.send_response(206 if start else 200)
    h.send_header("Content-Type", "application/octet-stream")
    h.send_header("Content-Length", str(size - start))
    h.send_header("Accept-Ranges", "bytes")
    raw_name = (v.file_name or v.path.name).encode("utf-8").decode("latin-1")  # raw UTF-8, as Civitai sends
    h.send_header("Content-Disposition", f'attachment; filename="{raw_name}"')
    if start:
        h.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
    h.end_headers()
    h.wfile.flush()
    count = size - start
    cut = None
    if f.drops > 0 and f.drop_at is not None:
        f.drops -= 1
        cut = int(size * f.drop_at) - start
    elif f.stalls > 0 and f.stall_at is not None:
        f.stalls -= 1
        cut = int(size * f.stall_at) - start
    if cut is not None and 0 < cut < count:
        count = cut
    with open(v.path, "rb") as fh:
        sent = h.connection.sendfile(fh, start, count)
    h.rec.body_bytes += sent
    if count < size - start:  # the injected fault: go silent, then hang up mid-body
        if f.stall_at is not None and f.drop_at is None:
            time.sleep(f.stall_seconds)
        h.close_connection = True
        h.connection.shutdown(socket.SHUT_RDWR)


def _image(h: Any, reg: CivitaiTestServer, vid: str) -> None:
    h.send_bytes(200, tiny_png(), "image/png")


STORAGE_ROUTES = {
    ("GET", r"/api/v1/models/(\d+)"): _model,  # the target of /api/v1/moved/<id>
    ("GET", r"/files/(\d+)"): _file,
    ("GET", r"/images/(\d+)\.png"): _image,
}
