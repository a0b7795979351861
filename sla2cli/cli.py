"""The `sla2` command line: Typer app, global options, and one-line error rendering."""

from __future__ import annotations

import sys
import traceback

import typer
from rich.console import Console
from rich.markup import escape

from .commands import _common, convert, demo, eval_fid, finetune, profile, quality, stats
from .commands._errors import cli_message
from .errors import ParameterError, SLA2Error

app = typer.Typer(
    name="sla2", no_args_is_help=True, pretty_exceptions_enable=False,
    help="SLA2 sparse-linear attention for JiT pixel-diffusion transformers.",
    context_settings={"help_option_names": ["-h", "--help"]},
)
_state = {"debug": False, "command": None}
# Typer re-exports no UsageError; BadParameter's parent is it, in both vendored and plain click.
_ParseError = typer.BadParameter.__mro__[1]


def _show_version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"sla2cli {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(ctx: typer.Context,
          debug: bool = typer.Option(False, "--debug", help="Show the full traceback of an error."),
          quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress and no info lines: only warnings, "
                                     "errors and the result."),
          version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True,
                                       help="Print the version and exit.")):
    _state["debug"] = debug
    _common.session["quiet"] = quiet
    _state["command"] = ctx.invoked_subcommand  # library errors name parameters; this command's flags replace them


for _name, _module in (("convert", convert), ("finetune", finetune), ("profile", profile),
                       ("eval-fid", eval_fid), ("stats", stats), ("quality", quality), ("demo", demo)):
    app.command(_name)(_module.command)


def _fail(message: str, code: int) -> int:
    Console(stderr=True).print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return code


def run(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code: 0 ok, 1 failure, 2 bad usage, 130 interrupted."""
    args = list(argv if argv is not None else sys.argv[1:])
    _state["debug"] = "--debug" in args
    _state["command"] = None
    _common.session.update(argv=args, quiet=False)
    try:
        # prog_name: usage lines and the completion variable (_SLA2_COMPLETE) say sla2, also for python -m sla2cli
        code = app(args=args, prog_name="sla2", standalone_mode=False)
        if code == 130:  # Typer turns Ctrl-C into this return value instead of raising
            return _fail("interrupted", 130)
        return code if isinstance(code, int) else 0
    except typer.Exit as exc:
        return exc.exit_code
    except _ParseError as exc:
        if not exc.format_message():  # bare `sla2`: the help was shown
            return 2
        hint = f" (see 'sla2 {exc.ctx.info_name} --help')" if exc.ctx and exc.ctx.parent else " (see 'sla2 --help')"
        return _fail(exc.format_message().replace("\n", " ") + hint, 2)
    except (typer.Abort, KeyboardInterrupt):
        return _fail("interrupted", 130)
    except _common.Stop as stop:
        if stop.message:
            Console(stderr=True).print(stop.message, highlight=False, soft_wrap=True)
        return stop.code
    except SLA2Error as exc:
        if _state["debug"]:
            traceback.print_exc()
        message = cli_message(exc, _state["command"]) if isinstance(exc, ParameterError) else str(exc)
        return _fail(message, exc.exit_code)
    except Exception as exc:  # a bug, not the user's doing: say so, keep the traceback behind --debug
        if _state["debug"]:
            traceback.print_exc()
            return 1
        return _fail(f"internal error: {type(exc).__name__}: {exc} "
                     "(rerun with 'sla2 --debug ...' for the traceback)", 1)
    finally:
        _common.session.update(argv=None, quiet=False)  # a library caller in the same process is not the CLI


def main() -> None:
    sys.exit(run())
