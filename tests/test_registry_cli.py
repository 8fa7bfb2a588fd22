"""The registry commands end to end: CliRunner and the installed ``loratool`` script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from loratool.cli.main import cli
from tests.civitai_server import TOKEN, CivitaiTestServer, Faults, Version, write_safetensors

LORATOOL = Path(sys.executable).parent / "loratool"


@pytest.fixture
def reg(tmp_path: Path) -> Iterator[CivitaiTestServer]:
    with CivitaiTestServer() as server:
        a = write_safetensors(tmp_path / "animeStyle.safetensors", 60_000, seed=1)
        b = write_safetensors(tmp_path / "pixel.safetensors", 30_000, seed=2)
        c = write_safetensors(tmp_path / "broken.safetensors", 30_000, seed=3)
        server.add_model(101, "Anime Style", [Version(1001, 101, a, faults=Faults(require_auth=True))])
        server.add_model(102, "Pixel Art", [Version(1002, 102, b, base_model="SD 1.5")])
        server.add_model(103, "Broken", [Version(1003, 103, c, hashes={"SHA256": "AB" * 32})])
        d = write_safetensors(tmp_path / "hostile.safetensors", 30_000, seed=4)
        server.add_model(104, HOSTILE, [Version(1004, 104, d, name=HOSTILE, base_model=HOSTILE, file_name=HOSTILE_FILE)],
                         tags=(HOSTILE,), creator=HOSTILE)
        server.versions[1004].faults = Faults()
        server.add_model(105, "Refused", [Version(1005, 105, d, faults=Faults(status=403, message=HOSTILE))])
        yield server
    assert not [r for r in server.seen("storage") if "Authorization" in r.headers]


@pytest.fixture
def env(reg: CivitaiTestServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    values = {"LORATOOL_REGISTRY": reg.url, "LORATOOL_TOKEN": TOKEN, "LORATOOL_BACKOFF_BASE": "0.01",
              "XDG_CONFIG_HOME": str(tmp_path / "xdg"), "COLUMNS": "200"}
    monkeypatch.delenv("CIVITAI_API_TOKEN", raising=False)
    for k, v in values.items():
        monkeypatch.setenv(k, v)
    return dict(os.environ)


def run(*args: str, env: dict[str, str], stdin: str | None = None, preexec: object = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(LORATOOL), *args], env=env, capture_output=True, text=True, input=stdin,
                          timeout=60, preexec_fn=preexec)  # type: ignore[arg-type]


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.output


# Registry strings that try to drive the terminal: an OSC 8 hyperlink, a window title, a
# screen clear (7-bit and 8-bit CSI), a bidi override, a lone surrogate and rich markup.
HOSTILE = ("Mdl\x1b]8;;http://evil.example\x07[link=http://evil.example]click[/link][bold]B[/bold]"
           "\x1b]0;pwned\x07\x9b2J\u202egnp.exe\x1b[2J\ud800")
HOSTILE_FILE = "evil\x1b[31m\u202egnp\x85.safetensors"
UNSAFE = ("Cc", "Cf", "Cs", "Zl", "Zp")  # Unicode controls, format characters, surrogates, separators


def _terminal_safe(text: str) -> None:
    bad = sorted({repr(c) for c in text if c != "\n" and unicodedata.category(c) in UNSAFE})
    assert not bad, f"unsafe characters reached the terminal: {bad}"


def test_hostile_registry_strings_print_as_plain_text(env: dict[str, str], reg: CivitaiTestServer, tmp_path: Path) -> None:
    env = {**env, "COLUMNS": "400"}
    runs = {
        "search": run("search", "Mdl", env=env),
        "info": run("info", "104", env=env),
        "info-version": run("info", "--version", "1004", env=env),
        "lookup": run("lookup", str(tmp_path / "hostile.safetensors"), env=env),
    }
    for what, p in runs.items():
        assert p.returncode == 0, (what, p.stderr)
        _terminal_safe(p.stdout + p.stderr)
        assert "[link=http://evil.example]click[/link][bold]B[/bold]" in p.stdout, what  # markup printed literally
        assert "\\x1b]8;;http://evil.example\\x07" in p.stdout, what  # escapes shown, not acted on
    assert "\\u202egnp.exe\\x1b[2J\\ud800" in runs["info"].stdout  # (tables may cut long cells short)


def test_hostile_registry_json_is_the_same_data_without_raw_controls(env: dict[str, str]) -> None:
    for args in (("search", "Mdl", "--json"), ("info", "104", "--json")):
        p = run(*args, env=env)
        assert p.returncode == 0, p.stderr
        _terminal_safe(p.stdout)
        data = json.loads(p.stdout)
        model = data[0] if isinstance(data, list) else data
        assert model["name"] == HOSTILE and model["creator"]["username"] == HOSTILE


def test_hostile_file_name_is_stripped_and_error_bodies_neutralised(env: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "dl"
    p = run("fetch", "--version", "1004", "-o", str(out), env=env)
    assert p.returncode == 0, p.stderr
    _terminal_safe(p.stdout + p.stderr)
    assert sorted(x.name for x in out.iterdir()) == ["evilgnp.civitai.info", "evilgnp.safetensors"]
    assert (out / "evilgnp.safetensors").read_bytes() == (tmp_path / "hostile.safetensors").read_bytes()
    info = json.loads((out / "evilgnp.civitai.info").read_text(encoding="utf-8"))  # the data, intact
    assert info["model"]["name"] == HOSTILE and info["files"][0]["name"] == HOSTILE_FILE
    refused = run("fetch", "--version", "1005", "-o", str(out), env=env)
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1
    _terminal_safe(refused.stderr)
    assert "HTTP 403" in refused.stderr and "\\x1b]0;pwned\\x07" in refused.stderr


def test_search_table_and_json(env: dict[str, str]) -> None:
    code, out = invoke("search", "art", "--limit", "5")
    assert code == 0 and "Pixel Art" in out and "102" in out and "Anime" not in out
    code, out = invoke("search", "style", "--json")
    assert [m["id"] for m in json.loads(out)] == [101]


def test_info_model_version_and_url(env: dict[str, str], reg: CivitaiTestServer) -> None:
    code, out = invoke("info", "102")
    sha = reg.version_json(1002)["files"][0]["hashes"]["SHA256"]
    assert code == 0 and "pixel.safetensors" in out and "pixel_style" in out
    assert f"SHA256 {sha}  pixel.safetensors" in out
    code, out = invoke("info", "--version", "1002", "--json")
    assert json.loads(out)["files"][0]["hashes"]["SHA256"] == sha
    code, out = invoke("info", f"{reg.url}/models/102/pixel-art?modelVersionId=1002", "--json")
    assert json.loads(out)["id"] == 102


def test_lookup_json(env: dict[str, str], tmp_path: Path) -> None:
    code, out = invoke("lookup", str(tmp_path / "pixel.safetensors"), "--json")
    (row,) = json.loads(out)
    assert code == 0 and row["found"] and row["version_id"] == 1002 and row["matched_by"] == "sha256"
    assert set(row["hashes"]) == {"sha256", "autov1", "autov2", "autov3"}


def test_lookup_bad_file_does_not_stop_the_others(env: dict[str, str], tmp_path: Path) -> None:
    p = run("lookup", str(tmp_path / "nope.safetensors"), str(tmp_path / "pixel.safetensors"), "--json", env=env)
    rows = json.loads(p.stdout)
    assert p.returncode == 1 and p.stderr.strip() == f"error: {tmp_path / 'nope.safetensors'}: no such file"
    assert [r["found"] for r in rows] == [False, True] and rows[1]["model_id"] == 102


def test_fetch_by_model_url_writes_file_and_sidecars(env: dict[str, str], reg: CivitaiTestServer, tmp_path: Path) -> None:
    out = tmp_path / "loras"
    code, text = invoke("fetch", f"{reg.url}/models/101", "-o", str(out), "--preview", "--json")
    assert code == 0 and json.loads(text)["status"] == "downloaded"
    assert sorted(p.name for p in out.iterdir()) == ["animeStyle.civitai.info", "animeStyle.preview.png",
                                                     "animeStyle.safetensors"]


def test_errors_are_one_line_without_traceback(env: dict[str, str], tmp_path: Path) -> None:
    p = run("fetch", "--version", "1003", "-o", str(tmp_path / "out"), env=env)
    assert p.returncode == 1
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("error: ") and "SHA256 mismatch" in p.stderr
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "out" / "broken.safetensors").exists()
    p = run("fetch", "https://elsewhere.example/models/1", "-o", str(tmp_path / "out"), env=env)
    assert p.returncode == 2 and "not on the selected registry" in p.stderr


def test_token_never_appears_in_any_output(env: dict[str, str], reg: CivitaiTestServer, tmp_path: Path) -> None:
    runs = [
        run("--debug", "fetch", "101", "-o", str(tmp_path / "a"), "--preview", env=env),
        run("--debug", "fetch", "--version", "1003", "-o", str(tmp_path / "b"), env=env),  # fails: traceback
        run("--debug", "search", "a", "--json", env=env),
        run("--debug", "info", "101", env=env),
        run("--debug", "lookup", str(tmp_path / "pixel.safetensors"), env=env),
        run("--debug", "fetch", "101", "-o", str(tmp_path / "c"), "--token", TOKEN, "--json", env=env),
        run("config", "set", "registries.test.token", "-", env=env, stdin=TOKEN + "\n"),
        run("config", "set", "registries.test.url", reg.url, env=env),
        run("config", "show", env=env),
        run("config", "show", "--json", "--registry", "test", env=env),
    ]
    assert runs[0].returncode == 0 and "debug:" in runs[0].stderr and "Traceback" in runs[1].stderr
    for p in runs:
        assert TOKEN not in p.stdout and TOKEN not in p.stderr
    assert TOKEN in (tmp_path / "xdg" / "loratool" / "config.yaml").read_text()  # stored, never shown
    assert json.loads(runs[-1].stdout)["active"]["token"] == "<set>"
    assert not any(TOKEN in r.target for r in reg.records)


def test_disk_full_keeps_part_and_no_final_file(env: dict[str, str], tmp_path: Path) -> None:
    def small_files() -> None:  # runs in the child: writes past 40 KB fail with EFBIG
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))

    p = run("fetch", "--version", "1002", "-o", str(tmp_path / "out"), "--retries", "0", env=env, preexec=small_files)
    assert p.returncode == 1 and "cannot write: File too large" in p.stderr and p.stderr.count("\n") == 1
    assert sorted(x.name for x in (tmp_path / "out").iterdir()) == ["pixel.safetensors.part"]


def test_existing_file_is_kept_without_force(env: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "pixel.safetensors").write_bytes(b"mine")
    p = run("fetch", "102", "-o", str(out), "--quiet", env=env)
    assert p.returncode == 2 and "--force" in p.stderr and (out / "pixel.safetensors").read_bytes() == b"mine"
    p = run("fetch", "102", "-o", str(out), "--quiet", "--force", env=env)
    assert p.returncode == 0 and p.stdout == "" and p.stderr == ""
    assert (out / "pixel.safetensors").read_bytes() == (tmp_path / "pixel.safetensors").read_bytes()


def test_config_file_is_private(env: dict[str, str], tmp_path: Path) -> None:
    code, _ = invoke("config", "set", "registries.mine.url", "https://example.invalid")
    assert code == 0
    (config,) = (tmp_path / "xdg" / "loratool").glob("config.yaml")
    assert config.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in config.parent.iterdir()] == ["config.yaml"]  # no temp file left
