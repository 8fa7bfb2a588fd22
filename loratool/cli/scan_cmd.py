"""``loratool scan``: catalog libraries into SQLite, report on them, query the catalog."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

from loratool.errors import UsageError
from loratool.library.catalog import open_catalog
from loratool.library.scanner import Progress, ScanResult, scan
from loratool.terminal import printable

LISTED = 20  # paths shown per report section; the rest are counted


@click.command("scan")
@click.argument("paths", nargs=-1, type=click.Path(path_type=str))
@click.option("--db", type=click.Path(path_type=str), metavar="PATH",
              help="Catalog file (default: $XDG_DATA_HOME/loratool/catalog.sqlite3, else ~/.local/share/loratool/…).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON Lines: one record per file (the catalog's rows).")
@click.option("--hashes", is_flag=True, help="Add sha256, AutoV1/V2/V3 (reads new and changed files in full); finds duplicates.")
@click.option("--validate", "validate", is_flag=True, help="Add a validation summary per file (reads the tensor data).")
@click.option("-j", "--jobs", type=click.IntRange(min=1), metavar="N", help="Worker processes (default: one per CPU; 1: no pool).")
@click.option("-q", "--query", metavar="EXPR", help='Print the catalog rows matching EXPR, e.g. "family=sdxl rank>=32" (without DIR: no scan).')
def scan_cmd(paths: tuple[str, ...], db: str | None, as_json: bool, hashes: bool, validate: bool,
             jobs: int | None, query: str | None) -> None:
    """Catalog LoRA libraries (A1111, Forge, ComfyUI folders) into a SQLite file, reading
    only new and changed files, and report on them: families, formats, network types,
    duplicates, sidecars without models, models without sidecars, unreadable files.

    With --query, print the matching rows instead (of the scanned folders, or of the whole
    catalog when no DIR is given). Exit status: 0, or 1 when a file could not be read,
    2 on usage errors."""
    if query is not None:
        from loratool.library.query import parse

        parse(query)  # a malformed query fails before any scanning
    if not paths:
        if query is None:
            raise UsageError(None, "give folders to scan, or --query EXPR to search the catalog")
        with open_catalog(db) as catalog:
            _print_rows(catalog.query(query), as_json)
        return
    with _progress_bar() as progress:
        result = scan(paths, db=db, hashes=hashes, validate=validate, jobs=jobs, progress=progress)
    for note in result.notes:
        click.echo(f"note: {_one_line(note)}", err=True)
    if query is not None:
        with open_catalog(result.db) as catalog:
            _print_rows(catalog.query(query, result.roots), as_json)
    elif as_json:
        with open_catalog(result.db) as catalog:
            _print_rows(list(catalog.records(result.roots)), as_json=True)
    else:
        _render(result)
    if as_json or query is not None:
        for path, message in result.report.errors:
            click.echo(f"error: {_one_line(path)}: {_one_line(message)}", err=True)
    if result.report.errors:
        sys.exit(1)


@contextmanager
def _progress_bar() -> Iterator[Progress | None]:
    """A rich progress bar on stderr when it is a terminal; nothing when piped."""
    from rich.console import Console

    console = Console(stderr=True)
    if not console.is_terminal:
        yield None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    # No refresh thread: the pool's workers are forked, which a running thread makes unsafe.
    bar = Progress(TextColumn("reading"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   console=console, transient=True, auto_refresh=False)
    task = bar.add_task("read", total=None)
    shown = [0.0]
    with bar:
        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)
            now = time.monotonic()
            if now - shown[0] >= 0.1 or done == total:
                shown[0] = now
                bar.refresh()
        yield update


def _print_rows(records: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        for r in records:
            sys.stdout.write(json.dumps(r, allow_nan=False, ensure_ascii=False) + "\n")
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(highlight=False)
    if not records:
        click.echo("no matching files", err=True)
        return
    if not console.is_terminal:  # piped: one tab-separated line per file, for cut/grep/sort
        for r in records:
            sys.stdout.write("\t".join(_one_line(c) for c in _row(r)) + "\n")
        return
    table = Table(box=None, padding=(0, 1), pad_edge=False, header_style="bold")
    for name in ("path", "family", "format", "network", "rank", "alpha", "modules", "size"):
        table.add_column(name, overflow="fold", no_wrap=name != "path",
                         justify="right" if name in ("rank", "alpha", "modules", "size") else "left")
    for r in records:
        cells = [escape(_one_line(c)) for c in _row(r)]
        if r["error"]:
            cells[0] = f"[red]{cells[0]}[/]"
        table.add_row(*cells)
    console.print(table)
    console.print(f"[dim]{len(records)} file(s)[/]")


def _one_line(text: str) -> str:
    """Text from a file name or a file, harmless on a terminal and kept on one line."""
    return printable(text).replace("\n", "\\n").replace("\t", "\\t")


def _row(r: dict[str, Any]) -> list[str]:
    alpha = r["alpha"]["max"]
    return [_shown(r["path"]), r["family"] or "-", r["format"] or "-", ",".join(r["network_types"]) or "-",
            _str(r["rank"]["max"]), "-" if alpha is None else f"{alpha:g}", _str(r["modules"]), _size(r["size"])]


def _str(v: Any) -> str:
    return "-" if v is None else str(v)


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return str(n)


def _shown(path: str) -> str:
    """A path relative to the working folder when it lies below it."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def _render(result: ScanResult) -> None:
    from rich.console import Console
    from rich.markup import escape

    console = Console(highlight=False)
    def out(text: str) -> None:
        console.print(text, soft_wrap=True)

    c, rep = result.counts, result.report

    def p(text: str) -> str:
        return escape(_one_line(text))

    roots = ", ".join(_shown(r) for r in result.roots)
    out(f"[bold]scanned {p(roots)}[/]: {rep.files} adapter(s) in the catalog {p(_shown(result.db))} ({result.elapsed:.1f} s)")
    out(f"  {c['new']} new · {c['changed']} changed · {c['unchanged']} unchanged · {c['renamed']} renamed · "
        f"{c['removed']} removed · {c['errors']} error(s) · {c['read']} read")
    if rep.files:
        out("")
        for label, counts in (("family", rep.by_family), ("format", rep.by_format), ("network", rep.by_network)):
            out(f"  [cyan]{label:<8}[/] " + (p(", ".join(f"{k} ×{n}" for k, n in counts.items())) or "-"))
    out("")
    if rep.duplicates is None:
        out("duplicates (same AutoV3): not checked, no file here is hashed yet (scan with --hashes)")
    else:
        _section(out, "duplicates (same AutoV3)", [" = ".join(_shown(x) for x in g) for g in rep.duplicates], p)
        if rep.unhashed:
            out(f"  ({rep.unhashed} file(s) not hashed yet are left out: scan with --hashes)")
    _section(out, "sidecars without a model", [_shown(x) for x in rep.orphan_sidecars], p)
    _section(out, "models without sidecars", [_shown(x) for x in rep.without_sidecars], p)
    _section(out, "renamed", [f"{_shown(a)} → {_shown(b)}" for a, b in result.renamed], p, always=False)
    _section(out, "removed from the catalog", [_shown(x) for x in result.removed], p, always=False)
    _section(out, "not read", [f"{_shown(x)}: {why}" for x, why in rep.skipped], p, always=False)
    _section(out, "errors", [f"{_shown(x)}: {why}" for x, why in rep.errors], p, style="red")


def _section(out: Any, title: str, lines: list[str], p: Any, always: bool = True, style: str = "") -> None:
    if not lines:
        if always:
            out(f"{title}: none")
        return
    head = f"[{style}]{p(title)}[/]" if style else p(title)
    out(f"{head}: {len(lines)}")
    for line in lines[:LISTED]:
        out(f"  {p(line)}")
    if len(lines) > LISTED:
        out(f"  … and {len(lines) - LISTED} more (--query or --json lists them all)")
