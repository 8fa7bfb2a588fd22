"""``loratool merge-loras``: several LoRAs into one (exact concat, or SVD to a rank), verified."""

from __future__ import annotations

import click

from loratool.cli.inspect_cmd import FAMILY_CHOICES
from loratool.cli.main import show_written
from loratool.formats.encode import DTYPES, TARGETS
from loratool.ops.merge_loras import MODES, MergeLorasResult, merge_loras


@click.command("merge-loras")
@click.argument("inputs", nargs=-1, required=True, metavar="LORA[:WEIGHT]...")
@click.option("-o", "--output", required=True, type=click.Path(path_type=str), help="Output file (kohya, diffusers) or folder (peft).")
@click.option("--mode", type=click.Choice(MODES), default="concat", show_default=True,
              help="concat: exact, ranks add up; svd: the sum re-factored to --rank.")
@click.option("--rank", type=int, help="Rank of every output module (--mode svd).")
@click.option("--to", "target", type=click.Choice(TARGETS), default="kohya", show_default=True, help="Output key format.")
@click.option("--dtype", type=click.Choice(tuple(DTYPES)), help="Output dtype (default: the inputs' when they agree, else fp32).")
@click.option("--family", type=click.Choice(FAMILY_CHOICES), help="Override base-model detection (all inputs).")
@click.option("--skip-unsupported", is_flag=True, help="Write the modules that can be merged; list the others.")
@click.option("--verify/--no-verify", default=True, show_default=True, help="Re-read the output and check every module against the weighted sum.")
@click.option("--force", is_flag=True, help="Replace an existing output.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def merge_loras_cmd(inputs: tuple[str, ...], output: str, mode: str, rank: int | None, target: str, dtype: str | None,
                    family: str | None, skip_unsupported: bool, verify: bool, force: bool, as_json: bool) -> None:
    """Merge LoRAs into one: ΔW = Σ weightᵢ·ΔWᵢ (weights default to 1; negative ones work)."""
    r = merge_loras(list(inputs), output, mode=mode, rank=rank, target=target, dtype=dtype, family=family,
                    skip_unsupported=skip_unsupported, force=force, verify=verify)
    show_written(r, as_json, render)


def render(r: MergeLorasResult) -> None:
    ranks = sorted({m.rank_out for m in r.modules})
    rank = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}–{ranks[-1]}"
    click.echo(f"wrote {r.output} ({r.target}, {r.family}, {len(r.modules)} modules, rank {rank}, {r.mode})")
    for path in r.files:
        if path != r.output:
            click.echo(f"  {path}")
    for i in r.inputs:
        click.echo(f"  {i.weight:+g} × {i.path} ({i.format}, {i.modules} modules)")
    if r.mode == "svd" and r.modules:
        worst = min(r.modules, key=lambda m: m.retained)
        mean = sum(m.retained for m in r.modules) / len(r.modules)
        click.echo(f"retained ‖ΔW‖_F: mean {mean:.2%}, min {worst.retained:.2%} ({worst.name})")
    if r.max_deviation is not None:
        what = "the weighted sum" if r.mode == "concat" else "the best rank-k approximation of the weighted sum"
        click.echo(f"verified: every module is {what} (largest deviation {r.max_deviation:.2g} of ‖ΔW‖)")
