"""The ``loratool`` command: a click group whose subcommands are imported only when used.

This is also the error boundary: a :class:`LoraToolError` becomes one ``error: PATH: …``
line; any other exception is a bug in loratool and becomes one line that says so, names
the file being handled (see :func:`processing`) and exits with :data:`EXIT_BUG`.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import signal
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import click

from loratool import __version__
from loratool.errors import LoraToolError

# name -> "module:attribute". One line per subcommand; modules load lazily so that
# `loratool inspect` never pays for (or imports) torch, requests or the registry client.
COMMANDS: dict[str, str] = {
    "inspect": "loratool.cli.inspect_cmd:inspect_cmd",
    "convert": "loratool.cli.convert_cmd:convert_cmd",
    "check": "loratool.cli.check_cmd:check_cmd",
    "merge": "loratool.cli.merge_cmd:merge_cmd",
    "validate": "loratool.cli.validate_cmd:validate_cmd",
    "metadata": "loratool.cli.metadata_cmd:metadata_group",
    "scan": "loratool.cli.scan_cmd:scan_cmd",
    "resize": "loratool.cli.resize_cmd:resize_cmd",
    "merge-loras": "loratool.cli.merge_loras_cmd:merge_loras_cmd",
    "extract": "loratool.cli.extract_cmd:extract_cmd",
    "search": "loratool.cli.registry_cmds:search_cmd",
    "info": "loratool.cli.registry_cmds:info_cmd",
    "lookup": "loratool.cli.registry_cmds:lookup_cmd",
    "fetch": "loratool.cli.registry_cmds:fetch_cmd",
    "config": "loratool.cli.registry_cmds:config_cmd",
}


class LazyGroup(click.Group):
    """A group that imports a subcommand's module only when that subcommand runs."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(name for name in COMMANDS if self._available(name))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                return None
            raise
        return getattr(module, attr)

    @staticmethod
    def _available(name: str) -> bool:
        module_name = COMMANDS[name].split(":")[0]
        return importlib.util.find_spec(module_name) is not None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="loratool")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Inspect, convert and fetch LoRA adapters for Stable Diffusion."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


EXIT_BUG = 70  # EX_SOFTWARE (sysexits.h): an internal error, never the input's fault
BUG_MARK = "this is a bug in loratool"
PATH_ATTR = "loratool_path"  # set on an unexpected exception by processing()


def report_error(err: LoraToolError) -> None:
    """Print one ``error: <path>: <message>`` line on stderr."""
    click.echo(f"error: {one_line(str(err))}", err=True)


@contextlib.contextmanager
def processing(path: str | os.PathLike[str]) -> Iterator[None]:
    """Mark ``path`` as the file being handled: an unexpected exception leaving the block
    is reported against it (the path travels on the exception)."""
    try:
        yield
    except LoraToolError:
        raise
    except Exception as exc:
        if getattr(exc, PATH_ATTR, None) is None:
            with contextlib.suppress(AttributeError, TypeError):
                setattr(exc, PATH_ATTR, os.fspath(path))
        raise


def bug_message(exc: BaseException) -> str:
    """One line for an unexpected exception: what, where, and that it is loratool's bug."""
    path = getattr(exc, PATH_ATTR, None)
    detail = one_line(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__, 200)
    where = f"{path}: " if path else ""
    return f"error: {where}internal error ({detail}); {BUG_MARK}, rerun with --debug for the traceback"


def one_line(text: str, limit: int | None = None) -> str:
    """``text`` on one line (line breaks become spaces), cut to ``limit`` characters, with
    what a terminal would act on (ESC sequences, bidi overrides…) shown as escapes: paths,
    keys and values in messages come from files."""
    from loratool.terminal import safe

    line = " ".join(text.splitlines())
    line = line if limit is None or len(line) <= limit else line[: limit - 1] + "…"
    return safe(line)


def _show_warning(message: Warning | str, category: type[Warning], *args: object, **kwargs: object) -> None:
    click.echo(f"warning: {one_line(str(message), 300)}", err=True)


def debug_enabled() -> bool:
    ctx = click.get_current_context(silent=True)
    return bool(ctx and (ctx.find_root().obj or {}).get("debug"))


class FileErrors:
    """Per-file error isolation for commands that handle many paths.

    ``with errors.guard(path): ...`` prints the line for whatever goes wrong with that
    path (a traceback too under ``--debug`` for a bug) and lets the run go on;
    :attr:`exit_code` is the worst outcome so far (0, the errors' own codes, EXIT_BUG)."""

    def __init__(self) -> None:
        self.exit_code = 0

    @contextlib.contextmanager
    def guard(self, path: str | os.PathLike[str]) -> Iterator[None]:
        try:
            with processing(path):
                yield
        except Exception as exc:
            self.record(exc, path)

    def record(self, exc: Exception, path: str | os.PathLike[str]) -> None:
        """Report an error that happened while handling ``path`` (one line; a bug says so)."""
        if isinstance(exc, LoraToolError):
            report_error(exc)
            self.fail(exc.exit_code)
            return
        if getattr(exc, PATH_ATTR, None) is None:
            with contextlib.suppress(AttributeError, TypeError):
                setattr(exc, PATH_ATTR, os.fspath(path))
        if debug_enabled():
            traceback.print_exception(exc)
        click.echo(bug_message(exc), err=True)
        self.fail(EXIT_BUG)

    def fail(self, code: int) -> None:
        """Count an outcome that was reported another way (keeps the worst exit code)."""
        self.exit_code = max(self.exit_code, code)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: map loratool's errors to one line and an exit code."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    # torch warns on first use when numpy is absent; numpy is not needed (nor a dependency).
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    if not debug:  # a library's warning is one line too, without its source line
        warnings.showwarning = _show_warning
    # Names that are not valid Unicode (undecodable file names, pickle keys) print as
    # escapes instead of failing the whole output.
    with contextlib.suppress(AttributeError, ValueError):
        sys.stdout.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]
    try:
        cli.main(args=argv, prog_name="loratool", standalone_mode=False)
    except LoraToolError as err:
        if debug:
            raise
        report_error(err)
        sys.exit(err.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except click.exceptions.Exit as err:
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # anything not raised on purpose is a bug: one line, no traceback
        if debug:
            raise
        click.echo(bug_message(exc), err=True)
        sys.exit(EXIT_BUG)


@contextlib.contextmanager
def terminate_cleanly() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so a temp output beside its target is removed (for
    the long-running commands: merge, extract)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def show_written(result: Any, as_json: bool, render: Callable[[Any], None]) -> None:
    """A written adapter's result (``to_json()``, ``refused``) as strict JSON or through
    ``render``; then each module or key it left out, on stderr, shown safely."""
    from loratool.terminal import safe

    if as_json:
        json.dump(result.to_json(), sys.stdout, indent=2, allow_nan=False)
        sys.stdout.write("\n")
    else:
        render(result)
    if result.refused:
        click.echo(f"left out {len(result.refused)} module(s)/key(s):", err=True)
        for name, why in result.refused.items():
            click.echo(f"  {safe(name)}: {safe(why)}", err=True)


@contextlib.contextmanager
def progress_bar(label: str, *columns: Any) -> Iterator[Callable[[int, int], None] | None]:
    """A transient rich progress bar on stderr when it is a terminal, yielding
    ``advance(done, total)``; None when piped (nothing extra is printed)."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.progress import BarColumn, Progress

    with Progress(label, BarColumn(), *columns, transient=True) as bar:
        task = bar.add_task(label, total=None)

        def advance(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield advance
