"""``loratool convert``: kohya ⇄ diffusers ⇄ PEFT, verified."""

from __future__ import annotations

import click

from loratool.cli.inspect_cmd import FAMILY_CHOICES
from loratool.cli.main import one_line, processing
from loratool.formats.encode import DTYPES, TARGETS
from loratool.ops.convert import convert


@click.command("convert")
@click.argument("src", type=click.Path(path_type=str))
@click.option("--to", "target", type=click.Choice(TARGETS), required=True, help="Output key format.")
@click.option("-o", "--output", required=True, type=click.Path(path_type=str), help="Output file (kohya, diffusers) or folder (peft).")
@click.option("--family", type=click.Choice(FAMILY_CHOICES), help="Override base-model detection.")
@click.option("--dtype", type=click.Choice(tuple(DTYPES)), help="Cast floating tensors on write (default: keep each).")
@click.option("--verify/--no-verify", default=True, show_default=True, help="Re-read the output and compare every module's ΔW.")
@click.option("--skip-unsupported", is_flag=True, help="Write what the target can hold; list what was left out.")
@click.option("--force", is_flag=True, help="Replace an existing output.")
@click.option(
    "--keep-factors", is_flag=True,
    help="diffusers: keep the factors bit-identical, alpha only in lora_adapter_metadata (which ComfyUI ignores).",
)
def convert_cmd(
    src: str, target: str, output: str, family: str | None, dtype: str | None, verify: bool, skip_unsupported: bool,
    force: bool, keep_factors: bool,
) -> None:
    """Convert a LoRA between kohya (A1111/ComfyUI), diffusers and PEFT key formats."""
    with processing(src):
        r = convert(
            src, target, output, family=family, dtype=dtype, verify=verify, skip_unsupported=skip_unsupported,
            force=force, keep_factors=keep_factors,
        )
    click.echo(f"wrote {r.output} ({r.target}, {r.family}, {r.modules} modules)")
    for path in r.files:
        if path != r.output:
            click.echo(f"  {path}")
    if r.folded_modules:
        click.echo(
            f"alpha/rank folded into the factors of {r.folded_modules} module(s), lora_alpha = r: "
            "every loader applies the same strength (--keep-factors keeps them bit-identical)"
        )
    if r.max_abs_diff is not None:
        relation = "≤" if r.bounded_modules else "="  # a bound from the factors where they were compared
        click.echo(f"verified: max |ΔW difference| {relation} {r.max_abs_diff:.3g} over {r.modules} modules ({r.identical_modules} byte-identical)")
    for key, change in r.metadata_changes.items():
        click.echo(f"metadata: {key} {change}: it contradicted the written family {r.family}", err=True)
    if r.skipped:
        click.echo(f"left out {len(r.skipped)} module(s)/key(s):", err=True)
        for name, why in r.skipped.items():
            click.echo(f"  {one_line(name)}: {one_line(why)}", err=True)
