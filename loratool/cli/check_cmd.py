"""``loratool check``: will these LoRAs fit this checkpoint? Exit 0 all fit, 1 one does not,
2 on bad input."""

from __future__ import annotations

import json
import sys

import click

from loratool.errors import LoraToolError
from loratool.ops.check import CheckReport, LoraCheck, check
from loratool.terminal import markup

SHOWN_UNPLACED = 8


@click.command("check")
@click.argument("loras", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--base", required=True, type=click.Path(path_type=str), help="The checkpoint: single file, UNet-only file or diffusers folder.")
@click.option("--json", "as_json", is_flag=True, help="The report as JSON (fields in the README).")
def check_cmd(loras: tuple[str, ...], base: str, as_json: bool) -> None:
    """Check that LoRAs fit a checkpoint: every module placed on a checkpoint weight, from headers only."""
    try:
        report = check(list(loras), base)
    except LoraToolError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    if as_json:
        json.dump(report.to_json(), sys.stdout, indent=2, allow_nan=False)
        sys.stdout.write("\n")
    else:
        render(report)
    for e in report.errors:
        click.echo(f"error: {e['path']}: {e['error']}", err=True)
    sys.exit(2 if report.errors else 0 if report.fits else 1)


def render(report: CheckReport) -> None:
    """The report as a few lines per LoRA (rich markup; plain when piped)."""
    from rich.console import Console

    console = Console(highlight=False, soft_wrap=True)
    c = report.checkpoint
    parts = ", ".join(f"{name} {v['modules']}/{v['catalog_modules']} modules {'/'.join(v['dtypes'])}" for name, v in c["components"].items())
    console.print(f"[bold]{markup(c['path'])}[/bold]: {c['layout']}, [bold]{c['family']}[/bold] ({markup(parts)})")
    for w in c["warnings"]:
        console.print(f"  [yellow]warning[/yellow]: {markup(w)}")
    for lc in report.loras:
        for line in _lines(lc):
            console.print(line)


def _lines(lc: LoraCheck) -> list[str]:
    mark = "[green]fits[/green]" if lc.fits else f"[red]{lc.verdict}[/red]"
    where = ", ".join(f"{k} {n}" for k, n in lc.placed.items())
    kind = "" if lc.verdict == "wrong-family" else f" ({lc.format}, {lc.family})"
    head = f"{mark} {markup(lc.path)}{kind}: {markup(lc.message)}"
    lines = [head + (f" ({where})" if where and lc.verdict != "wrong-family" else "")]
    lines += [f"  [red]unplaced[/red] {markup(name)}: {markup(why)}" for name, why in list(lc.unplaced.items())[:SHOWN_UNPLACED]]
    if len(lc.unplaced) > SHOWN_UNPLACED:
        lines.append(f"  … and {len(lc.unplaced) - SHOWN_UNPLACED} more (--json lists all)")
    lines += [f"  note: {markup(n)}" for n in lc.notes]
    lines += [f"  [yellow]warning[/yellow]: {markup(w)}" for w in lc.warnings]
    return lines
