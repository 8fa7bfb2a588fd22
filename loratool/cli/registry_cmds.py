"""``loratool search | info | lookup | fetch | config``: a thin skin over ``loratool.registry``.

Tables and progress go through rich; progress and warnings go to stderr so that ``--json``
output on stdout stays clean. The token is never echoed, logged or put in a URL. Every
string that came from a registry is printed through :mod:`loratool.terminal`
(``safe``/``markup``/``safe_json``): no escape sequence, bidi override or rich markup in a
model name reaches the terminal as anything but visible text.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from loratool.errors import UsageError
from loratool.registry import (
    FetchOptions,
    FileChoice,
    RegistryClient,
    RetryPolicy,
    Timeouts,
    check_target,
    fetch_version,
    lookup_files,
    parse_target,
    resolve,
    resolve_version,
)
from loratool.registry import config as cfg
from loratool.terminal import markup, safe, safe_json

if TYPE_CHECKING:  # rich loads only when something is rendered (fast `fetch --quiet`)
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

SORTS = ("Highest Rated", "Most Downloaded", "Most Liked", "Most Discussed", "Most Collected",
         "Most Images", "Newest", "Oldest")
PERIODS = ("AllTime", "Year", "Month", "Week", "Day")


def registry_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--registry`` and ``--token``, shared by every command that talks to a registry."""
    fn = click.option("--token", envvar=None, default=None, metavar="TOKEN",
                      help="API token (else LORATOOL_TOKEN, CIVITAI_API_TOKEN for Civitai, or the config).")(fn)
    return click.option("--registry", default=None, metavar="URL|NAME",
                        help="Registry site root or configured name (else LORATOOL_REGISTRY, "
                             "the config, https://civitai.com).")(fn)


def make_client(registry: str | None, token: str | None, retries: int | None = None,
                stall: float | None = None) -> RegistryClient:
    settings = resolve(registry, token)
    _debug_logging()
    return RegistryClient(settings.url, settings.token, retry=RetryPolicy.from_env(retries),
                          timeouts=Timeouts(stall=stall or 60.0))


def _debug_logging() -> None:
    ctx = click.get_current_context(silent=True)
    if ctx and (ctx.find_root().obj or {}).get("debug"):
        logging.basicConfig(stream=sys.stderr, level=logging.DEBUG, format="debug: %(name)s: %(message)s")


def err_console() -> Console:
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def out_console() -> Console:
    from rich.console import Console

    return Console(highlight=False, soft_wrap=False)


def new_table(title: str) -> Table:
    from rich.table import Table

    return Table(title=title)


def warn(path: Any, message: str) -> None:
    click.echo(f"warning: {safe(path)}: {safe(message)}", err=True)


def emit_json(data: Any) -> None:
    click.echo(safe_json(data))


def row(*cells: object) -> list[str]:
    """Table cells from registry values: safe for the terminal and for rich markup."""
    return [markup(c) for c in cells]


def human_size(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


# -- search ---------------------------------------------------------------------------------

@click.command("search")
@click.argument("query")
@click.option("--type", "types", multiple=True, metavar="TYPE", help="Model type, e.g. LORA, LoCon (repeatable).")
@click.option("--base-model", "base_models", multiple=True, metavar="NAME",
              help='Base model, e.g. "SDXL 1.0" (repeatable).')
@click.option("--sort", type=click.Choice(SORTS), default=None)
@click.option("--period", type=click.Choice(PERIODS), default=None)
@click.option("--nsfw", is_flag=True, help="Include all browsing levels.")
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the API items as a JSON array.")
@registry_options
def search_cmd(query: str, types: tuple[str, ...], base_models: tuple[str, ...], sort: str | None,
               period: str | None, nsfw: bool, limit: int, as_json: bool, registry: str | None,
               token: str | None) -> None:
    """Search models by text, following the registry's cursors up to --limit results."""
    client = make_client(registry, token)
    params = {"query": query, "types": list(types), "baseModels": list(base_models), "sort": sort,
              "period": period, "nsfw": "true" if nsfw else None}
    items = list(client.search(params, limit))
    if as_json:
        emit_json(items)
        return
    table = new_table(markup(f"{len(items)} result(s) for {query!r}"))
    for col, just in (("ID", "right"), ("Name", "left"), ("Type", "left"), ("Base model", "left"),
                      ("Creator", "left"), ("Downloads", "right"), ("Latest version", "right")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for m in items:
        latest = (m.get("modelVersions") or [{}])[0]
        downloads = (m.get("stats") or {}).get("downloadCount", 0)
        table.add_row(*row(m.get("id"), m.get("name"), m.get("type"), latest.get("baseModel", ""),
                           (m.get("creator") or {}).get("username", ""),
                           f"{downloads:,}" if isinstance(downloads, int) else downloads, latest.get("id", "")))
    out_console().print(table)


# -- info -----------------------------------------------------------------------------------

@click.command("info")
@click.argument("ref", required=False, metavar="MODEL_ID|URL")
@click.option("--version", "version_id", type=int, default=None, help="A model version id.")
@click.option("--json", "as_json", is_flag=True, help="Print the model (or version) JSON.")
@registry_options
def info_cmd(ref: str | None, version_id: int | None, as_json: bool, registry: str | None,
             token: str | None) -> None:
    """Show a model or version: versions, files with sizes and hashes, trained words."""
    client = make_client(registry, token)
    target = parse_target(ref, version_id)
    if target.model_id is None:
        version = resolve_version(client, target)
        if as_json:
            emit_json(version)
            return
        _print_version(out_console(), version)
        return
    check_target(client, target)
    model = client.model(target.model_id)
    if as_json:
        emit_json(model)
        return
    con = out_console()
    creator = (model.get("creator") or {}).get("username", "?")
    con.print(f"[bold]{markup(model.get('name'))}[/bold]  (model {markup(model.get('id'))}, "
              f"{markup(model.get('type'))}, by {markup(creator)})")
    if model.get("tags"):
        con.print(f"tags: {markup(', '.join(map(str, model['tags'])))}")
    versions = model.get("modelVersions") or []
    table = new_table("versions")
    for col in ("ID", "Name", "Base model", "Published", "Files"):
        table.add_column(col)
    for v in versions:
        table.add_row(*row(v.get("id"), v.get("name"), v.get("baseModel"),
                           str(v.get("publishedAt", ""))[:10], len(v.get("files") or [])))
    con.print(table)
    chosen = next((v for v in versions if v.get("id") == target.version_id), versions[0] if versions else None)
    if chosen:
        _print_version(con, chosen, title=False)


def _print_version(con: Console, v: dict[str, Any], title: bool = True) -> None:
    if title:
        model = v.get("model") or {}
        con.print(f"[bold]{markup(model.get('name', '?'))}[/bold] — version {markup(v.get('name'))} "
                  f"(id {markup(v.get('id'))}, model {markup(v.get('modelId'))}, {markup(v.get('baseModel'))})")
    table = new_table(markup(f"files of version {v.get('id')}"))
    for col, wrap in (("Name", True), ("Type", True), ("Format", False), ("fp", False), ("Size", False),
                      ("AutoV2", False), ("AutoV3", False), ("Scan", False)):
        table.add_column(col, overflow="fold", no_wrap=not wrap, min_width=12 if col == "Name" else None)
    files = v.get("files") or []
    for f in files:
        meta, hashes = f.get("metadata") or {}, f.get("hashes") or {}
        kb = f.get("sizeKB")
        kind = f"{f.get('type')}{' (primary)' if f.get('primary') else ''}"
        size = human_size(kb * 1024) if isinstance(kb, (int, float)) else "?"
        table.add_row(*row(f.get("name"), kind, meta.get("format", ""), meta.get("fp", ""), size,
                           hashes.get("AutoV2", "—"), hashes.get("AutoV3", "—"), f.get("pickleScanResult", "?")))
    con.print(table)
    for f in files:
        con.print(markup(f"SHA256 {(f.get('hashes') or {}).get('SHA256', '— (not listed)')}  {f.get('name')}"))
    words = v.get("trainedWords") or []
    con.print(markup(f"trained words: {', '.join(map(str, words)) if words else '—'}"))


# -- lookup ---------------------------------------------------------------------------------

@click.command("lookup")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per file, in an array.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@registry_options
def lookup_cmd(files: tuple[Path, ...], as_json: bool, quiet: bool, registry: str | None,
               token: str | None) -> None:
    """Hash local files and identify them through the registry (SHA256, then AutoV3)."""
    client = make_client(registry, token)
    with _progress(quiet) as bar:
        def on_hash(path: Path) -> Callable[[int], None]:
            bar.start(f"hashing {path.name}", path.stat().st_size if path.is_file() else None, 0)
            return bar.advance

        results = lookup_files(client, list(files), on_hash)
    failed = [r for r in results if r.error]
    for r in failed:
        click.echo(f"error: {safe(r.path)}: {safe(r.error)}", err=True)
    if as_json:
        emit_json([r.as_dict() for r in results])
    else:
        table = new_table("registry look-up")
        for col, wrap in (("File", True), ("Model", True), ("Version", True), ("Base model", True),
                          ("IDs", False), ("Matched by", False), ("AutoV3", False)):
            table.add_column(col, overflow="fold", no_wrap=not wrap, min_width=14 if col == "File" else None)
        for r in results:
            d = r.as_dict()
            h = d["hashes"] or {}
            ids = f"{d['model_id']}@{d['version_id']}" if r.found else "—"
            table.add_row(*row(r.path, d["model_name"] or ("not found" if not r.error else "error"),
                               d["version_name"] or "", d["base_model"] or "", ids,
                               d["matched_by"] or "", h.get("autov3") or "—"))
        out_console().print(table)
    if failed:
        sys.exit(1)


# -- fetch ----------------------------------------------------------------------------------

@click.command("fetch")
@click.argument("ref", required=False, metavar="MODEL_ID|URL")
@click.option("--version", "version_id", type=int, default=None, help="A model version id.")
@click.option("-o", "--output", "dest", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory to save into.")
@click.option("--file-type", default="Model", show_default=True, help="files[].type to pick.")
@click.option("--format", "fmt", default=None, metavar="SafeTensor|PickleTensor|GGUF|…")
@click.option("--fp", default=None, metavar="fp16|bf16|fp32|…")
@click.option("--size", type=click.Choice(["full", "pruned"]), default=None)
@click.option("--preview", is_flag=True, help="Also save <stem>.preview.<ext>.")
@click.option("--force", is_flag=True, help="Replace an existing file that differs.")
@click.option("--allow-pickle", is_flag=True, help="Allow pickle formats (.ckpt/.pt/PickleTensor).")
@click.option("--require-hash", is_flag=True, help="Refuse files the registry lists no hash for.")
@click.option("--retries", type=click.IntRange(0, 20), default=None, help="Retries per failure (default 5).")
@click.option("--stall-timeout", type=float, default=None, help="Seconds without data before retrying (60).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@registry_options
def fetch_cmd(ref: str | None, version_id: int | None, dest: Path, file_type: str, fmt: str | None,
              fp: str | None, size: str | None, preview: bool, force: bool, allow_pickle: bool,
              require_hash: bool, retries: int | None, stall_timeout: float | None, quiet: bool,
              as_json: bool, registry: str | None, token: str | None) -> None:
    """Download a model file, verified (size + SHA256) and resumable, with sidecars."""
    client = make_client(registry, token, retries, stall_timeout)
    version = resolve_version(client, parse_target(ref, version_id))
    opts = FetchOptions(choice=FileChoice(file_type, fmt, fp, size), allow_pickle=allow_pickle,
                        force=force, preview=preview, require_hash=require_hash, retries=retries)
    with _progress(quiet or as_json) as bar:
        result = fetch_version(client, version, dest, opts, bar)
    for w in result.warnings:
        warn(result.path, w)
    if as_json:
        emit_json(result.as_dict())
    elif not quiet:
        verb = "already present, hash verified" if result.status == "skipped" else "downloaded, SHA256 verified"
        click.echo(f"{safe(result.path)} ({human_size(result.size)}): {verb}", err=True)
        for side in result.sidecars:
            click.echo(f"  + {safe(side.name)}", err=True)


class _Bar:
    """Adapts a rich Progress to the downloader's start/advance protocol."""

    def __init__(self, progress: Progress | None) -> None:
        self.progress, self.task = progress, None

    def start(self, name: str, total: int | None, completed: int) -> None:
        if self.progress is None:
            return
        name = markup(name)
        if self.task is not None:
            self.progress.update(self.task, description=name, total=total, completed=completed)
        else:
            self.task = self.progress.add_task(name, total=total, completed=completed)

    def advance(self, n: int) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.advance(self.task, n)


@contextmanager
def _progress(quiet: bool) -> Iterator[_Bar]:
    if quiet or not sys.stderr.isatty():
        yield _Bar(None)
        return
    console = err_console()
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                        TransferSpeedColumn(), TimeRemainingColumn(), console=console,
                        transient=True)
    with progress:
        yield _Bar(progress)


# -- config ---------------------------------------------------------------------------------

@click.group("config")
def config_cmd() -> None:
    """Show or change the registry configuration (config.yaml)."""


@config_cmd.command("show")
@click.option("--json", "as_json", is_flag=True)
@registry_options
def config_show(as_json: bool, registry: str | None, token: str | None) -> None:
    """The config file with tokens masked, and the registry that would be used now."""
    data = cfg.load_config()
    masked = {**data, "registries": {n: {k: ("<set>" if k == "token" and v else v) for k, v in r.items()}
                                     for n, r in data.get("registries", {}).items()}}
    s = resolve(registry, token, data)
    active = {"url": s.url, "name": s.name, "url_source": s.url_source,
              "token": "<set>" if s.token else None, "token_source": s.token_source}
    if as_json:
        emit_json({"path": str(cfg.config_path()), "config": masked, "active": active})
        return
    click.echo(f"config file: {safe(cfg.config_path())}")
    click.echo(safe(f"registry:    {s.url} (from {s.url_source}{', name ' + s.name if s.name else ''})"))
    click.echo(f"token:       {'set (from ' + str(s.token_source) + ')' if s.token else 'not set'}")
    for name, reg in masked["registries"].items():
        mark = " (default)" if data.get("default") == name else ""
        click.echo(safe(f"  {name}{mark}: {reg.get('url')}  token {reg.get('token') or 'not set'}"))


@config_cmd.command("set")
@click.argument("key", metavar="KEY")
@click.argument("value", metavar="VALUE")
def config_set(key: str, value: str) -> None:
    """Set KEY: default, registries.<name>.url or registries.<name>.token ("-" reads stdin)."""
    if value == "-":
        value = sys.stdin.readline().strip()
    if not value:
        raise UsageError(key, "empty value")
    path = cfg.save_config(cfg.set_value(cfg.load_config(), key, value))
    shown = "<set>" if key.endswith(".token") else value
    click.echo(safe(f"{path}: {key} = {shown}"))


@config_cmd.command("path")
def config_path_cmd() -> None:
    """Print where the config file lives."""
    click.echo(str(cfg.config_path()))


__all__ = ["config_cmd", "fetch_cmd", "info_cmd", "lookup_cmd", "search_cmd"]
