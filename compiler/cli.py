"""The ``fxpress`` command."""

from __future__ import annotations

import json
import logging
import sys
import traceback
import warnings

import click

from compiler.errors import FxpressError
from compiler.targets import TARGETS

INTERNAL_ERROR = 70


class _Group(click.Group):
    """Maps fxpress errors to their exit codes with a one-line message."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except FxpressError as error:
            _fail(ctx, str(error), error.exit_code, error)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except KeyboardInterrupt:
            _fail(ctx, "interrupted", 130, None)
        except Exception as error:  # noqa: BLE001 - anything else is our bug: say so, exit 70
            _fail(ctx, f"internal error: {type(error).__name__}: {error}", INTERNAL_ERROR, error)


def _fail(ctx: click.Context, message: str, code: int, error: BaseException | None) -> None:
    if error is not None and (ctx.obj or {}).get("debug"):
        traceback.print_exception(error)
    click.echo(f"fxpress: error: {message}", err=True)
    ctx.exit(code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.option("-v", "--verbose", count=True, help="Log one line per pass (-v) or the graphs (-vv).")
@click.pass_context
def main(ctx: click.Context, debug: bool, verbose: int) -> None:
    """fxpress: compile PyTorch models into fast, verified ONNX, and see what every pass did."""
    ctx.obj = {"debug": debug}
    if verbose == 0:  # torch and onnxscript deprecation chatter is not the user's concern
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx.*")
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


_TARGET = click.option("--target", "-t", default="cpu-fp32", show_default=True,
                       help=f"Target: {', '.join(TARGETS)}.")


@main.command("compile")
@click.argument("model")
@_TARGET
@click.option("--output", "-o", required=True, help="Artifact directory to write.")
@click.option("--force", is_flag=True, help="Replace an existing artifact directory.")
@click.option("--dump-dir", default=None, help="Write the IR after every pass into this directory.")
@click.option("--json", "as_json", is_flag=True, help="Print the ledger as JSON.")
def compile_command(model: str, target: str, output: str, force: bool, dump_dir: str | None, as_json: bool) -> None:
    r"""Compile MODEL (a zoo name or path/to/file.py:factory) and write an artifact.

    \b
    Examples:
      fxpress compile efficientnet-lite0 -o out/
      fxpress compile my_model.py:build --target cpu-fp32 -o out/ --force
    """
    from compiler import api, model_source

    source = model_source.resolve(model)
    compiled = api.compile(
        source.model, target, source.example_inputs, dump_dir=dump_dir,
        dynamic_dims=source.dynamic_dims, model_name=source.name,
    )
    directory = compiled.save(output, force=force)
    if as_json:
        click.echo(json.dumps({"artifact": str(directory), "report": compiled.report.to_dict()}, indent=2))
    else:
        click.echo(str(compiled.report))
        click.echo(f"wrote {directory}")


@main.command("inspect")
@click.argument("model")
@_TARGET
@click.option("--dump-dir", default=None, help="Write the IR after every pass into this directory.")
@click.option("--json", "as_json", is_flag=True, help="Print the ledger as JSON.")
def inspect_command(model: str, target: str, dump_dir: str | None, as_json: bool) -> None:
    r"""Run the target's passes on MODEL without lowering and print the ledger.

    \b
    Examples:
      fxpress inspect resnet18
      fxpress inspect minilm-l6 --json --dump-dir ir/
    """
    from compiler import api, model_source

    source = model_source.resolve(model)
    ledger = api.inspect(
        source.model, target, source.example_inputs, dump_dir=dump_dir,
        dynamic_dims=source.dynamic_dims, model_name=source.name,
    )
    click.echo(ledger.to_json() if as_json else str(ledger))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
