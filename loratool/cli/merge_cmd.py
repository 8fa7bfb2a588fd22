"""``loratool merge``: bake LoRAs into a checkpoint, streaming, with a progress bar on a terminal."""

from __future__ import annotations

import sys
from collections.abc import Callable
from contextlib import AbstractContextManager

import click

from loratool.cli.main import progress_bar, terminate_cleanly
from loratool.ops.merge import DEVICES, DTYPES, MergeResult, merge, parse_lora_arg
from loratool.terminal import safe


@click.command("merge")
@click.argument("checkpoint", type=click.Path(path_type=str))
@click.argument("loras", nargs=-1, required=True, metavar="LORA[:TE[:UNET]]...")
@click.option("-o", "--output", required=True, type=click.Path(path_type=str), help="Output file (or folder, for a diffusers folder).")
@click.option("--dtype", type=click.Choice(tuple(DTYPES)), help="Cast every floating tensor (default: keep each tensor's dtype).")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True, help="Where the fp32 math runs.")
@click.option("--allow-partial", is_flag=True, help="Merge what has a place in the checkpoint; list the rest.")
@click.option("--force", is_flag=True, help="Replace an existing output.")
def merge_cmd(checkpoint: str, loras: tuple[str, ...], output: str, dtype: str | None, device: str, allow_partial: bool, force: bool) -> None:
    """Merge LoRAs into a checkpoint: W ← W0 + Σ weight·ΔW, in fp32, cast once.

    Each LORA may carry weights in A1111's <lora:NAME:TE:UNET> order: LORA:0.8 sets both,
    LORA:0.5:1.0 is text encoder 0.5 and UNet 1.0; also LORA:te=0.5:unet=1 (negative
    weights subtract). Untouched tensors are copied byte for byte; the output appears
    only when complete."""
    specs = [parse_lora_arg(a) for a in loras]
    with _progress() as advance, terminate_cleanly():
        r = merge(checkpoint, specs, output, dtype=dtype, device=device, allow_partial=allow_partial, force=force, progress=advance)
    _report(r)


def _report(r: MergeResult) -> None:
    click.echo(
        f"wrote {r.output} ({r.family}, {r.layout}): {r.tensors_merged} tensor(s) merged, "
        f"{r.tensors_copied} copied{f', {r.tensors_cast} cast' if r.tensors_cast else ''}, "
        f"{r.bytes_written / 1e9:.2f} GB, on {r.device}"
    )
    for x in r.loras:
        click.echo(f"  {x.path}: {x.modules} module(s) at te {x.te:g}, unet {x.unet:g}")
    for path in r.files:
        if path != r.output:
            click.echo(f"  {path}")
    for path, unplaced in r.unplaced.items():
        click.echo(f"{safe(path)}: left out {len(unplaced)} module(s)/key(s) (--allow-partial):", err=True)
        for name, why in unplaced.items():
            click.echo(f"  {safe(name)}: {safe(why)}", err=True)


def _progress() -> AbstractContextManager[Callable[[int, int], None] | None]:
    """Bytes written, speed and time left (rich is imported only for a terminal)."""
    if not sys.stderr.isatty():
        return progress_bar("merging")
    from rich.progress import DownloadColumn, TimeRemainingColumn, TransferSpeedColumn

    return progress_bar("merging", DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
