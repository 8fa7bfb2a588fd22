"""``loratool resize``: new ranks for a LoRA, exact (QR + small SVD), verified."""

from __future__ import annotations

import sys

import click

from loratool.cli.inspect_cmd import FAMILY_CHOICES
from loratool.cli.main import show_written
from loratool.formats.encode import DTYPES, TARGETS
from loratool.lowrank.rank import RANK_METHODS
from loratool.ops.resize import ResizeResult, resize


@click.command("resize")
@click.argument("src", type=click.Path(path_type=str))
@click.option("-o", "--output", required=True, type=click.Path(path_type=str), help="Output file (kohya, diffusers) or folder (peft).")
@click.option("--rank", type=int, help="Target rank; with --dynamic, the largest rank allowed.")
@click.option("--dynamic", type=click.Choice(RANK_METHODS), help="Choose each module's rank from its singular values.")
@click.option("--threshold", type=float, help="ratio: keep σ ≥ σ₀/t (t ≥ 1); fro: keep ‖ΔW_k‖/‖ΔW‖ ≥ t; cumulative: keep Σσ_k/Σσ ≥ t.")
@click.option("--to", "target", type=click.Choice(TARGETS), help="Output key format (default: the input's).")
@click.option("--dtype", type=click.Choice(tuple(DTYPES)), help="Cast floating tensors on write (default: keep each module's).")
@click.option("--family", type=click.Choice(FAMILY_CHOICES), help="Override base-model detection.")
@click.option("--svd-full", is_flag=True, help="Also re-factor LoHa/LoKr/full modules (ΔW formed, SVD) and DoRA modules (ΔW truncated, magnitude kept).")
@click.option("--skip-unsupported", is_flag=True, help="Write the modules that can be resized; list the others.")
@click.option("--verify/--no-verify", default=True, show_default=True, help="Re-read the output and check every module's error.")
@click.option("--force", is_flag=True, help="Replace an existing output.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def resize_cmd(src: str, output: str, rank: int | None, dynamic: str | None, threshold: float | None, target: str | None,
               dtype: str | None, family: str | None, svd_full: bool, skip_unsupported: bool, verify: bool, force: bool,
               as_json: bool) -> None:
    """Resize a LoRA to --rank N, or per module with --dynamic/--threshold, keeping its strength."""
    r = resize(src, output, rank=rank, dynamic=dynamic, threshold=threshold, target=target, dtype=dtype,
               family=family, svd_full=svd_full, skip_unsupported=skip_unsupported, force=force, verify=verify)
    show_written(r, as_json, render)


def render(r: ResizeResult) -> None:
    """Summary lines; a per-module table when stdout is a terminal."""
    summary = r.to_json()["summary"]
    counts = ", ".join(f"{n} {a}" for a, n in r.counts().items() if n)
    click.echo(f"wrote {r.output} ({r.target}, {r.family}, {len(r.modules)} modules: {counts})")
    for path in r.files:
        if path != r.output:
            click.echo(f"  {path}")
    if sys.stdout.isatty():
        _table(r)
    changed = len(r.modules) - summary["unchanged"]
    if changed:
        click.echo(f"retained ‖ΔW‖_F over the {changed} changed modules: mean {summary['mean_retained']:.2%}, "
                   f"min {summary['min_retained']:.2%} ({summary['min_retained_module']})")
    if r.max_deviation is not None:
        click.echo(f"verified: each module's ‖ΔW_in − ΔW_out‖_F is its truncation error "
                   f"(largest deviation {r.max_deviation:.2g} of ‖ΔW‖)")


def _table(r: ResizeResult) -> None:
    from rich.console import Console
    from rich.table import Table

    from loratool.terminal import markup

    table = Table(box=None, padding=(0, 1), header_style="bold")
    for col, justify in (("module", "left"), ("type", "left"), ("rank", "right"), ("alpha", "right"),
                         ("retained", "right"), ("error", "right")):
        table.add_column(col, justify=justify, overflow="fold" if col == "module" else "ellipsis")
    for m in r.modules:
        rank = f"{m.rank_in} → {m.rank_out}" if m.rank_in is not None else f"→ {m.rank_out}"
        alpha = f"{m.alpha_out:g}" if m.alpha_out is not None else "-"
        table.add_row(markup(m.name), m.network_type, rank, alpha, f"{m.retained:.2%}", f"{m.error:.2%}")
    Console(highlight=False).print(table)
