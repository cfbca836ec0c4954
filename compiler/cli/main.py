"""The ``fxpress`` command: compile, inspect, bench, verify, lint, targets, zoo.

Exit codes: 0 success; 2 usage error (unknown target, bad option, missing file); 3 capture
failure; 4 unsupported operator; 5 calibration data error; 6 accuracy beyond tolerance (lint: findings); 7
artifact I/O error; 8 a fallback in --strict mode; 70 internal error; 130 interrupted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import traceback
import warnings

import click

from compiler.cli.lint import lint_command
from compiler.errors import AccuracyError, FxpressError
from compiler.targets import CALIBRATORS, TARGETS, with_calibrator, with_float_fallback

INTERNAL_ERROR = 70
INTERRUPTED = 130


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
            _fail(ctx, "interrupted; nothing was written", INTERRUPTED, None)
        except Exception as error:  # noqa: BLE001 - anything else is our bug: say so, exit 70
            _fail(ctx, f"internal error: {type(error).__name__}: {error} (rerun with --debug)", INTERNAL_ERROR, error)


def _fail(ctx: click.Context, message: str, code: int, error: BaseException | None) -> None:
    if error is not None and (ctx.obj or {}).get("debug"):
        traceback.print_exception(error)
    click.echo(f"fxpress: error: {' '.join(message.split())}", err=True)
    ctx.exit(code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks of errors.")
@click.option("-v", "--verbose", count=True, help="Log one line per pass (-v) or the graphs (-vv).")
@click.pass_context
def main(ctx: click.Context, debug: bool, verbose: int) -> None:
    """fxpress: compile PyTorch models into fast, verified ONNX, and see what every pass did.

    Exit codes: 2 usage, 3 capture, 4 unsupported operator, 5 calibration data, 6 accuracy,
    7 artifact I/O, 8 fallback under --strict, 70 internal error.
    """
    ctx.obj = {"debug": debug}
    if verbose == 0:  # torch and onnxscript deprecation chatter is not the user's concern
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx.*")
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


_TARGET = click.option("--target", "-t", default="cpu-fp32", show_default=True, help=f"Target: {', '.join(TARGETS)}.")
_JSON = click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON on stdout.")


@contextlib.contextmanager
def _progress(total: int, description: str):
    """A tqdm bar on stderr when it is a terminal; nothing otherwise."""
    from tqdm import tqdm

    with tqdm(total=total, desc=description, disable=None, file=sys.stderr, leave=False) as bar:
        yield lambda *_: bar.update(1)


def _target_steps(target: str) -> int:
    from compiler.targets import get_target

    return len(get_target(target).pipeline) + 2  # capture, passes, lowering


@main.command("compile")
@click.argument("model")
@_TARGET
@click.option("--output", "-o", required=True, help="Artifact directory to write.")
@click.option("--force", is_flag=True, help="Replace an existing artifact directory.")
@click.option("--strict", is_flag=True, help="Fail (exit 8) if the ledger records any fallback.")
@click.option("--dump-dir", default=None, help="Write the IR after every pass into this directory.")
@click.option("--calibration-samples", default=256, show_default=True, type=click.IntRange(1),
              help="Calibration samples from a zoo model's bundled data, for targets that calibrate.")
@click.option("--float-module", "float_modules", multiple=True,
              help="Keep this module path (or fnmatch pattern, e.g. 'encoder.layer.5.*') in float; repeatable.")
@click.option("--float-prefix", type=click.IntRange(0), default=0,
              help="Keep the first N convs/linears in graph order in float (next to a float input they cost no "
                   "layout change but one quantiser after them).")
@click.option("--float-macs", type=click.FloatRange(0, 1), default=None,
              help="Keep the layers that harm the output most in float (sensitivity analysis), up to this share "
                   "of the MACs (e.g. 0.04); by default every layer runs in integer kernels.")
@click.option("--calibrator", type=click.Choice(list(CALIBRATORS)), default=None,
              help="Activation calibrator of a calibrating target (trt-int8's default: entropy, as TensorRT's "
                   "EntropyCalibration2; percentile keeps 99.99%).")
@click.option("--prune-macs", type=click.FloatRange(0, 1, max_open=True), default=None,
              help="Prune channels until this fraction of the MACs is gone (e.g. 0.3), before any quantisation.")
@click.option("--prune-latency", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help="Prune channels until the model runs in this share of its measured latency in the target's "
                   "runtime (e.g. 0.7), timed at the example's batch; instead of --prune-macs.")
@click.option("--low-rank-macs", type=click.FloatRange(0, 1, max_open=True), default=None,
              help="Factorise convs and linears into low-rank chains until this fraction of their MACs is gone "
                   "(e.g. 0.3), after any pruning and before any quantisation.")
@click.option("--recover-seconds", type=click.FloatRange(0), default=180.0, show_default=True,
              help="After pruning or factorisation, distil towards the original on the zoo's bundled samples "
                   "for this long.")
@click.option("--recover-augment", type=click.Choice(["auto", "mirror", "none"]), default="auto", show_default=True,
              help="Recovery's data augmentation: auto mirrors image inputs left to right (as does mirror, which "
                   "refuses data without images); none trains on the samples as they are.")
@click.option("--input-format", "input_dtype", type=click.Choice(["float", "uint8"]), default="float",
              show_default=True,
              help="uint8: the artifact takes 8-bit pixels (a zoo image model, its mean and std from the zoo unless "
                   "given), with the normalisation folded exactly into the first convolution.")
@click.option("--input-mean", default=None, help="Per-channel mean on the [0, 1] pixel scale, e.g. 0.485,0.456,0.406.")
@click.option("--input-std", default=None, help="Per-channel std on the [0, 1] pixel scale, e.g. 0.229,0.224,0.225.")
@click.option("--input-layout", type=click.Choice(["NCHW", "NHWC"]), default="NCHW", show_default=True,
              help="Layout of the uint8 pixels the artifact takes (NHWC as image decoders write them).")
@click.option("--threads", default="auto", show_default=True, callback=lambda _c, _p, value: _threads(value),
              help="PyTorch threads while compiling: auto (the cores found idle at the start, at least one: on a "
                   "loaded machine fewer threads wait less for each other) or a number.")
@_JSON
def compile_command(model, target, output, force, strict, dump_dir, calibration_samples, float_modules, float_prefix,
                    float_macs, calibrator,
                    prune_macs, prune_latency, low_rank_macs, recover_seconds, recover_augment, input_dtype,
                    input_mean, input_std, input_layout, threads, as_json) -> None:
    """Compile MODEL (a zoo name or path/to/file.py:factory) into an artifact directory.

    \b
    Examples:
      fxpress compile efficientnet-lite0 -o out/
      fxpress compile my_model.py:build --target cpu-fp32 -o out/ --force --strict
      fxpress compile efficientnet-lite0 --target cpu-int8 -o out-int8/
      fxpress compile efficientnet-lite0 --target cpu-int8 --float-macs 0.04 -o out-int8-fallback/
      fxpress compile digits-cnn -o out-pruned/ --prune-macs 0.5 --recover-seconds 30
      fxpress compile efficientnet-lite0 -o out-fast/ --prune-latency 0.7
      fxpress compile minilm-l6 -o out-low-rank/ --low-rank-macs 0.3
      fxpress compile resnet18 --target trt-int8 --calibrator percentile -o out-trt/
      fxpress compile efficientnet-lite0 --target cpu-int8 --input-format uint8 --input-layout NHWC -o out-u8/
    """  # noqa: D301 - click needs a real \b (backspace) to keep the examples unwrapped
    from compiler import api
    from compiler.artifact import check_destination
    from compiler.cli import model_source
    from compiler.errors import UsageError

    if prune_macs is not None and prune_latency is not None:
        raise UsageError("give one pruning budget: --prune-macs or --prune-latency, not both")
    check_destination(_absolute(output), force)  # refuse before minutes of work, not after
    source = model_source.resolve(model)
    chosen = _with_float_modules(target, float_modules, float_prefix)
    if float_macs is not None:
        chosen = with_float_fallback(chosen, float_macs)
    if calibrator is not None:
        chosen = with_calibrator(chosen, calibrator)
    prune = {"macs": prune_macs} if prune_macs is not None else \
        {"latency": prune_latency} if prune_latency is not None else None
    compresses = prune is not None or low_rank_macs is not None
    calibration = _calibration(source, chosen, calibration_samples, compresses and recover_seconds > 0,
                               low_rank_macs is not None)
    low_rank = None if low_rank_macs is None else {"macs": low_rank_macs}
    input_format = None
    if input_dtype == "uint8":
        input_format = _pixel_format(source, input_mean, input_std, input_layout)
        source, calibration = _as_pixels(source, calibration, input_format, calibration_samples)
    with _progress(_target_steps(target), f"compiling {source.name}") as step:
        compiled = api.compile(source.model, chosen, source.example_inputs, calibration_data=calibration,
                               input_format=input_format,
                               dump_dir=dump_dir, dynamic_dims=source.dynamic_dims, model_name=source.name,
                               strict=strict, progress=step, prune=prune, low_rank=low_rank,
                               recover_seconds=recover_seconds, threads=threads,
                               recover={"augment": recover_augment} if compresses else None)
    directory = compiled.save(output, force=force)
    if as_json:
        click.echo(json.dumps({"artifact": str(directory), "report": compiled.report.to_dict()}, indent=2))
    else:
        click.echo(str(compiled.report))
        click.echo(f"wrote {directory}")


def _with_float_modules(target: str, float_modules: tuple[str, ...], float_prefix: int = 0):
    """The target, with module paths and the first ``float_prefix`` weighted ops kept in float."""
    from compiler.errors import TargetError, UsageError
    from compiler.targets import get_target, with_float_layers

    chosen = get_target(target)  # an unknown target is its own error, not the flags'
    try:
        return with_float_layers(chosen, float_modules, float_prefix)
    except TargetError as error:
        flag = "--float-module" if float_modules else "--float-prefix"
        raise UsageError(f"{flag} {error}") from None


def _calibration(source, target, samples: int, recovers: bool = False, factorises: bool = False):
    """The zoo model's bundled calibration samples where the target, recovery or low-rank factorisation reads data."""
    from compiler.errors import UsageError

    if not (recovers or factorises) and "calibrate" not in {spec.name for spec in target.pipeline}:
        return None
    if source.zoo_entry is None:
        needs = ("recovery after pruning or factorisation needs data" if recovers else
                 "low-rank factorisation measures layers on data" if factorises else
                 f"target {target.name!r} calibrates")
        raise UsageError(
            f"{needs} and {source.name!r} is not a zoo model with bundled data; use the Python API: "
            "compile(model, target, example_inputs, calibration_data=batches)"
            + (", or --recover-seconds 0" if recovers and not factorises else "")
        )
    batch = source.zoo_entry.calibration_data(samples)
    return [tuple(tensor[start:start + 32] for tensor in batch) for start in range(0, samples, 32)]


def _pixel_format(source, mean: str | None, std: str | None, layout: str) -> dict:
    """``--input-format uint8``'s format: the zoo entry's mean and std unless given, the layout asked for."""
    from compiler.errors import UsageError

    zoo_format = getattr(source.zoo_entry, "input_format", None)
    if source.zoo_entry is None or zoo_format is None:
        raise UsageError(
            f"--input-format uint8 needs a zoo image model with bundled pixel data, and {source.name!r} is not one; "
            "use the Python API: compile(model, target, (uint8_pixels,), input_format={'mean': [...], 'std': [...]})")
    return {**zoo_format, "layout": layout,
            **({"mean": _floats(mean, "--input-mean")} if mean else {}),
            **({"std": _floats(std, "--input-std")} if std else {})}


def _floats(text: str, option: str) -> list[float]:
    try:
        return [float(value) for value in text.split(",")]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}", param_hint=option) from None


def _as_pixels(source, calibration, input_format: dict, samples: int):
    """The zoo entry's example and calibration inputs as uint8 pixels in the requested layout."""
    import dataclasses

    def laid_out(pixels):
        return pixels.permute(0, 2, 3, 1).contiguous() if input_format["layout"] == "NHWC" else pixels

    example = (laid_out(source.zoo_entry.calibration_data(1, pixels=True)[0]),)
    if calibration is not None:
        (pixels,) = source.zoo_entry.calibration_data(samples, pixels=True)
        calibration = [(laid_out(pixels[start:start + 32]),) for start in range(0, samples, 32)]
    return dataclasses.replace(source, example_inputs=example), calibration


def _threads(value: str) -> int | str:
    """``--threads``: ``auto`` or a positive integer."""
    if value == "auto":
        return value
    if not value.isdigit() or int(value) < 1:
        raise click.BadParameter(f"expected 'auto' or a positive integer, got {value!r}", param_hint="--threads")
    return int(value)


def _absolute(path: str):
    import os
    from pathlib import Path

    return Path(os.path.abspath(path))


@main.command("inspect")
@click.argument("model")
@_TARGET
@click.option("--dump-dir", default=None, help="Write the IR after every pass into this directory.")
@_JSON
def inspect_command(model, target, dump_dir, as_json) -> None:
    """Run the target's passes on MODEL without lowering and print the ledger.

    \b
    Examples:
      fxpress inspect resnet18
      fxpress inspect minilm-l6 --json --dump-dir ir/
    """  # noqa: D301 - click needs a real \b (backspace) to keep the examples unwrapped
    from compiler import api
    from compiler.cli import model_source

    source = model_source.resolve(model)
    with _progress(_target_steps(target) - 1, f"inspecting {source.name}") as step:
        ledger = api.inspect(source.model, target, source.example_inputs, dump_dir=dump_dir,
                             dynamic_dims=source.dynamic_dims, model_name=source.name, progress=step)
    click.echo(ledger.to_json() if as_json else str(ledger))


@main.command("bench")
@click.argument("subject")
@click.option("--model", "-m", default=None, help="The original model of an artifact (for --compare).")
@_TARGET
@click.option("--batch", "-b", "batches", multiple=True, type=click.IntRange(min=1), default=(1, 16),
              show_default=True, help="Batch size; repeat for several.")
@click.option("--runs", type=click.IntRange(min=3), default=100, show_default=True, help="Timed runs per runner.")
@click.option("--warmup", type=click.IntRange(min=0), default=10, show_default=True, help="Untimed runs first.")
@click.option("--threads", type=click.IntRange(min=0), default=0, help="Threads for every runner (0: defaults).")
@click.option("--compare", is_flag=True, help="Also time eager PyTorch and a plain torch.onnx.export.")
@click.option("--plot", default=None,
              help="Draw the latency distributions into this file: a PNG, or a self-contained HTML page (.html).")
@_JSON
def bench_command(subject, model, target, batches, runs, warmup, threads, compare, plot, as_json) -> None:
    """Measure latency percentiles, throughput and memory of SUBJECT (an artifact directory or a model).

    \b
    Examples:
      fxpress bench efficientnet-lite0 --compare
      fxpress bench out/ --model efficientnet-lite0 --batch 1 --batch 16 --compare --plot latency.png
      fxpress bench minilm-l6 --runs 50 --json
    """  # noqa: D301 - click needs a real \b (backspace) to keep the examples unwrapped
    from compiler.cli.benchmark import plot_benchmark, render_benchmark, run_benchmark
    from compiler.cli.workload import load_workload

    with _progress(_target_steps(target), "compiling") as step:
        workload = load_workload(subject, model=model, target=target, progress=step)
    with _progress(runs * len(batches), f"timing {workload.name}") as step:
        report = run_benchmark(workload, batches, runs=runs, warmup=warmup, compare=compare, threads=threads,
                               progress=step)
    if plot:
        plot_benchmark(report, plot)
    if as_json:
        click.echo(json.dumps({key: value for key, value in report.items() if key != "samples_ms"}, indent=2))
    else:
        click.echo(render_benchmark(report))


@main.command("verify")
@click.argument("artifact")
@click.option("--model", "-m", default=None, help="The original model (default: the zoo model it was compiled from).")
@click.option("--samples", "-n", type=click.IntRange(min=1), default=64, show_default=True, help="Evaluation samples.")
@_JSON
def verify_command(artifact, model, samples, as_json) -> None:
    """Compare ARTIFACT with its eager original on evaluation data; exit 6 beyond tolerance.

    \b
    Examples:
      fxpress verify out/ --model efficientnet-lite0
      fxpress verify out/ --samples 256 --json
    """  # noqa: D301 - click needs a real \b (backspace) to keep the examples unwrapped
    from compiler.cli.verification import render_verification, verify
    from compiler.cli.workload import is_artifact, load_workload

    if not is_artifact(artifact):
        raise click.UsageError(f"{artifact} is not an artifact directory (no manifest.json)")
    report = verify(load_workload(artifact, model=model), samples=samples)
    click.echo(json.dumps(report, indent=2) if as_json else render_verification(report))
    if not report["within_tolerance"]:
        raise AccuracyError(f"{artifact} differs from the eager model beyond the target's tolerance "
                            f"(max abs diff {report['max_abs']:.3g})")


@main.command("run")
@click.argument("recipe")
@click.option("--output", "-o", default=None, help="Artifact directory (default: the recipe's output.directory).")
@click.option("--gate", "gates", multiple=True,
              help="A gate besides the recipe's, e.g. 'top1_agreement >= 0.97' or 'latency_ratio <= 1.0 vs fp32'; "
                   "repeatable.")
@click.option("--keep-failed", is_flag=True, help="When a gate fails, still write the artifact, as DIR.failed.")
@click.option("--force", is_flag=True, help="Replace an existing artifact directory.")
@_JSON
def run_command(recipe, output, gates, keep_failed, force, as_json) -> None:
    """Compile the model a RECIPE (TOML) names, check its gates, benchmark it, and write the artifact.

    A failed gate exits 6 and writes nothing (with --keep-failed: DIR.failed).

    \b
    Examples:
      fxpress run examples/efficientnet-lite0-int8.toml -o out/
      fxpress run recipe.toml -o out/ --gate 'top1_agreement >= 0.97' --json
    """  # noqa: D301 - click needs a real \b (backspace) to keep the examples unwrapped
    from compiler.recipe import load_recipe
    from compiler.recipe_run import run_recipe

    chosen = load_recipe(recipe).with_gates(list(gates))
    if chosen.get("search.space"):
        from compiler.errors import UsageError

        raise UsageError(f"{recipe} has a [search.space] table: run it with fxpress search, or remove the table")
    directory = _recipe_output(chosen, output)
    with _progress(_recipe_steps(chosen), f"running {recipe}") as step:
        result = run_recipe(chosen, directory, force=force, keep_failed=keep_failed, progress=step)
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else _render_run(result))
    if not result.passed:
        failed = ", ".join(str(item.gate) for item in result.gates if not item.passed)
        kept = f"kept as {result.directory}" if result.directory else "nothing written"
        raise AccuracyError(f"gate(s) failed: {failed}; {kept}")


@main.command("bisect")
@click.argument("recipe")
@click.option("--gate", "gates", multiple=True, help="A gate besides the recipe's, e.g. 'top1_agreement >= 0.97'.")
@click.option("--no-verify", is_flag=True, help="Do not compile the patched recipe to check it on ONNX Runtime.")
@click.option("--write-patched", default=None,
              help="Write the recipe with the patch applied to this TOML file (relative paths as in RECIPE's folder).")
@_JSON
def bisect_command(recipe, gates, no_verify, write_patched, as_json) -> None:
    """Find the pass, and the layers in it, that make RECIPE fail its quality gates; print a patch.

    The IR after every pass is evaluated on the recipe's evaluation data; inside the first failing
    quantising, pruning or factorising pass, the smallest set of layers to keep as they were is
    searched (one at a time, then greedy), and the recipe patch that keeps them is printed and,
    unless --no-verify, compiled and measured on ONNX Runtime.

    \b
    Examples:
      fxpress bisect examples/efficientnet-lite0-int8.toml --gate 'top1_agreement >= 0.97'
      fxpress bisect recipe.toml --json --write-patched recipe-patched.toml
    """  # noqa: D301 - click needs a real \b (backspace) to keep the examples unwrapped
    from compiler.bisect import bisect
    from compiler.recipe import load_recipe, to_toml
    from compiler.recipe_run import prepare

    chosen = load_recipe(recipe).with_gates(list(gates))
    prepared = prepare(chosen)
    keys = ("calibration_data", "prune", "low_rank", "train_data", "recover_seconds", "recover", "dynamic_dims",
            "input_format", "threads")
    say = (lambda line: None) if as_json else (lambda line: click.echo(f"  {line}", err=True))
    report = bisect(prepared.source.model, prepared.target, prepared.source.example_inputs,
                    eval_inputs=prepared.eval_inputs, gates=list(chosen.gates), labels=prepared.labels,
                    verify_patch=not no_verify, progress=say, **{key: prepared.compile_options[key] for key in keys})
    if write_patched and report.patch:
        from pathlib import Path

        Path(write_patched).write_text(to_toml(chosen.patched(report.patch).data))
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.render())


@main.command("search")
@click.argument("recipe")
@click.option("--output", "-o", default=None, help="Search directory: trials, latency cache, best/ (default: "
              "the recipe's output.directory).")
@click.option("--ray/--no-ray", "use_ray", default=None,
              help="Run trials as Ray tasks (default: when Ray is installed) or all in this process.")
@click.option("--ray-address", default=None, help="Join this Ray cluster instead of starting one on this machine.")
@click.option("--workers", type=click.IntRange(1), default=None, help="Trials at a time (default: search.workers, 2).")
@_JSON
def search_command(recipe, output, use_ray, ray_address, workers, as_json) -> None:
    """Search RECIPE's [search.space] for the fastest artifact that passes its gates.

    Trials are cached by content hash under DIR/trials: a search run again (after an interrupt)
    reruns only unfinished trials. The chosen artifact is copied to DIR/best.

    \b
    Examples:
      fxpress search examples/search/efficientnet-lite0.toml -o effnet-search/
      fxpress search recipe.toml -o out/ --no-ray --json
    """  # noqa: D301 - click needs a real \b (backspace) to keep the examples unwrapped
    from compiler.recipe import load_recipe
    from compiler.search import search

    chosen = load_recipe(recipe)
    directory = _recipe_output(chosen, output)
    from tqdm import tqdm

    with tqdm(desc="search: grid points decided", disable=None, file=sys.stderr, leave=False) as bar:
        def on_round(decided: int, grid: int, trials: int, best: str) -> None:
            bar.total = grid
            bar.update(decided - bar.n)
            bar.set_postfix_str(f"{trials} trials done, best so far: {best}")

        try:
            report = search(chosen, directory, address=ray_address, use_ray=use_ray,
                            workers=workers or chosen.get("search.workers", 2), on_round=on_round)
        except KeyboardInterrupt:
            click.echo(f"fxpress: interrupted; finished trials are kept in {directory / 'trials'}: run the same "
                       "command to resume", err=True)
            raise click.exceptions.Exit(130) from None
    click.echo(json.dumps(report.to_dict(), indent=2, default=str) if as_json else report.render())
    if report.chosen is None:
        raise AccuracyError(f"no trial of the search passes every gate; see {directory / 'search.json'}")


def _recipe_output(recipe, output: str | None):
    from compiler.errors import UsageError

    if output is not None:
        return _absolute(output)
    if recipe.get("output.directory") is None:
        raise UsageError("give -o DIR or the recipe key output.directory")
    return _absolute(str(recipe.resolve_path(recipe.get("output.directory"))))


def _recipe_steps(recipe) -> int:
    from compiler.recipe import recipe_target

    return len(recipe_target(recipe).pipeline) + 2  # capture, passes, lowering


def _render_run(result) -> str:
    lines = [str(result.compiled.report), "metrics on the evaluation data:"]
    lines += [f"  {key:<18} {value:.4f}" for key, value in result.metrics.items()
              if isinstance(value, float) and key not in {item.gate.key for item in result.gates}]
    if result.latency is not None:
        lines += [f"  p50 {item['runner']} at batch {item['batch']}: {item['p50_ms']:.2f} ms"
                  for item in result.latency["results"]]
    lines.append(f"wrote {result.directory}" if result.directory else "wrote nothing")
    return "\n".join(lines)


main.add_command(lint_command)


@main.command("targets")
@_JSON
def targets_command(as_json) -> None:
    """List the targets with their passes, options and backend.

    \b
    Examples:
      fxpress targets
      fxpress targets --json
    """  # noqa: D301 - click needs a real \b (backspace) to keep the examples unwrapped
    records = [target.to_dict() for target in TARGETS.values()]
    if as_json:
        click.echo(json.dumps(records, indent=2))
        return
    for record in records:
        passes = ", ".join(spec["name"] for spec in record["pipeline"])
        click.echo(f"{record['name']}: {record['description']}\n  passes: {passes}\n  backend: "
                   f"{record['backend']} {record['backend_options']}")


@main.command("zoo")
@_JSON
def zoo_command(as_json) -> None:
    """List the zoo's models (real weights and sample data from installed packages).

    \b
    Examples:
      fxpress zoo
      fxpress zoo --json
    """  # noqa: D301 - click needs a real \b (backspace) to keep the examples unwrapped
    import models

    records = [{"name": name, **_zoo_record(models.load(name))} for name in models.names()]
    if as_json:
        click.echo(json.dumps(records, indent=2))
        return
    for record in records:
        click.echo(f"{record['name']:<20} {record['task']:<15} {record['description']}")


def _zoo_record(entry) -> dict:
    inputs = [{"name": name, "dtype": str(tensor.dtype).removeprefix("torch."), "shape": list(tensor.shape)}
              for name, tensor in zip(entry.input_names, entry.example_inputs, strict=True)]
    return {"task": entry.task, "description": entry.description, "inputs": inputs}
