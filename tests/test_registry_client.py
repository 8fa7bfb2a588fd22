"""Registry client pieces: paging, by-hash, config precedence, targets, file choice, names."""

from __future__ import annotations

import email.utils
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from loratool.errors import RegistryError, UsageError
from loratool.io.hashing import compute_hashes
from loratool.registry import RegistryClient, RetryPolicy, lookup_files
from loratool.registry import config as cfg
from loratool.registry.files import (
    FileChoice,
    filename_from_disposition,
    sanitize_filename,
    select_file,
)
from loratool.registry.retry import parse_retry_after
from loratool.registry.targets import parse_target
from tests.civitai_server import TOKEN, CivitaiTestServer, Version, write_safetensors

FAST = RetryPolicy(attempts=2, base=0.01, cap=0.02)


@pytest.fixture
def reg(tmp_path: Path) -> Iterator[CivitaiTestServer]:
    with CivitaiTestServer(page_cap=2) as server:
        for i in range(1, 6):
            src = write_safetensors(tmp_path / f"style{i}.safetensors", 4000 + i, seed=i)
            server.add_model(i, f"Style {i}", [Version(i * 10, i, src, base_model="SD 1.5" if i % 2 else "SDXL 1.0")])
        yield server


def client(reg: CivitaiTestServer) -> RegistryClient:
    return RegistryClient(reg.url, TOKEN, retry=FAST)


def test_search_follows_cursors_up_to_limit(reg: CivitaiTestServer) -> None:
    items = list(client(reg).search({"query": "style"}, limit=5))
    assert [m["id"] for m in items] == [1, 2, 3, 4, 5]
    pages = [r.target for r in reg.seen("api") if r.target.startswith("/api/v1/models?")]
    assert len(pages) == 3 and "cursor=2" in pages[1] and "cursor=4" in pages[2]
    assert len(list(client(reg).search({"query": "style"}, limit=3))) == 3


def test_search_filters_reach_the_server(reg: CivitaiTestServer) -> None:
    items = list(client(reg).search({"query": "style", "baseModels": ["SDXL 1.0"], "types": ["LORA"]}, 10))
    assert [m["id"] for m in items] == [2, 4]


def test_by_hash_single_sha256_and_autov3_prefix(reg: CivitaiTestServer, tmp_path: Path) -> None:
    h = compute_hashes(tmp_path / "style3.safetensors")
    c = client(reg)
    assert c.by_hash(h.sha256)["id"] == 30
    assert c.by_hash(h.autov3 or "")["id"] == 30
    assert c.by_hash("0" * 64) is None


def test_by_hashes_batches_post(reg: CivitaiTestServer, tmp_path: Path) -> None:
    hashes = [compute_hashes(tmp_path / f"style{i}.safetensors").sha256 for i in (1, 4)]
    found = client(reg).by_hashes([*hashes, "F" * 64])
    assert {k: v["id"] for k, v in found.items()} == {hashes[0]: 10, hashes[1]: 40}
    assert [r.method for r in reg.seen("api")] == ["POST"]


def test_lookup_falls_back_to_autov3_for_an_edited_header(reg: CivitaiTestServer, tmp_path: Path) -> None:
    edited = write_safetensors(tmp_path / "renamed.safetensors", 4002, seed=2, metadata={"ss_output_name": "mine"})
    results = lookup_files(client(reg), [tmp_path / "style1.safetensors", edited, tmp_path / "missing.safetensors"])
    assert [(r.matched_by, (r.version or {}).get("id")) for r in results] == [("sha256", 10), ("autov3", 20),
                                                                                (None, None)]
    assert results[2].error == "no such file"


def test_errors_map_to_one_line_and_5xx_are_bounded(reg: CivitaiTestServer) -> None:
    with pytest.raises(RegistryError, match="HTTP 404: not found — No model with id 99"):
        client(reg).model(99)
    dead = RegistryClient("http://127.0.0.1:9", None, retry=FAST)  # discard port: nothing listens
    with pytest.raises(RegistryError, match="cannot reach the registry"):
        dead.model(1)


def test_api_redirect_to_another_host_drops_the_token(reg: CivitaiTestServer) -> None:
    assert client(reg).get_json("moved/3")["id"] == 3
    (api,) = [r for r in reg.seen("api") if r.target == "/api/v1/moved/3"]
    (other,) = reg.seen("storage")
    assert api.headers["Authorization"] == f"Bearer {TOKEN}"
    assert "Authorization" not in other.headers and other.target == "/api/v1/models/3"


def test_token_header_only_on_own_origin() -> None:
    c = RegistryClient("https://civitai.com", "secret")
    assert c._headers("https://civitai.com/api/v1/models") == {"Authorization": "Bearer secret"}
    assert c._headers("https://storage.example/file") == {}
    assert c._headers("http://civitai.com/api/v1/models") == {}  # no downgrade
    assert "secret" not in repr(c)


def test_retry_after_parsing() -> None:
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past: no wait
    soon = email.utils.formatdate(time.time() + 40, usegmt=True)  # an HTTP date 40 s ahead
    assert 30 <= (parse_retry_after(soon) or -1) <= 41
    assert RetryPolicy(max_retry_after=10).delay(0, "60") is None
    assert RetryPolicy(base=0.01).delay(0, "2") == 2.0


# -- config ---------------------------------------------------------------------------------

@pytest.fixture
def xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    for env in ("LORATOOL_REGISTRY", "CIVITAI_API_TOKEN", "LORATOOL_TOKEN"):
        monkeypatch.delenv(env, raising=False)
    return tmp_path / "xdg" / "loratool" / "config.yaml"


def test_config_precedence(xdg: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert cfg.resolve().url == "https://civitai.com" and cfg.resolve().token is None
    data = cfg.set_value({}, "registries.mirror.url", "https://mirror.example/")
    data = cfg.set_value(data, "registries.mirror.token", "cfgtoken")
    data = cfg.set_value(data, "default", "mirror")
    cfg.save_config(data)
    assert xdg.stat().st_mode & 0o077 == 0  # tokens inside: owner only
    s = cfg.resolve()
    assert (s.url, s.name, s.token, s.token_source) == ("https://mirror.example", "mirror", "cfgtoken", "config")
    monkeypatch.setenv("LORATOOL_REGISTRY", "https://other.example")
    monkeypatch.setenv("CIVITAI_API_TOKEN", "civitaikey")
    s = cfg.resolve()
    assert (s.url, s.token) == ("https://other.example", None)  # a Civitai key never goes elsewhere
    assert cfg.resolve("https://civitai.com").token == "civitaikey"
    assert cfg.resolve("https://civitai.red").token_source == "CIVITAI_API_TOKEN"
    monkeypatch.setenv("LORATOOL_TOKEN", "envtoken")
    s = cfg.resolve()
    assert (s.url, s.token, s.url_source) == ("https://other.example", "envtoken", "LORATOOL_REGISTRY")
    s = cfg.resolve("mirror", "flagtoken")
    assert (s.url, s.token, s.token_source) == ("https://mirror.example", "flagtoken", "--token")
    assert "flagtoken" not in repr(s)


def test_config_rejects_bad_input(xdg: Path) -> None:
    with pytest.raises(UsageError, match="unknown config key"):
        cfg.set_value({}, "registries.x.password", "p")
    with pytest.raises(UsageError, match="http"):
        cfg.resolve("ftp://x")
    with pytest.raises(UsageError, match="no registry of that name"):
        cfg.resolve("nosuch")
    xdg.parent.mkdir(parents=True)
    xdg.write_text("- a list\n")
    with pytest.raises(UsageError, match="mapping"):
        cfg.load_config()


# -- targets, file choice, names ------------------------------------------------------------

@pytest.mark.parametrize(("ref", "version", "expected"), [
    ("123", None, (123, None)),
    (None, 45, (None, 45)),
    ("https://civitai.com/models/123/some-slug", None, (123, None)),
    ("https://civitai.com/models/123?modelVersionId=456", None, (123, 456)),
    ("https://civitai.com/api/download/models/456", None, (None, 456)),
    ("https://civitai.com/api/v1/model-versions/456", None, (None, 456)),
])
def test_parse_target(ref: str | None, version: int | None, expected: tuple[int | None, int | None]) -> None:
    t = parse_target(ref, version)
    assert (t.model_id, t.version_id) == expected


@pytest.mark.parametrize("ref", ["abc", "https://civitai.com/user/x", "file:///etc/passwd"])
def test_parse_target_rejects(ref: str) -> None:
    with pytest.raises(UsageError):
        parse_target(ref, None)


VERSION = {"id": 7, "files": [
    {"id": 1, "name": "data.zip", "type": "Training Data", "primary": False, "metadata": {}},
    {"id": 2, "name": "a_fp32.safetensors", "type": "Model", "primary": False,
     "metadata": {"format": "SafeTensor", "fp": "fp32"}},
    {"id": 3, "name": "a.safetensors", "type": "Model", "primary": True,
     "metadata": {"format": "SafeTensor", "fp": "fp16"}},
]}


def test_select_file_prefers_primary_model_never_training_data() -> None:
    assert select_file(VERSION, FileChoice())["id"] == 3
    assert select_file(VERSION, FileChoice(fp="FP32"))["id"] == 2
    assert select_file(VERSION, FileChoice(file_type="Training Data"))["id"] == 1
    with pytest.raises(RegistryError, match="a.safetensors"):
        select_file(VERSION, FileChoice(format="GGUF"))


@pytest.mark.parametrize(("raw", "safe"), [
    ("../../evil.safetensors", "evil.safetensors"),
    ("..\\..\\evil.safetensors", "evil.safetensors"),
    ("/abs/path/x.safetensors", "x.safetensors"),
    ("a\x00b\x07c.safetensors", "abc.safetensors"),
    ("red\x1b[31mtext\x1b[0m.safetensors", "redtext.safetensors"),  # CSI sequences, whole
    ("\x1b]0;owned\x07title.safetensors", "title.safetensors"),  # OSC (window title) ended by BEL
    ("\x1b]8;;http://evil.example\x1b\\link\x1b]8;;\x1b\\.safetensors", "link.safetensors"),  # OSC 8 hyperlink
    ("c1\x9b31mx\x85y.safetensors", "c1xy.safetensors"),  # 8-bit CSI and NEL
    ("photo\u202egnp.safetensors", "photognp.safetensors"),  # right-to-left override
    ("a\u2066b\u2069\u200fc\u2028d.safetensors", "abcd.safetensors"),  # isolates, RLM, line separator
    ("Ünïcode ✓ 日本.safetensors", "Ünïcode ✓ 日本.safetensors"),  # ordinary text is kept
    ("CON.safetensors", "_CON.safetensors"),
    ("aux.v2.safetensors", "_aux.v2.safetensors"),
    ("...hidden.safetensors", "hidden.safetensors"),
    ("name$ (1).safetensors", "name$ (1).safetensors"),
    ("x" * 400 + ".safetensors", "x" * 228 + ".safetensors"),
])
def test_sanitize_filename(raw: str, safe: str) -> None:
    assert sanitize_filename(raw) == safe


@pytest.mark.parametrize("raw", ["..", "", "evil.sh", "/", ".safetensors"])
def test_sanitize_filename_refuses(raw: str) -> None:
    with pytest.raises(RegistryError):
        sanitize_filename(raw)


@pytest.mark.parametrize(("header", "name"), [
    ('attachment; filename="plain.safetensors"', "plain.safetensors"),
    ("attachment; filename*=UTF-8''na%C3%AFve%20v2.safetensors; filename=\"x\"", "naïve v2.safetensors"),
    ('attachment; filename="caf\xc3\xa9.safetensors"', "café.safetensors"),  # UTF-8 read as Latin-1
    ("inline", None),
])
def test_filename_from_disposition(header: str, name: str | None) -> None:
    assert filename_from_disposition(header) == name


def test_registry_code_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = ("import sys, loratool.cli.registry_cmds, loratool.registry, loratool.io.hashing; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
