"""``loratool validate``: findings per file as a compact list, or JSON for CI."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from loratool.cli.inspect_cmd import FAMILY_CHOICES
from loratool.library.walk import ERROR, walk
from loratool.ops.validate import ValidationReport, validate
from loratool.terminal import printable

SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}


def expand(paths: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(paths to validate, error lines): a folder that is not itself an adapter stands for
    the LoRA files and adapter folders under it (the shared library walk); what could not
    be walked, and folders that held nothing, are errors."""
    out: list[str] = []
    errors: list[str] = []
    for path in paths:
        if not Path(path).is_dir():
            out.append(path)
            continue
        found = 0
        for entry in walk([path]):
            if entry.is_adapter:
                out.append(entry.path)
                found += 1
            elif entry.kind == ERROR:
                errors.append(f"{entry.path}: {entry.reason}")
        if not found:
            errors.append(f"{path}: no LoRA files under this folder")
    return out, errors


@click.command("validate")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--strict", is_flag=True, help="Exit 1 on warnings too, not only on errors.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per path (an array for several).")
@click.option("--allow-pickle", is_flag=True, help="Read .pt/.ckpt/.bin files (weights-only loading).")
@click.option("--header-only", is_flag=True, help="Skip the pass over tensor data (NaN/Inf, norms, hashes).")
@click.option("--family", type=click.Choice(FAMILY_CHOICES), help="Override family detection.")
@click.pass_context
def validate_cmd(ctx: click.Context, paths: tuple[str, ...], strict: bool, as_json: bool,
                 allow_pickle: bool, header_only: bool, family: str | None) -> None:
    """Check LoRA files before publishing: structure, NaN/Inf and exploding modules,
    metadata against the tensors, private paths, pickles, and loader traps.

    Exit status: 0 clean, 1 on errors (with --strict also on warnings), 2 on usage
    errors. Finding codes are listed in the README."""
    debug = bool((ctx.obj or {}).get("debug"))
    files, errors = expand(paths)
    failed = False
    for line in errors:
        click.echo(f"error: {printable(line)}", err=True)
        failed = True
    reports: list[ValidationReport] = []
    for path in files:
        try:
            report = validate(path, allow_pickle=allow_pickle, family=family, read_data=not header_only)
        except Exception as exc:  # a bug: say so, and go on with the other files
            if debug:
                raise
            click.echo(f"error: {path}: internal error ({exc.__class__.__name__}: {exc}); "
                       "please report it (rerun with --debug for the traceback)", err=True)
            failed = True
            continue
        reports.append(report)
        failed = failed or report.failed(strict)
        if not as_json:
            render(report, strict)
    if as_json:
        payload: Any = [r.to_json() for r in reports]
        if files == list(paths) and len(files) == 1 and reports:  # one file or adapter folder
            payload = payload[0]
        json.dump(payload, sys.stdout, indent=2, allow_nan=False)
        sys.stdout.write("\n")
    if failed:
        sys.exit(1)


def render(r: ValidationReport, strict: bool) -> None:
    """One file: a status line, then one row per finding."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(highlight=False)
    c = r.counts
    status = "[bold red]FAIL[/]" if r.failed(strict) else "[green]ok[/]"
    what = ""
    if r.adapter:
        a = r.adapter
        what = f"  {a['format']} {a['family']} ({', '.join(a['network_types'])}, {a['modules']} modules)"
    tally = ", ".join(f"{n} {s}" for s, n in c.items() if n) or "clean"
    console.print(f"{status} [bold]{escape(printable(r.path))}[/]{escape(what)} — {tally}", soft_wrap=True)
    if not r.findings:
        return
    if not console.is_terminal:  # piped: one line per finding, for grep
        for f in r.findings:
            console.print(f"  {f.severity:<7}  {f.code}  {escape(printable(f.message))}", soft_wrap=True)
        return
    table = Table(show_header=False, box=None, padding=(0, 1), pad_edge=False)
    table.add_column(no_wrap=True)
    table.add_column(no_wrap=True, style="dim")
    table.add_column(overflow="fold")
    for f in r.findings:
        table.add_row(f"  [{SEVERITY_STYLE[f.severity]}]{f.severity}[/]", f.code, escape(printable(f.message)))
    console.print(table)
