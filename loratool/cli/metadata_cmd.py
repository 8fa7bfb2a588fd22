"""``loratool metadata show|set|strip``: read and edit safetensors metadata, header only."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from loratool import jsonstrict
from loratool.errors import LoraToolError, UsageError
from loratool.ops.metadata import MetadataEdit, MetadataView, set_metadata, show, strip
from loratool.terminal import printable


def _output_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--fix-hashes", is_flag=True, help="Recompute sshs_model_hash, sshs_legacy_hash and modelspec.hash_sha256.")(f)
    f = click.option("--force", is_flag=True, help="Replace an existing output.")(f)
    f = click.option("--in-place", is_flag=True, help="Rewrite the file itself (temp file + rename).")(f)
    f = click.option("-o", "--output", type=click.Path(path_type=str), help="Write the result here (one input).")(f)
    return f


@click.group("metadata")
def metadata_group() -> None:
    """Show and edit the metadata of .safetensors files (tensor data is never touched)."""


@metadata_group.command("show")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per path (an array for several).")
def show_cmd(paths: tuple[str, ...], as_json: bool) -> None:
    """Print every metadata key and value."""
    views: list[MetadataView] = []
    failed = _each(paths, lambda p: views.append(show(p)))
    if as_json:
        payload: Any = [v.to_json() for v in views]
        json.dump(payload[0] if len(paths) == 1 and views else payload, sys.stdout, indent=2, allow_nan=False)
        sys.stdout.write("\n")
    else:
        for view in views:
            _render(view)
    if failed:
        sys.exit(1)


@metadata_group.command("set")
@click.argument("args", nargs=-1, required=True)
@click.option("--from-json", "from_json", type=click.Path(exists=True, dir_okay=False, path_type=str),
              help="A JSON object of keys to set (strings as they are, other values as JSON text, null removes).")
@click.option("--delete", "deletes", multiple=True, metavar="KEY", help="Remove a key (repeatable).")
@_output_options
def set_cmd(args: tuple[str, ...], from_json: str | None, deletes: tuple[str, ...], output: str | None,
            in_place: bool, force: bool, fix_hashes: bool) -> None:
    """Set metadata: PATH... KEY=VALUE... (an argument that is an existing path is a file)."""
    paths, values = _split_args(args)
    if from_json:
        values = {**_json_values(from_json), **values}
    values.update({k: None for k in deletes})
    if not values and not fix_hashes:
        raise UsageError(None, "nothing to set: give KEY=VALUE, --from-json, --delete or --fix-hashes")
    _edit(paths, output, lambda p, out: set_metadata(p, values, output=out, in_place=in_place, force=force, fix_hashes=fix_hashes))


@metadata_group.command("strip")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--privacy", is_flag=True, help="Remove what `validate` flags as private (paths, dataset folder names).")
@click.option("--all", "everything", is_flag=True, help="Keep only the keys loaders read (see README).")
@_output_options
def strip_cmd(paths: tuple[str, ...], privacy: bool, everything: bool, output: str | None,
              in_place: bool, force: bool, fix_hashes: bool) -> None:
    """Remove private or all non-essential metadata."""
    if privacy == everything:
        raise UsageError(None, "choose one of --privacy or --all")
    _edit(list(paths), output, lambda p, out: strip(p, privacy=privacy, everything=everything, output=out,
                                                     in_place=in_place, force=force, fix_hashes=fix_hashes))


def _split_args(args: tuple[str, ...]) -> tuple[list[str], dict[str, str | None]]:
    paths: list[str] = []
    values: dict[str, str | None] = {}
    for arg in args:
        key, eq, value = arg.partition("=")
        if eq and key and not os.path.exists(arg):
            values[key] = value
        else:
            paths.append(arg)
    if not paths:
        raise UsageError(None, "give the .safetensors file(s) to edit before KEY=VALUE")
    return paths, values


def _json_values(path: str) -> dict[str, str | None]:
    try:
        obj = jsonstrict.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # bad UTF-8, JSON or a NaN
        raise UsageError(path, f"cannot read a JSON object: {exc.__class__.__name__}") from None
    if not isinstance(obj, dict):
        raise UsageError(path, "must hold a JSON object of key: value")
    return {str(k): v if v is None or isinstance(v, str) else json.dumps(v, ensure_ascii=False, allow_nan=False) for k, v in obj.items()}


def _each(paths: tuple[str, ...] | list[str], fn: Callable[[str], None]) -> bool:
    """Run ``fn`` on every path; an error is one line and the others still run."""
    failed = False
    for path in paths:
        try:
            fn(path)
        except UsageError:
            raise
        except LoraToolError as err:
            click.echo(printable(f"error: {err}"), err=True)
            failed = True
    return failed


def _edit(paths: list[str], output: str | None, fn: Callable[[str, str | None], MetadataEdit]) -> None:
    if output is not None and len(paths) > 1:
        raise UsageError(None, "-o takes one input; use --in-place for several")
    failed = _each(paths, lambda p: _report(fn(p, output)))
    if failed:
        sys.exit(1)


def _report(edit: MetadataEdit) -> None:
    parts = [f"{label}: {_names(keys)}" for label, keys in (
        ("added", edit.added), ("changed", edit.changed), ("redacted", edit.redacted), ("removed", edit.removed)) if keys]
    click.echo(printable(f"wrote {edit.output}" + (f" ({'; '.join(parts)})" if parts else " (metadata unchanged)")))
    for key in ("sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256"):
        if key in edit.added or key in edit.changed:
            click.echo(f"  {key} = {printable(edit.metadata[key])}")
    for note in edit.notes:
        click.echo(f"  note: {note}")


def _names(keys: list[str], shown: int = 8) -> str:
    return ", ".join(keys) if len(keys) <= shown else ", ".join(keys[:shown]) + f", … ({len(keys)} keys)"


def _render(view: MetadataView) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(show_header=False, box=None, padding=(0, 1), title=escape(printable(view.path)), title_justify="left", title_style="bold")
    table.add_column(style="cyan", no_wrap=True)
    table.add_column(overflow="fold")
    for key, value in view.metadata.items():
        table.add_row(escape(printable(key)), escape(printable(value if len(value) <= 240 else value[:239] + "…")))
    if not view.metadata:
        table.add_row("(none)", "")
    Console(highlight=False).print(table)
