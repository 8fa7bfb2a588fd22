"""``loratool extract``: a LoRA from a fine-tuned checkpoint (truncated SVD of W′ − W0)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager

import click

from loratool.cli.main import progress_bar, terminate_cleanly
from loratool.formats.encode import DTYPES, TARGETS
from loratool.ops.extract import (
    DEFAULT_MIN_DIFF,
    DEVICES,
    DYNAMIC_METHODS,
    TEXT_ENCODER_MODES,
    ExtractResult,
    extract,
)


@click.command("extract")
@click.argument("base", type=click.Path(path_type=str))
@click.argument("tuned", type=click.Path(path_type=str))
@click.option("-o", "--output", required=True, type=click.Path(path_type=str), help="Output file (kohya, diffusers) or folder (peft).")
@click.option("--rank", type=int, help="Rank of linear and 1×1-conv modules; with --dynamic, the largest allowed.")
@click.option("--conv-rank", type=int, default=0, show_default=True, help="Rank of 3×3 convs (resnets, down/upsamplers); 0 leaves them out.")
@click.option("--dynamic", type=click.Choice(DYNAMIC_METHODS), help="Choose each module's rank from its singular values.")
@click.option("--threshold", type=float, help="ratio: keep σ ≥ σ₀/t (t ≥ 1); fro: keep ‖ΔW_k‖/‖ΔW‖ ≥ t; cumulative: keep Σσ_k/Σσ ≥ t.")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True, help="Where the fp32 SVDs run (auto: CUDA when torch sees one).")
@click.option("--dtype", type=click.Choice(tuple(DTYPES)), default="fp16", show_default=True, help="Dtype of the LoRA factors.")
@click.option("--clamp-quantile", type=float, help="Clamp both factors to this quantile of their |values| (off by default; kohya uses 0.99).")
@click.option("--text-encoders", type=click.Choice(TEXT_ENCODER_MODES), default="auto", show_default=True,
              help="auto: extract them when some |ΔW| exceeds --min-diff.")
@click.option("--min-diff", type=float, default=DEFAULT_MIN_DIFF, show_default=True, help="--text-encoders auto: the max |ΔW| that counts as identical.")
@click.option("--skip-below", type=float, help="Skip modules with ‖ΔW‖/‖W0‖ at or below this (default: 1e-6, or the coarser dtype's rounding).")
@click.option("--to", "target", type=click.Choice(TARGETS), default="kohya", show_default=True, help="Output key format.")
@click.option("--exact", is_flag=True, help="Full economy SVD per module instead of the randomized range finder.")
@click.option("--stats", is_flag=True, help="Per-module rank, retained ‖ΔW‖ and error (a table; in --json always).")
@click.option("--verify/--no-verify", default=True, show_default=True, help="Re-read the output and check every module.")
@click.option("--force", is_flag=True, help="Replace an existing output.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def extract_cmd(base: str, tuned: str, output: str, rank: int | None, conv_rank: int, dynamic: str | None,
                threshold: float | None, device: str, dtype: str, clamp_quantile: float | None, text_encoders: str,
                min_diff: float, skip_below: float | None, target: str, exact: bool, stats: bool, verify: bool,
                force: bool, as_json: bool) -> None:
    """Extract a LoRA from a fine-tuned checkpoint: ΔW = TUNED − BASE, truncated SVD per module.

    BASE and TUNED are single files or diffusers folders, of one family, in any dtypes.
    Modules kohya's LoRA targets are extracted (3×3 convs with --conv-rank); modules
    whose ΔW is zero or negligible are skipped and listed."""
    with _progress() as advance, terminate_cleanly():
        r = extract(base, tuned, output, rank=rank, conv_rank=conv_rank, dynamic=dynamic, threshold=threshold,
                    device=device, dtype=dtype, clamp_quantile=clamp_quantile, text_encoders=text_encoders,
                    min_diff=min_diff, target=target, exact=exact, skip_below=skip_below, force=force,
                    verify=verify, progress=advance)
    if as_json:
        json.dump(r.to_json(), sys.stdout, indent=2, allow_nan=False, ensure_ascii=False)
        sys.stdout.write("\n")
        return
    render(r, stats)


def render(r: ExtractResult, stats: bool) -> None:
    """Summary lines; with ``stats``, a per-module table."""
    s = r.summary()
    ranks = "/".join(map(str, s["ranks"])) if len(s["ranks"]) <= 3 else f"{s['ranks'][0]}–{s['ranks'][-1]}"
    click.echo(f"wrote {r.output} ({r.target}, {r.family}, {s['extracted']} modules, rank {ranks}, {r.dtype}, "
               f"{r.method} SVD on {r.device})")
    for path in r.files:
        if path != r.output:
            click.echo(f"  {path}")
    click.echo(r.text_encoders.message)
    if stats:
        _table(r)
    click.echo(f"retained ‖ΔW‖_F: {s['retained']:.2%} overall, min {s['min_retained']:.2%} ({s['min_retained_module']}); "
               f"error {s['error']:.2%}")
    if r.verified:
        click.echo("verified: the output holds every module's factors as computed, at scale 1")
    skipped = [m for m in r.skipped if not m.skipped or not m.skipped.startswith("text encoder not extracted")]
    if skipped:
        click.echo(f"skipped {len(skipped)} module(s):")
        for m in skipped:
            click.echo(f"  {m.name}: {m.skipped}")


def _table(r: ExtractResult) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, padding=(0, 1), header_style="bold")
    for col, justify in (("module", "left"), ("kind", "left"), ("shape", "right"), ("rank", "right"),
                         ("‖ΔW‖/‖W0‖", "right"), ("retained", "right"), ("error", "right")):
        table.add_column(col, justify=justify, overflow="fold" if col == "module" else "ellipsis")
    for m in r.extracted:
        table.add_row(m.name, m.kind, "×".join(map(str, m.shape)), str(m.rank), f"{m.relative:.2g}" if m.relative is not None else "-",
                      f"{m.retained:.2%}", f"{m.error:.2%}")
    Console(highlight=False, width=None if sys.stdout.isatty() else 160).print(table)


def _progress() -> AbstractContextManager[Callable[[int, int], None] | None]:
    """Modules done, elapsed and time left (rich is imported only for a terminal)."""
    if not sys.stderr.isatty():
        return progress_bar("extracting")
    from rich.progress import MofNCompleteColumn, TimeElapsedColumn, TimeRemainingColumn

    return progress_bar("extracting", MofNCompleteColumn(), "modules", TimeElapsedColumn(), TimeRemainingColumn())
