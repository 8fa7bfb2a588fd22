"""The ``loratool`` command: a click group whose subcommands are imported only when used."""

from __future__ import annotations

import importlib
import importlib.util
import sys

import click

from loratool import __version__
from loratool.errors import LoraToolError

# name -> "module:attribute". One line per subcommand; modules load lazily so that
# `loratool inspect` never pays for (or imports) torch, requests or the registry client.
COMMANDS: dict[str, str] = {
    "inspect": "loratool.cli.inspect_cmd:inspect_cmd",
    "convert": "loratool.cli.convert_cmd:convert_cmd",
    "validate": "loratool.cli.validate_cmd:validate_cmd",
    "metadata": "loratool.cli.metadata_cmd:metadata_group",
    "scan": "loratool.cli.scan_cmd:scan_cmd",
    "check": "loratool.cli.check_cmd:check_cmd",
    "merge": "loratool.cli.merge_cmd:merge_cmd",
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


def report_error(err: LoraToolError) -> None:
    """Print one ``error: <path>: <message>`` line on stderr."""
    click.echo(f"error: {err}", err=True)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: map loratool's errors to one line and an exit code."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
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
