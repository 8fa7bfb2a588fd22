"""The downloader against the loopback test registry: every fault, asserted on disk."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from loratool.errors import RegistryError, UsageError
from loratool.registry import (
    FetchOptions,
    RegistryClient,
    RetryPolicy,
    Timeouts,
    fetch_version,
    resolve_version,
)
from loratool.registry.targets import Target
from tests.civitai_server import (
    TOKEN,
    CivitaiTestServer,
    Faults,
    Version,
    tiny_png,
    write_safetensors,
)

FAST = RetryPolicy(attempts=3, base=0.01, cap=0.05)


@pytest.fixture
def reg() -> Iterator[CivitaiTestServer]:
    with CivitaiTestServer() as server:
        yield server
    # Whatever a test did: the storage host never saw the token, and no URL carried it.
    assert not [r for r in server.seen("storage") if "Authorization" in r.headers]
    assert not [r for r in server.records if TOKEN in r.target]


def add(reg: CivitaiTestServer, tmp_path: Path, vid: int = 1, n: int = 200_000, **kw: object) -> Path:
    src = tmp_path / "src" / f"lora_{vid}.safetensors"
    src.parent.mkdir(exist_ok=True)
    write_safetensors(src, n, seed=vid)
    reg.add_model(vid * 100, f"Model {vid}", [Version(vid, vid * 100, src, **kw)])  # type: ignore[arg-type]
    return src


def fetch(reg: CivitaiTestServer, dest: Path, vid: int = 1, token: str | None = TOKEN,
          retry: RetryPolicy = FAST, stall: float = 5.0, **opts: object):  # noqa: ANN201
    client = RegistryClient(reg.url, token, retry=retry, timeouts=Timeouts(connect=2, stall=stall))
    version = resolve_version(client, Target(version_id=vid))
    return fetch_version(client, version, dest, FetchOptions(**opts))  # type: ignore[arg-type]


def listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def test_fetch_saves_verified_file_and_info_sidecar(reg: CivitaiTestServer, tmp_path: Path) -> None:
    src = add(reg, tmp_path)
    out = tmp_path / "out"
    res = fetch(reg, out)
    assert (out / src.name).read_bytes() == src.read_bytes()
    assert res.status == "downloaded" and res.sha256 == hashlib.sha256(src.read_bytes()).hexdigest().upper()
    info = json.loads((out / "lora_1.civitai.info").read_text())
    assert info == reg.version_json(1)
    assert listing(out) == ["lora_1.civitai.info", "lora_1.safetensors"]  # no .part, no temp files


def test_token_goes_to_the_registry_only_never_across_the_307(reg: CivitaiTestServer, tmp_path: Path) -> None:
    add(reg, tmp_path, faults=Faults(require_auth=True))
    fetch(reg, tmp_path / "out")
    api = [r for r in reg.seen("api") if r.target.startswith("/api/download/")]
    storage = reg.seen("storage")
    assert api and all(r.headers.get("Authorization") == f"Bearer {TOKEN}" for r in api)
    assert storage and all("Authorization" not in r.headers for r in storage)
    assert all(r.headers["Host"].startswith("localhost:") for r in storage)  # the other host


def test_401_without_token_leaves_nothing(reg: CivitaiTestServer, tmp_path: Path) -> None:
    add(reg, tmp_path, faults=Faults(require_auth=True))
    with pytest.raises(RegistryError, match="401: unauthorized"):
        fetch(reg, tmp_path / "out", token=None)
    assert listing(tmp_path / "out") == []


def test_login_redirect_is_reported_as_auth_failure(reg: CivitaiTestServer, tmp_path: Path) -> None:
    add(reg, tmp_path, faults=Faults(login_redirect=True))
    with pytest.raises(RegistryError, match="login page"):
        fetch(reg, tmp_path / "out")
    assert listing(tmp_path / "out") == []
    assert not reg.seen("storage")


@pytest.mark.parametrize(("status", "message"), [(403, "early access until 2026-12-31"), (404, "not found"),
                                                 (410, "archived")])
def test_http_errors_are_one_clear_line(reg: CivitaiTestServer, tmp_path: Path, status: int, message: str) -> None:
    add(reg, tmp_path, faults=Faults(status=status))
    with pytest.raises(RegistryError, match=message):
        fetch(reg, tmp_path / "out")
    assert listing(tmp_path / "out") == []


def test_429_with_retry_after_is_honoured_then_succeeds(reg: CivitaiTestServer, tmp_path: Path) -> None:
    src = add(reg, tmp_path, faults=Faults(api_429=1, retry_after="1"))
    t0 = time.monotonic()
    fetch(reg, tmp_path / "out")
    assert time.monotonic() - t0 >= 1.0  # waited as asked, although backoff is 10 ms here
    assert (tmp_path / "out" / src.name).read_bytes() == src.read_bytes()
    assert len([r for r in reg.seen("api") if r.target.startswith("/api/download/")]) == 2


def test_500s_are_retried_then_succeed(reg: CivitaiTestServer, tmp_path: Path) -> None:
    src = add(reg, tmp_path, faults=Faults(storage_500=2))
    fetch(reg, tmp_path / "out")
    assert (tmp_path / "out" / src.name).read_bytes() == src.read_bytes()
    assert len(reg.seen("storage")) == 3


def test_retries_are_bounded(reg: CivitaiTestServer, tmp_path: Path) -> None:
    add(reg, tmp_path, faults=Faults(storage_500=50))
    with pytest.raises(RegistryError, match="gave up after"):
        fetch(reg, tmp_path / "out", retry=RetryPolicy(attempts=2, base=0.01, cap=0.02))
    assert len(reg.seen("storage")) == 3
    assert listing(tmp_path / "out") == []  # no final file and no empty .part


def test_dropped_connection_resumes_with_range_and_a_fresh_url(reg: CivitaiTestServer, tmp_path: Path) -> None:
    src = add(reg, tmp_path, faults=Faults(drop_at=0.5, drops=1))
    size = src.stat().st_size
    fetch(reg, tmp_path / "out")
    assert (tmp_path / "out" / src.name).read_bytes() == src.read_bytes()
    first, second = reg.seen("storage")
    assert first.body_bytes == size // 2
    assert second.headers["Range"] == f"bytes={size // 2}-"
    assert reg.storage_bytes() == size  # only the missing half moved again
    assert first.target != second.target  # a new signed URL for the resume
    assert listing(tmp_path / "out") == ["lora_1.civitai.info", "lora_1.safetensors"]


def test_interrupted_download_keeps_part_and_resumes_next_run(reg: CivitaiTestServer, tmp_path: Path) -> None:
    src = add(reg, tmp_path, faults=Faults(drop_at=0.5, drops=1))
    size, out = src.stat().st_size, tmp_path / "out"
    with pytest.raises(RegistryError, match="dropped mid-download.*kept in lora_1.safetensors.part"):
        fetch(reg, out, retry=RetryPolicy(attempts=0, base=0.01))
    assert listing(out) == ["lora_1.safetensors.part"]  # nothing under the final name
    assert (out / "lora_1.safetensors.part").read_bytes() == src.read_bytes()[: size // 2]
    before = reg.storage_bytes()
    fetch(reg, out)
    assert reg.storage_bytes() - before == size - size // 2
    assert (out / src.name).read_bytes() == src.read_bytes()
    assert not (out / "lora_1.safetensors.part").exists()


def test_stalled_connection_times_out_and_resumes(reg: CivitaiTestServer, tmp_path: Path) -> None:
    src = add(reg, tmp_path, faults=Faults(stall_at=0.3, stall_seconds=3, stalls=1))
    t0 = time.monotonic()
    fetch(reg, tmp_path / "out", stall=0.4)
    assert time.monotonic() - t0 < 2.5
    assert (tmp_path / "out" / src.name).read_bytes() == src.read_bytes()


def test_range_ignored_restarts_instead_of_appending(reg: CivitaiTestServer, tmp_path: Path) -> None:
    src = add(reg, tmp_path, faults=Faults(ignore_range=True))
    out = tmp_path / "out"
    out.mkdir()
    (out / "lora_1.safetensors.part").write_bytes(src.read_bytes()[:5000])
    fetch(reg, out)
    assert (out / src.name).read_bytes() == src.read_bytes()


def test_416_on_a_complete_part_finishes_without_transfer(reg: CivitaiTestServer, tmp_path: Path) -> None:
    src = add(reg, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "lora_1.safetensors.part").write_bytes(src.read_bytes())
    res = fetch(reg, out)
    assert res.transferred == 0 and reg.storage_bytes() == 0
    assert (out / src.name).read_bytes() == src.read_bytes()


def test_wrong_hash_deletes_the_download_and_names_both(reg: CivitaiTestServer, tmp_path: Path) -> None:
    src = add(reg, tmp_path, hashes={"SHA256": "AB" * 32, "AutoV2": "ABABABABAB"})
    actual = hashlib.sha256(src.read_bytes()).hexdigest().upper()
    with pytest.raises(RegistryError, match=f"registry lists {'AB' * 32}, downloaded file has {actual}"):
        fetch(reg, tmp_path / "out")
    assert listing(tmp_path / "out") == []


@pytest.mark.parametrize("fault", [Faults(html=True), Faults(html_as_binary=True)])
def test_html_login_page_is_never_saved(reg: CivitaiTestServer, tmp_path: Path, fault: Faults) -> None:
    add(reg, tmp_path, faults=fault)
    with pytest.raises(RegistryError, match="text/html instead of the model|not a safetensors file"):
        fetch(reg, tmp_path / "out")
    assert listing(tmp_path / "out") == []


@pytest.mark.parametrize("name", ["../../evil.safetensors", "..\\..\\evil.safetensors", "/etc/evil.safetensors"])
def test_traversal_filename_stays_inside_dir(reg: CivitaiTestServer, tmp_path: Path, name: str) -> None:
    src = add(reg, tmp_path, file_name=name)
    out = tmp_path / "a" / "b" / "out"
    res = fetch(reg, out)
    assert res.path == (out / "evil.safetensors").resolve()
    assert (out / "evil.safetensors").read_bytes() == src.read_bytes()
    assert not list(tmp_path.glob("**/evil.safetensors"))[1:]  # exactly one, the one inside out/
    assert not (tmp_path / "evil.safetensors").exists() and not (tmp_path / "a" / "evil.safetensors").exists()


def test_missing_hash_warns_and_keeps_size_checked_file(reg: CivitaiTestServer, tmp_path: Path) -> None:
    src = add(reg, tmp_path, hashes={})
    res = fetch(reg, tmp_path / "out")
    assert any("lists no hash" in w for w in res.warnings)
    assert (tmp_path / "out" / src.name).read_bytes() == src.read_bytes()


def test_missing_hash_with_require_hash_leaves_nothing(reg: CivitaiTestServer, tmp_path: Path) -> None:
    add(reg, tmp_path, hashes={})
    with pytest.raises(RegistryError, match="no hash"):
        fetch(reg, tmp_path / "out", require_hash=True)
    assert listing(tmp_path / "out") == []


def test_autov3_only_is_verified(reg: CivitaiTestServer, tmp_path: Path) -> None:
    src = add(reg, tmp_path, vid=1, hashes={"AutoV3": "000000000000"})
    with pytest.raises(RegistryError, match="AutoV3 mismatch"):
        fetch(reg, tmp_path / "out")
    assert listing(tmp_path / "out") == []
    reg.versions[1].hashes = None
    good = reg.version_json(1)["files"][0]["hashes"]["AutoV3"]
    reg.versions[1].hashes = {"AutoV3": good}
    res = fetch(reg, tmp_path / "out")
    assert (tmp_path / "out" / src.name).read_bytes() == src.read_bytes()
    assert any("AutoV3" in w for w in res.warnings)


def test_pickle_is_refused_unless_allowed(reg: CivitaiTestServer, tmp_path: Path) -> None:
    add(reg, tmp_path, fmt="PickleTensor", file_name="old.ckpt")
    with pytest.raises(RegistryError, match="--allow-pickle"):
        fetch(reg, tmp_path / "out")
    assert listing(tmp_path / "out") == [] and not reg.seen("storage")
    fetch(reg, tmp_path / "out", allow_pickle=True)
    assert (tmp_path / "out" / "old.ckpt").exists()


def test_pickle_named_only_by_content_disposition_is_refused(reg: CivitaiTestServer, tmp_path: Path) -> None:
    """The API lists no file name (and calls the format SafeTensor); the storage server's
    Content-Disposition says old.ckpt: the pickle rule applies to the name it would get."""
    src = add(reg, tmp_path, file_name="old.ckpt", list_name=False)
    assert reg.version_json(1)["files"][0]["name"] == ""
    with pytest.raises(RegistryError, match="--allow-pickle") as err:
        fetch(reg, tmp_path / "out")
    assert err.value.path == "old.ckpt"
    assert listing(tmp_path / "out") == []
    fetch(reg, tmp_path / "out", allow_pickle=True)
    assert listing(tmp_path / "out") == ["old.civitai.info", "old.ckpt"]
    assert (tmp_path / "out" / "old.ckpt").read_bytes() == src.read_bytes()


def test_scan_results_other_than_success_warn(reg: CivitaiTestServer, tmp_path: Path) -> None:
    add(reg, tmp_path, scan="Danger")
    res = fetch(reg, tmp_path / "out")
    assert any("'Danger'" in w for w in res.warnings)


def test_existing_file_same_hash_is_skipped(reg: CivitaiTestServer, tmp_path: Path) -> None:
    src = add(reg, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / src.name).write_bytes(src.read_bytes())
    res = fetch(reg, out)
    assert res.status == "skipped" and not reg.seen("storage")


def test_existing_different_file_is_untouched_unless_force(reg: CivitaiTestServer, tmp_path: Path) -> None:
    src = add(reg, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / src.name).write_bytes(b"my own file")
    with pytest.raises(UsageError, match="--force"):
        fetch(reg, out)
    assert (out / src.name).read_bytes() == b"my own file"
    fetch(reg, out, force=True)
    assert (out / src.name).read_bytes() == src.read_bytes()


def test_preview_sidecar(reg: CivitaiTestServer, tmp_path: Path) -> None:
    add(reg, tmp_path)
    res = fetch(reg, tmp_path / "out", preview=True)
    assert (tmp_path / "out" / "lora_1.preview.png").read_bytes() == tiny_png()
    assert len(res.sidecars) == 2
    assert listing(tmp_path / "out") == ["lora_1.civitai.info", "lora_1.preview.png", "lora_1.safetensors"]


def test_content_disposition_names_the_file_when_the_api_does_not(reg: CivitaiTestServer, tmp_path: Path) -> None:
    src = add(reg, tmp_path, file_name="../Ünïcode ✓.safetensors", list_name=False)
    res = fetch(reg, tmp_path / "out")
    assert res.path.name == "Ünïcode ✓.safetensors"
    assert (tmp_path / "out" / "Ünïcode ✓.safetensors").read_bytes() == src.read_bytes()


def test_user_agent_is_descriptive_not_a_browser(reg: CivitaiTestServer, tmp_path: Path) -> None:
    add(reg, tmp_path)
    fetch(reg, tmp_path / "out", preview=True)
    agents = {r.headers.get("User-Agent", "") for r in reg.records}
    assert agents and all(a.startswith("loratool/") for a in agents)
    assert not any(word in a.lower() for a in agents for word in ("mozilla", "chrome", "safari", "firefox",
                                                                   "opera", "edge"))


def test_a_planted_part_symlink_is_not_followed(reg: CivitaiTestServer, tmp_path: Path) -> None:
    add(reg, tmp_path)
    out, victim = tmp_path / "out", tmp_path / "victim.txt"
    out.mkdir()
    victim.write_bytes(b"precious")
    (out / "lora_1.safetensors.part").symlink_to(victim)
    with pytest.raises(RegistryError, match="cannot open the part file"):
        fetch(reg, out)
    assert victim.read_bytes() == b"precious" and not (out / "lora_1.safetensors").exists()


def test_a_download_in_progress_is_not_disturbed(reg: CivitaiTestServer, tmp_path: Path) -> None:
    import fcntl

    add(reg, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    part = out / "lora_1.safetensors.part"
    with open(part, "wb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)  # another process is downloading this file
        with pytest.raises(RegistryError, match="in progress"):
            fetch(reg, out)
        assert part.exists() and not (out / "lora_1.safetensors").exists()
