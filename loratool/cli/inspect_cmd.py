"""``loratool inspect``: a compact rich summary, or JSON for scripts."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import click

from loratool.cli.main import FileErrors
from loratool.library.walk import NOT_A_MODEL, WalkEntry
from loratool.ops.inspect import InspectReport, survey
from loratool.terminal import markup

FAMILY_CHOICES = ("sd1", "sd2", "sdxl", "sdxl-refiner", "sd3", "flux")


@click.command("inspect")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="One JSON object for one adapter; an array for several paths or a folder.")
@click.option("--hashes", is_flag=True, help="Add sha256, AutoV1, AutoV2 and AutoV3 (reads the whole file).")
@click.option("--keys", is_flag=True, help="List every tensor key.")
@click.option("--family", type=click.Choice(FAMILY_CHOICES), help="Override family detection.")
def inspect_cmd(paths: tuple[str, ...], as_json: bool, hashes: bool, keys: bool, family: str | None) -> None:
    """Show format, family, network types, rank, alpha and targets of LoRA files or folders.

    Folders are walked recursively; an adapter folder (PEFT/diffusers layout) is one
    adapter. What is not an adapter is listed on stderr (files that are not model files
    as one summary line per folder), and every unreadable entry gets an error line."""
    reports: list[dict[str, Any]] = []
    errors = FileErrors()
    adapters: Counter[str] = Counter()  # root -> adapter entries found under it
    others: dict[str, list[WalkEntry]] = {}  # root -> files that are not model files
    for item in survey(paths, hashes=hashes, keys=keys, family=family):
        entry = item.entry
        adapters[entry.root] += entry.is_adapter
        if item.report is not None:
            with errors.guard(entry.path):
                if as_json:
                    fields = item.report.to_json()
                    json.dumps(fields, allow_nan=False)  # one that is not strict JSON fails here, alone
                    reports.append(fields)
                else:
                    render(item.report)
        if item.error is not None:
            errors.record(item.error, entry.path)
        elif item.report is None and entry.reason == NOT_A_MODEL:
            others.setdefault(entry.root, []).append(entry)
        elif item.report is None:
            click.echo(f"note: {entry.path}: {entry.reason}", err=True)
    for root in paths:
        skipped = others.get(root, [])
        if skipped:
            click.echo(f"note: {root}: skipped {len(skipped)} file(s) that are not model files ({_suffixes(skipped)})", err=True)
        if not adapters[root] and Path(root).is_dir():
            click.echo(f"error: {root}: holds no adapter (none in this folder or below it)", err=True)
            errors.fail(1)
    if as_json:
        payload: Any = reports
        if len(paths) == 1 and len(reports) == 1 and reports[0]["path"] == paths[0]:
            payload = payload[0]  # one adapter named directly: one object
        json.dump(payload, sys.stdout, indent=2, allow_nan=False)
        sys.stdout.write("\n")
    if errors.exit_code:
        sys.exit(errors.exit_code)


def _suffixes(entries: list[WalkEntry]) -> str:
    counts = Counter(e.suffix or "no extension" for e in entries)
    return ", ".join(f"{s} ×{n}" if n > 1 else s for s, n in sorted(counts.items()))


def render(r: InspectReport) -> None:
    """Print one report as a compact rich table. Everything read from the file (path, keys,
    metadata, module names in warnings) goes through :func:`loratool.terminal.markup`:
    shown as text, never as rich markup or terminal escapes."""
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    table = Table(show_header=False, box=None, padding=(0, 1), title=markup(r.path), title_justify="left", title_style="bold")
    table.add_column(style="cyan", no_wrap=True)
    table.add_column(overflow="fold")
    table.add_row("format", markup(f"{r.format}" + (f" ({r.variant})" if r.variant else "")))
    table.add_row("family", f"[bold]{markup(r.family)}[/bold]  " + markup("; ".join(r.family_evidence[:3])))
    table.add_row("network", markup(", ".join(r.network_types)))
    table.add_row("modules", markup(f"{r.modules}  (" + ", ".join(f"{c} {n}" for c, n in r.components.items()) + ")"))
    table.add_row("rank", _span(r.rank))
    table.add_row("alpha", _span(r.alpha))
    table.add_row("targets", markup(", ".join(f"{t}×{n}" for t, n in r.targets.items())))
    table.add_row("dtypes", markup(", ".join(r.dtypes)))
    if r.metadata:
        shown = [f"{k}={_short(v)}" for k, v in r.metadata.items() if k.startswith(SHOWN_METADATA)]
        table.add_row("metadata", markup(f"{len(r.metadata)} keys" + (": " + ", ".join(shown) if shown else "")))
    table.add_row("complete", "yes" if r.complete else "[yellow]no[/yellow]")
    if r.hashes:
        table.add_row("hashes", markup(", ".join(f"{k}={v}" for k, v in r.hashes.items() if not isinstance(v, dict))
                                       or json.dumps(r.hashes, allow_nan=False)))
    for w in r.warnings:
        table.add_row("[yellow]warning[/yellow]", markup(w))
    for note in r.loader_notes:
        table.add_row("loaders", markup(note))
    if r.unknown_keys:
        table.add_row("[yellow]unknown[/yellow]", markup(f"{len(r.unknown_keys)} keys, e.g. {r.unknown_keys[0]}"))
    if r.keys is not None:
        table.add_row("keys", "\n".join(markup(k) for k in r.keys))
    console.print(table)


SHOWN_METADATA = ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_base_model_version", "modelspec.architecture", "modelspec.title")


def _span(d: dict[str, Any]) -> str:
    lo, hi = d.get("min"), d.get("max")
    if lo is None:
        return "-"
    fmt = (lambda x: f"{x:g}") if isinstance(lo, float) else str
    return fmt(lo) if lo == hi else f"{fmt(lo)}–{fmt(hi)}"


def _short(v: str, n: int = 40) -> str:
    return v if len(v) <= n else v[: n - 1] + "…"
