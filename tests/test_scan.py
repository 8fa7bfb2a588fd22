"""scan: a SQLite catalog of whole libraries — what each record says (against the fixture
generator's manifest and independently computed hashes), incremental re-scans that do not
open unchanged files, renames, removals, duplicates, sidecars, broken files, a symlink
loop, a scan killed mid-way, schema versions, the query language and the JSON contract."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest

from loratool.errors import InputError, UsageError
from loratool.library import open_catalog, scan
from loratool.library.query import FIELDS, parse
from loratool.library.sidecars import pair
from tests.conftest import FIXTURES, LORATOOL, ROOT, run_cli

MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
README = (ROOT / "README.md").read_text()


def _copy(src: str, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if (FIXTURES / src).is_dir():
        shutil.copytree(FIXTURES / src, dst)
    else:
        shutil.copy(FIXTURES / src, dst)
    return dst


def _cut(src: str, dst: Path, keep_data: int) -> Path:
    """A fixture cut ``keep_data`` bytes after its header (a broken download)."""
    data = (FIXTURES / src).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    dst.write_bytes(data[: 8 + n + keep_data])
    return dst


# Library files -> the fixture each is a copy of (the manifest says what it holds).
LIBRARY = {
    "Lora/sd15/a_lokr.safetensors": "sd15_kohya_lokr.safetensors",
    "Lora/sd15/b_loha.safetensors": "sd15_kohya_loha.safetensors",
    "Lora/sd15/c_dora.safetensors": "sd15_kohya_dora_inaxis.safetensors",
    "Lora/sdxl/x_lora.safetensors": "sdxl_kohya_diffusers_named.safetensors",
    "ComfyUI/models/loras/peft_unet": "sd15_peft_unet_dora",
    "ComfyUI/models/loras/diff_folder/pytorch_lora_weights.safetensors": "sdxl_diffusers.safetensors",
}


def _library(tmp: Path) -> Path:
    """An A1111 ``Lora/`` tree and a ComfyUI ``models/loras`` tree, with Civitai Helper
    sidecars, a corrupt file between good ones, a truncated download, a symlink loop and
    a model format loratool does not read."""
    lib = tmp / "lib"
    for dst, src in LIBRARY.items():
        _copy(src, lib / dst)
    sd15 = lib / "Lora" / "sd15"
    for name in ("a_lokr.civitai.info", "a_lokr.preview.png", "b_loha.png", "b_loha.json", "b_loha.txt",
                 "orphan.civitai.info", "orphan.preview.jpeg", "notes.txt", "cover.png"):
        (sd15 / name).write_text("{}")
    (sd15 / "b_broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    _cut("sd15_kohya_loha.safetensors", sd15 / "b_cut.safetensors", 5000)
    os.symlink("..", lib / "Lora" / "sdxl" / "loop")
    loras = lib / "ComfyUI" / "models" / "loras"
    (loras / "peft_unet.civitai.info").write_text("{}")
    (loras / "model.gguf").write_bytes(b"GGUF")
    return lib


def _rel(lib: Path, paths: list[str]) -> list[str]:
    return sorted(os.path.relpath(p, lib) for p in paths)


def _records(db: Path, lib: Path) -> dict[str, dict]:
    with open_catalog(db) as catalog:
        return {os.path.relpath(r["path"], lib): r for r in catalog.records()}


# ---------------------------------------------------------------------------- what a scan records


def test_a_scan_records_every_adapter_and_reports_the_library(tmp_path: Path) -> None:
    lib = _library(tmp_path)
    db = tmp_path / "c.db"
    result = scan([lib], db=db, jobs=1)
    records = _records(db, lib)
    for path, fixture in LIBRARY.items():
        key = path.removesuffix("/pytorch_lora_weights.safetensors")
        r, facts = records[key], MANIFEST[fixture]
        assert (r["family"], r["format"], r["modules"]) == (facts["family"], facts["format"], facts["modules"]), key
        assert set(r["network_types"]) == set(facts["network_types"]) and r["rank"] == facts["rank"], key
        assert r["error"] is None and r["complete"] is True
    # adapter folders are single entries
    assert records["ComfyUI/models/loras/peft_unet"]["kind"] == "folder"
    assert records["ComfyUI/models/loras/diff_folder"]["kind"] == "folder"
    assert not any(k.startswith("ComfyUI/models/loras/peft_unet/") for k in records)
    # the corrupt file between good ones is listed; the good ones around it are recorded
    broken = records["Lora/sd15/b_broken.safetensors"]
    assert broken["format"] is None and "not valid JSON" in broken["error"]
    # a truncated download: an error, and what its header says
    cut = records["Lora/sd15/b_cut.safetensors"]
    facts = MANIFEST["sd15_kohya_loha.safetensors"]
    assert cut["error"].startswith("truncated") and cut["complete"] is False
    assert (cut["family"], cut["modules"], cut["network_types"]) == (facts["family"], facts["modules"], ["loha"])
    # base-model metadata as the file has it
    from safetensors import safe_open

    with safe_open(str(lib / "Lora/sd15/a_lokr.safetensors"), "np") as fh:
        meta = fh.metadata()
    lokr = records["Lora/sd15/a_lokr.safetensors"]
    assert lokr["base_model"] == meta["ss_base_model_version"]
    assert lokr["base_model_metadata"]["modelspec.architecture"] == meta["modelspec.architecture"]
    # sidecars, A1111 / Civitai Helper / ComfyUI conventions
    assert lokr["sidecars"] == ["a_lokr.civitai.info", "a_lokr.preview.png"]
    assert records["Lora/sd15/b_loha.safetensors"]["sidecars"] == ["b_loha.json", "b_loha.png", "b_loha.txt"]
    assert records["ComfyUI/models/loras/peft_unet"]["sidecars"] == ["peft_unet.civitai.info"]
    rep = result.report
    assert _rel(lib, rep.orphan_sidecars) == ["Lora/sd15/orphan.civitai.info", "Lora/sd15/orphan.preview.jpeg"]
    assert _rel(lib, rep.without_sidecars) == ["ComfyUI/models/loras/diff_folder", "Lora/sd15/c_dora.safetensors",
                                               "Lora/sdxl/x_lora.safetensors"]
    assert _rel(lib, [p for p, _ in rep.errors]) == ["Lora/sd15/b_broken.safetensors", "Lora/sd15/b_cut.safetensors",
                                                     "Lora/sdxl/loop"]
    assert "symlink loop" in dict(rep.errors)[str(lib / "Lora/sdxl/loop")]
    assert _rel(lib, [p for p, _ in rep.skipped]) == ["ComfyUI/models/loras/model.gguf"]
    described = [MANIFEST[f] for f in [*LIBRARY.values(), "sd15_kohya_loha.safetensors"]]  # + the truncated one
    assert rep.by_family == dict(Counter(f["family"] for f in described))
    assert rep.by_format == dict(Counter(f["format"] for f in described))
    assert rep.by_network == dict(Counter(t for f in described for t in f["network_types"]))
    assert rep.duplicates is None  # nothing hashed: duplicates need --hashes
    assert result.counts == {"new": 8, "changed": 0, "unchanged": 0, "renamed": 0, "removed": 0, "errors": 3, "read": 8}
    # unchanged broken files are not read again either; the report stays the same
    again = scan([lib], db=db, jobs=1)
    assert again.counts == {**result.counts, "new": 0, "unchanged": 8, "read": 0}
    assert again.report == rep


def _autov3(path: Path) -> str:
    """AutoV3 computed here: SHA-256 of what follows the header, 12 hex digits."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return hashlib.sha256(raw[8 + n:]).hexdigest()[:12].upper()


def test_duplicates_are_found_by_autov3_and_links_are_not_duplicates(tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    a = _copy("sd15_kohya_lokr.safetensors", lib / "styles" / "a.safetensors")
    _copy("sd15_kohya_lokr.safetensors", lib / "other" / "a copy.safetensors")
    _copy("sd15_kohya_loha.safetensors", lib / "b.safetensors")
    os.link(lib / "b.safetensors", lib / "b_hardlink.safetensors")
    os.symlink(a, lib / "a_link.safetensors")
    db = tmp_path / "c.db"
    assert scan([lib], db=db, jobs=1).report.duplicates is None
    result = scan([lib], db=db, jobs=1, hashes=True)
    assert [_rel(lib, g) for g in result.report.duplicates] == [["a_link.safetensors", "other/a copy.safetensors",
                                                                 "styles/a.safetensors"]]
    records = _records(db, lib)
    assert records["styles/a.safetensors"]["hashes"]["autov3"] == _autov3(a)
    assert records["styles/a.safetensors"]["hashes"]["sha256"] == hashlib.sha256(a.read_bytes()).hexdigest().upper()
    # the catalog keeps the hashes: a later scan without --hashes still reports duplicates
    again = scan([lib], db=db, jobs=1)
    assert again.counts["read"] == 0 and len(again.report.duplicates) == 1
    # a changed file that had hashes is hashed again when read: the catalog loses no detail
    os.utime(a)
    touched = scan([lib], db=db, jobs=1)
    assert touched.counts["read"] == 2  # the file, and the symlink to it
    assert len(touched.report.duplicates) == 1 and touched.report.unhashed == 0


# ---------------------------------------------------------------------------- incremental


def _set_title(path: Path, old: bytes, new: bytes) -> None:
    """Rewrite a metadata value in place with as many bytes, keeping mtime (and inode)."""
    st = path.stat()
    raw = path.read_bytes()
    assert len(old) == len(new) and raw.count(old) == 1
    with open(path, "r+b") as fh:
        fh.write(raw.replace(old, new))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns, path.stat().st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)


def test_rescans_read_only_what_changed(tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    lokr = _copy("sd15_kohya_lokr.safetensors", lib / "a" / "lokr.safetensors")
    loha = _copy("sd15_kohya_loha.safetensors", lib / "a" / "loha.safetensors")
    dora = _copy("sd15_kohya_dora_inaxis.safetensors", lib / "b" / "dora.safetensors")
    peft = _copy("sd15_peft_unet_dora", lib / "b" / "peft")
    _copy("sdxl_kohya_diffusers_named.safetensors", lib / "b" / "sdxl.safetensors")
    db = tmp_path / "c.db"
    first = scan([lib], db=db, jobs=1)
    assert first.counts["new"] == 5 and first.counts["read"] == 5
    before = _records(db, lib)
    assert before["a/lokr.safetensors"]["title"] == "sd15_kohya_lokr"

    # unchanged by our definition (size, mtime, inode) but different bytes: not opened
    _set_title(lokr, b'"modelspec.title":"sd15_kohya_lokr"', b'"modelspec.title":"SD15_KOHYA_LOKR"')
    second = scan([lib], db=db, jobs=1)
    assert {k: second.counts[k] for k in ("new", "changed", "unchanged", "read")} == {
        "new": 0, "changed": 0, "unchanged": 5, "read": 0}
    assert _records(db, lib)["a/lokr.safetensors"] == before["a/lokr.safetensors"]

    # touch: a new mtime, so it is read again (and now the new title shows)
    os.utime(lokr)
    third = scan([lib], db=db, jobs=1)
    assert (third.counts["changed"], third.counts["read"]) == (1, 1)
    assert _records(db, lib)["a/lokr.safetensors"]["title"] == "SD15_KOHYA_LOKR"

    # modified (other content), deleted, renamed, a folder's config rewritten
    shutil.copy(FIXTURES / "sdxl_kohya_lora.safetensors", loha)
    dora.unlink()
    os.rename(lib / "b" / "sdxl.safetensors", lib / "a" / "sdxl renamed.safetensors")
    config = json.loads((peft / "adapter_config.json").read_text())
    config["lora_alpha"] = 2 * config["lora_alpha"]
    (peft / "adapter_config.json").write_text(json.dumps(config))
    fourth = scan([lib], db=db, jobs=1)
    assert {k: fourth.counts[k] for k in ("new", "changed", "unchanged", "renamed", "removed", "read")} == {
        "new": 0, "changed": 2, "unchanged": 2, "renamed": 1, "removed": 1, "read": 2}
    after = _records(db, lib)
    assert set(after) == {"a/lokr.safetensors", "a/loha.safetensors", "a/sdxl renamed.safetensors", "b/peft"}
    assert after["a/loha.safetensors"]["family"] == "sdxl"  # re-read: now the SDXL file
    assert after["b/peft"]["alpha"]["max"] == 2 * before["b/peft"]["alpha"]["max"]
    moved = after["a/sdxl renamed.safetensors"]
    assert moved["name"] == "sdxl renamed.safetensors" and moved["scanned_at"] == before["b/sdxl.safetensors"]["scanned_at"]
    assert _rel(lib, [new for _, new in fourth.renamed]) == ["a/sdxl renamed.safetensors"]
    assert _rel(lib, fourth.removed) == ["b/dora.safetensors"]


def test_a_moved_copy_is_a_rename_by_autov3(tmp_path: Path) -> None:
    """A file copied elsewhere (new inode, new mtime) and deleted: same AutoV3, same size."""
    lib = tmp_path / "lib"
    old = _copy("sd15_kohya_lokr.safetensors", lib / "old" / "x.safetensors")
    _copy("sd15_kohya_loha.safetensors", lib / "keep.safetensors")
    db = tmp_path / "c.db"
    scan([lib], db=db, jobs=1, hashes=True)
    (lib / "new").mkdir()
    shutil.copy(old, lib / "new" / "x.safetensors")
    old.unlink()
    result = scan([lib], db=db, jobs=1)  # no --hashes: the candidate alone is hashed
    assert {k: result.counts[k] for k in ("new", "renamed", "removed", "read")} == {
        "new": 0, "renamed": 1, "removed": 0, "read": 1}
    assert _rel(lib, [o for o, _ in result.renamed]) == ["old/x.safetensors"]
    records = _records(db, lib)
    assert set(records) == {"keep.safetensors", "new/x.safetensors"}
    assert records["new/x.safetensors"]["hashes"]["autov3"] == _autov3(lib / "new" / "x.safetensors")


def test_removal_stays_under_the_scanned_roots(tmp_path: Path) -> None:
    one = _copy("sd15_kohya_lokr.safetensors", tmp_path / "one" / "x.safetensors")
    _copy("sd15_kohya_loha.safetensors", tmp_path / "two" / "y.safetensors")
    _copy("sd15_kohya_loha.safetensors", tmp_path / "one-more" / "z.safetensors")  # a sibling sharing the prefix
    db = tmp_path / "c.db"
    scan([tmp_path / "one", tmp_path / "two", tmp_path / "one-more"], db=db, jobs=1)
    one.unlink()
    shutil.rmtree(tmp_path / "two")
    result = scan([tmp_path / "one"], db=db, jobs=1)
    assert _rel(tmp_path, result.removed) == ["one/x.safetensors"]
    assert set(_records(db, tmp_path)) == {"two/y.safetensors", "one-more/z.safetensors"}
    # a root that cannot be reached removes nothing (a disconnected drive is not an empty one)
    gone = scan([tmp_path / "two"], db=db, jobs=1)
    assert gone.removed == [] and "two/y.safetensors" in _records(db, tmp_path)
    assert [why for _, why in gone.report.errors] == ["no such file or directory"]


# ---------------------------------------------------------------------------- interrupted scans


def test_a_killed_scan_leaves_a_consistent_catalog_that_the_next_scan_completes(tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    src = _copy("sdxl_kohya_lora.safetensors", tmp_path / "src.safetensors")
    n = 300
    for i in range(n):  # hard links: a few hundred real files, no disk used
        folder = lib / f"{i // 40:02}"
        folder.mkdir(parents=True, exist_ok=True)
        os.link(src, folder / f"{i:03}.safetensors")
    db = tmp_path / "c.db"
    proc = subprocess.Popen([*LORATOOL, "scan", str(lib), "--db", str(db), "--jobs", "1"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with sqlite3.connect(db, timeout=5) as conn:
                    rows = conn.execute("SELECT count(*) FROM files").fetchone()[0]
            except sqlite3.Error:  # not created yet
                rows = 0
            if rows:
                break
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    modules, family = MANIFEST["sdxl_kohya_lora.safetensors"]["modules"], MANIFEST["sdxl_kohya_lora.safetensors"]["family"]
    kept = _records(db, lib)
    assert 0 < len(kept) < n, len(kept)  # killed mid-way
    assert all(r["modules"] == modules and r["family"] == family and r["error"] is None for r in kept.values())
    result = scan([lib], db=db, jobs=2)
    assert (result.counts["unchanged"], result.counts["new"], result.counts["read"]) == (len(kept), n - len(kept), n - len(kept))
    assert any("did not finish" in note for note in result.notes)
    full = _records(db, lib)
    assert sorted(full) == sorted(f"{i // 40:02}/{i:03}.safetensors" for i in range(n))
    assert all(r["modules"] == modules and r["family"] == family and r["error"] is None for r in full.values())
    assert result.report.errors == []


# ---------------------------------------------------------------------------- pool, imports


def test_the_pool_gives_the_records_one_process_gives(tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    names = ["sd15_kohya_lokr.safetensors", "sd15_kohya_loha.safetensors", "sd15_kohya_dora_inaxis.safetensors",
             "sdxl_kohya_diffusers_named.safetensors"]
    for i in range(52):
        _copy(names[i % 4], lib / f"{i:02}.safetensors")
    _copy("sd15_peft_unet_dora", lib / "peft")
    (lib / "broken.safetensors").write_bytes(b"\0" * 7)
    one, two, three = tmp_path / "one.db", tmp_path / "two.db", tmp_path / "three.db"
    scan([lib], db=one, jobs=1)
    result = scan([lib], db=two, jobs=2)  # forked workers
    assert result.counts["read"] == 54
    # with another thread running, workers come from a fork server instead
    code = textwrap.dedent(f"""
        import threading
        from loratool.library import scan
        stop = threading.Event()
        threading.Thread(target=stop.wait, daemon=True).start()
        print(scan([{str(lib)!r}], db={str(three)!r}, jobs=2).counts["read"])
        stop.set()
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "54", done.stderr[-2000:]

    def strip(records: dict[str, dict]) -> dict[str, dict]:
        return {k: {f: v for f, v in r.items() if f != "scanned_at"} for k, r in records.items()}
    assert strip(_records(one, lib)) == strip(_records(two, lib)) == strip(_records(three, lib))


def test_scanning_safetensors_never_imports_torch(tmp_path: Path) -> None:
    lib = _library(tmp_path)
    code = textwrap.dedent(f"""
        import sys
        from loratool.cli.main import main
        from loratool.library import scan
        scan([{str(lib)!r}], db={str(tmp_path / "c.db")!r}, jobs=1)
        assert "torch" not in sys.modules, "first scan imported torch"
        try:
            main(["scan", {str(lib)!r}, "--db", {str(tmp_path / "c.db")!r}, "--jobs", "1"])
        except SystemExit:
            pass
        assert "torch" not in sys.modules, "re-scan imported torch"
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


# ---------------------------------------------------------------------------- the catalog file


def test_catalog_schema_versions_and_foreign_files(tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    _copy("sd15_kohya_lokr.safetensors", lib / "x.safetensors")
    db = tmp_path / "c.db"
    scan([lib], db=db, jobs=1)
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    result = run_cli("scan", str(lib), "--db", str(db))
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == f"error: {db}: catalog schema version 99 is newer than this loratool reads (1); upgrade loratool or use another --db\n"
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE meta SET value = '0' WHERE key = 'schema_version'")
    with pytest.raises(InputError, match="older"):
        open_catalog(db)  # reading only: never rebuilt behind the user's back
    rebuilt = scan([lib], db=db, jobs=1)
    assert rebuilt.counts["new"] == 1 and any("rebuilt" in n for n in rebuilt.notes)
    assert open_catalog(db).meta()["schema_version"] == "1"
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE photos (name TEXT)")
    notdb = tmp_path / "notes.txt"
    notdb.write_text("not a database, just some text that is long enough to have a header " * 20)
    for path, why in ((other, "a SQLite database with other tables"), (notdb, "not a SQLite database")):
        result = run_cli("scan", str(lib), "--db", str(path))
        assert result.returncode == 1 and why in result.stderr and len(result.stderr.splitlines()) == 1
    with sqlite3.connect(other) as conn:
        assert conn.execute("SELECT name FROM sqlite_master").fetchall() == [("photos",)]  # untouched
    missing = run_cli("scan", "--db", str(tmp_path / "none.db"), "--query", "family=sd1")
    assert missing.returncode == 1 and "no catalog here yet" in missing.stderr
    assert not (tmp_path / "none.db").exists()


def test_the_default_catalog_lives_in_the_users_data_folder(tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    _copy("sd15_kohya_lokr.safetensors", lib / "x.safetensors")
    result = run_cli("scan", str(lib), env={"XDG_DATA_HOME": str(tmp_path / "data")})
    assert result.returncode == 0 and result.stderr == ""  # piped: no progress bar, nothing extra
    db = tmp_path / "data" / "loratool" / "catalog.sqlite3"
    assert len(_records(db, lib)) == 1
    home = run_cli("scan", "--query", "family=sd1", "--json", env={"XDG_DATA_HOME": "", "HOME": str(tmp_path / "home")},
                   cwd=tmp_path)
    assert home.returncode == 1 and str(tmp_path / "home/.local/share/loratool/catalog.sqlite3") in home.stderr


# ---------------------------------------------------------------------------- sidecars


def test_sidecars_pair_by_stem_with_the_ui_conventions() -> None:
    models = [("/l/a.safetensors", False), ("/l/b.v2.safetensors", False), ("/l/peft", True), ("/m/a.safetensors", False)]
    others = ["/l/a.civitai.info", "/l/a.preview.png", "/l/a.png", "/l/a.json", "/l/a.txt", "/l/a.metadata.json",
              "/l/b.v2.preview.webp", "/l/b.civitai.info", "/l/peft.civitai.info", "/l/peft.preview.gif",
              "/l/c.preview.jpg", "/l/readme.txt", "/l/cover.png", "/m/a.PREVIEW.PNG", "/l/.civitai.info"]
    sidecars, orphans = pair(models, others)
    assert sidecars == {
        "/l/a.safetensors": ["a.civitai.info", "a.json", "a.metadata.json", "a.png", "a.preview.png", "a.txt"],
        "/l/b.v2.safetensors": ["b.v2.preview.webp"],
        "/l/peft": ["peft.civitai.info", "peft.preview.gif"],
        "/m/a.safetensors": ["a.PREVIEW.PNG"],  # another folder's a.* never pairs with /l/a
    }
    assert orphans == ["/l/b.civitai.info", "/l/c.preview.jpg"]


# ---------------------------------------------------------------------------- the query language


@pytest.fixture(scope="module")
def fixture_catalog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("q")
    lib = tmp / "lib"
    for name in MANIFEST:
        _copy(name, lib / name)
    (lib / "sd15_kohya_lokr.civitai.info").write_text("{}")
    _cut("sd15_kohya_loha.safetensors", lib / "cut.safetensors", 100)
    db = tmp / "c.db"
    scan([lib], db=db, jobs=1)
    return db


def _names(db: Path, expr: str) -> set[str]:
    with open_catalog(db) as catalog:
        return {r["name"] for r in catalog.query(expr)}


def _manifest(pred) -> set[str]:  # noqa: ANN001
    return {name for name, facts in MANIFEST.items() if pred(facts)}


@pytest.mark.parametrize(("expr", "expected"), [
    ("family=sdxl", lambda f: f["family"] == "sdxl"),
    ("family=SDXL format=kohya", lambda f: f["family"] == "sdxl" and f["format"] == "kohya"),
    ("family=sdxl and format!=kohya", lambda f: f["family"] == "sdxl" and f["format"] != "kohya"),
    ("network=dora", lambda f: "dora" in f["network_types"]),
    ("network=loha or network=lokr", lambda f: {"loha", "lokr"} & set(f["network_types"])),
    ("not (network=lora) format=kohya", lambda f: "lora" not in f["network_types"] and f["format"] == "kohya"),
    ("rank>=4", lambda f: f["rank"]["max"] >= 4),
    ("rank<4", lambda f: f["rank"]["max"] < 4),
    ("modules>100", lambda f: f["modules"] > 100),
    ("modules = 23", lambda f: f["modules"] == 23),
    ("name~peft", lambda f: True),  # checked by name below
])
def test_query_terms_match_what_the_files_hold(fixture_catalog: Path, expr: str, expected) -> None:  # noqa: ANN001
    got = _names(fixture_catalog, expr) - {"cut.safetensors"}
    if expr == "name~peft":
        assert got == {n for n in MANIFEST if "peft" in n}
    else:
        assert got == _manifest(expected)


def test_query_sizes_globs_booleans_and_sidecars(fixture_catalog: Path) -> None:
    sizes = {n: sum(f.stat().st_size for f in (FIXTURES / n).rglob("*")) if (FIXTURES / n).is_dir()
             else (FIXTURES / n).stat().st_size for n in MANIFEST}
    assert _names(fixture_catalog, "size>1MB kind=file") == {n for n, s in sizes.items() if s > 1_000_000}
    assert _names(fixture_catalog, "size<=0.1MiB") == {n for n, s in sizes.items() if s <= 0.1 * 2**20} | {"cut.safetensors"}
    assert _names(fixture_catalog, "name~'sd15_kohya_lo?a.*'") == {"sd15_kohya_loha.safetensors", "sd15_kohya_lora.safetensors"}
    assert _names(fixture_catalog, "kind=folder") == {n for n in MANIFEST if (FIXTURES / n).is_dir()}
    assert _names(fixture_catalog, "error=yes") == {"cut.safetensors"}
    assert _names(fixture_catalog, "complete=no reason~truncated") == {"cut.safetensors"}
    assert _names(fixture_catalog, "sidecar=civitai-info") == {"sd15_kohya_lokr.safetensors"}
    assert len(_names(fixture_catalog, "sidecars=0")) == len(MANIFEST)  # 13 others + cut, minus lokr
    assert _names(fixture_catalog, "valid=unchecked") == set(MANIFEST) | {"cut.safetensors"}
    from safetensors import safe_open

    def base(name: str) -> str | None:
        if (FIXTURES / name).is_dir():
            return None
        with safe_open(str(FIXTURES / name), "np") as fh:
            return (fh.metadata() or {}).get("ss_base_model_version")
    assert _names(fixture_catalog, 'base_model="sdxl_base_v1-0"') == {n for n in MANIFEST if base(n) == "sdxl_base_v1-0"}
    assert _names(fixture_catalog, "base_model~sd_v") == {n for n in MANIFEST if (base(n) or "").startswith("sd_v")} | {"cut.safetensors"}
    assert _names(fixture_catalog, "autov3~a") == set()  # nothing hashed


@pytest.mark.parametrize(("expr", "message"), [
    ("rank>>", "rank>>: '>' is not a number"),
    ("famly=sdxl", "unknown field 'famly'"),
    ("sdxl", "expected FIELD OP VALUE"),
    ("family<sdxl", "family is a text field; it takes = != ~ !~"),
    ("rank~4", "rank is a number field"),
    ("error=maybe", "error takes yes or no"),
    ("family=", "family= needs a value"),
    ("(family=sdxl", "missing ')'"),
    ("family=sdxl or", "the expression ends where a term was expected"),
    ("name='abc", "unbalanced quotes"),
    ("", "empty expression"),
])
def test_malformed_queries_are_usage_errors(expr: str, message: str) -> None:
    with pytest.raises(UsageError, match=re.escape(message)):
        parse(expr)


def test_cli_query_and_usage_exit_codes(fixture_catalog: Path, tmp_path: Path) -> None:
    bad = run_cli("scan", "--db", str(fixture_catalog), "--query", "rank>>")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr == "error: --query: rank>>: '>' is not a number\n"
    nothing = run_cli("scan")
    assert nothing.returncode == 2 and nothing.stderr.startswith("error: give folders to scan")
    found = run_cli("scan", "--db", str(fixture_catalog), "--query", "family=sdxl format=kohya")
    assert found.returncode == 0
    rows = [line.split("\t") for line in found.stdout.splitlines()]  # piped: tab-separated
    assert sorted(os.path.basename(r[0]) for r in rows) == sorted(_manifest(lambda f: f["family"] == "sdxl" and f["format"] == "kohya"))
    assert all(r[1:3] == ["sdxl", "kohya"] for r in rows)


# ---------------------------------------------------------------------------- JSON Lines contract


def _readme_fields(title: str) -> list[str]:
    section = README.split("<!-- section:scan -->")[1].split("<!-- /section:scan -->")[0]
    table = section.split(title)[1]
    return re.findall(r"^\| `([a-z0-9_]+)` \|", table.split("\n\n", 2)[1], re.M)


def test_json_lines_follow_the_documented_contract(tmp_path: Path) -> None:
    lib = _library(tmp_path)
    result = run_cli("scan", str(lib), "--db", str(tmp_path / "c.db"), "--json", "--hashes")
    assert result.returncode == 1  # the broken file, the truncated one and the loop
    lines = result.stdout.splitlines()
    records = [json.loads(line, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}")) for line in lines]
    assert len(records) == 8 and [r["path"] for r in records] == sorted(r["path"] for r in records)
    documented = _readme_fields("JSON Lines fields")
    assert documented and all(list(r) == documented for r in records)
    assert sorted(line.split(":")[0] for line in result.stderr.splitlines()) == ["error"] * 3
    for r in records:
        assert isinstance(r["size"], int) and isinstance(r["mtime_ns"], int) and r["path"].startswith(str(lib))
        assert r["hashes"] is None or set(r["hashes"]) == {"sha256", "autov1", "autov2", "autov3"}
    queried = run_cli("scan", "--db", str(tmp_path / "c.db"), "--query", "network=loha", "--json")
    assert [json.loads(x)["name"] for x in queried.stdout.splitlines()] == ["b_cut.safetensors", "b_loha.safetensors"]


def test_query_fields_are_documented() -> None:
    assert _readme_fields("Query fields") == list(FIELDS)


def test_validate_adds_a_summary(tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    _copy("sd15_kohya_lokr.safetensors", lib / "a.safetensors")
    _cut("sd15_kohya_loha.safetensors", lib / "cut.safetensors", 100)
    db = tmp_path / "c.db"
    scan([lib], db=db, jobs=1, validate=True)
    records = _records(db, lib)
    from loratool.ops.validate import validate

    for name, r in records.items():
        expected = validate(lib / name, allow_pickle=True)
        assert r["validation"] == {"ok": expected.counts["error"] == 0, "counts": expected.counts, "codes": expected.codes}
    assert "truncated" in records["cut.safetensors"]["validation"]["codes"]
    assert _names(db, "valid=errors codes=truncated") == {"cut.safetensors"}
