"""The command's bad inputs (TESTING.md: Files, Targets and options, CLI): exit code, message, no partial artifact.

Most run in-process through click's runner; a kill, an interrupt and concurrent compiles run in
subprocesses, since they are about what another process leaves on disk.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import compiler
import compiler.artifact as artifact
from compiler import TARGETS, TargetError
from compiler.cli import main
from compiler.cli.model_source import resolve

ARTIFACT_FILES = ["manifest.json", "model.onnx", "report.html", "report.json", "report.txt"]
COMMANDS = ["compile", "inspect", "bench", "verify", "targets", "zoo"]

FACTORIES = textwrap.dedent('''
    import os

    import torch
    from torch import nn


    def _linear(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


    def tiny():
        if os.environ.get("FXPRESS_TEST_MARKER"):
            open(os.environ["FXPRESS_TEST_MARKER"], "w").close()
        return _linear(0), torch.randn(2, 8)


    def other():
        """Same interface as tiny(), different weights."""
        return _linear(1), torch.randn(2, 8)


    class Gate(nn.Module):
        def forward(self, x):
            if x.sum() > 0:
                return x * 2
            return x


    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = Gate()

        def forward(self, x):
            return self.gate(x)


    def data_dependent():
        return Gated().eval(), torch.randn(2, 4)


    class SharedConvOutput(nn.Module):
        """The conv feeds a BatchNorm and another conv: the BatchNorm cannot be folded."""

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.other = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + self.other(y)


    def unfoldable():
        torch.manual_seed(0)
        model = SharedConvOutput()
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 1.5)
        return model.eval(), torch.randn(2, 3, 8, 8)


    def raises():
        raise RuntimeError("cannot build the model")


    def not_a_tuple():
        return nn.Linear(2, 2)


    not_callable = 3
''')

UNSUPPORTED = textwrap.dedent('''
    import torch
    from torch import nn

    if not hasattr(torch.ops.fxpress_cli_test, "mystery"):
        @torch.library.custom_op("fxpress_cli_test::mystery", mutates_args=())
        def _mystery(x: torch.Tensor) -> torch.Tensor:
            return x.sin() * 2

        @_mystery.register_fake
        def _mystery_fake(x):
            return torch.empty_like(x)


    class Mystery(nn.Module):
        def forward(self, x):
            return torch.ops.fxpress_cli_test.mystery(x)


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 4)
            self.head = nn.Sequential(Mystery())

        def forward(self, x):
            return self.head(self.linear(x))


    def build():
        return Net().eval(), torch.randn(2, 4)
''')


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def error_line(result) -> str:
    """The one error line the command printed on stderr."""
    lines = [line for line in result.stderr.splitlines() if line.startswith("fxpress: error: ")]
    assert len(lines) == 1, result.output
    return lines[0]


def staging_left(parent: Path) -> list[str]:
    return sorted(path.name for path in parent.iterdir() if ".partial-" in path.name)


def snapshot(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def factories(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("user") / "user_models.py"
    path.write_text(FACTORIES)
    return path


@pytest.fixture(scope="module")
def tiny_artifact(factories, tmp_path_factory) -> Path:
    """An artifact of ``user_models.py:tiny``, written by the command; tests copy it before changing it."""
    directory = tmp_path_factory.mktemp("artifacts") / "tiny"
    result = run("compile", f"{factories}:tiny", "-o", str(directory))
    assert result.exit_code == 0, result.output
    return directory


@pytest.fixture
def existing(tiny_artifact, tmp_path) -> Path:
    destination = tmp_path / "out"
    shutil.copytree(tiny_artifact, destination)
    return destination


# --- usage errors: exit 2 -------------------------------------------------------------------------


def test_unknown_flag_exits_2_without_output(tmp_path):
    result = run("compile", "mlp", "-o", str(tmp_path / "out"), "--no-such-flag")
    assert result.exit_code == 2
    assert "No such option '--no-such-flag'" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_missing_output_option_exits_2():
    result = run("compile", "mlp")
    assert result.exit_code == 2
    assert "Missing option '--output'" in result.stderr


def test_bad_option_value_exits_2():
    result = run("bench", "mlp", "--runs", "1")
    assert result.exit_code == 2
    assert "--runs" in result.stderr and "1" in result.stderr


def test_missing_factory_file_exits_2(tmp_path):
    result = run("compile", f"{tmp_path / 'absent.py'}:build", "-o", str(tmp_path / "out"))
    assert result.exit_code == 2
    assert error_line(result) == f"fxpress: error: model file {str(tmp_path / 'absent.py')!r} does not exist"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("factory", "message"), [
    ("no_such_factory", "has no callable 'no_such_factory'"),
    ("not_callable", "has no callable 'not_callable'"),
    ("not_a_tuple", "must return (model, example_inputs) or (model, example_inputs, dynamic_dims)"),
    ("raises", "failed: RuntimeError: cannot build the model"),
])
def test_bad_factory_exits_2_naming_it(factories, tmp_path, factory, message):
    result = run("compile", f"{factories}:{factory}", "-o", str(tmp_path / "out"))
    assert result.exit_code == 2, result.output
    assert message in error_line(result) and "user_models" in error_line(result)
    assert not (tmp_path / "out").exists()


def test_factory_file_that_does_not_import_exits_2(tmp_path):
    source = tmp_path / "broken.py"
    source.write_text("import torch\ndef build(:\n")
    result = run("inspect", f"{source}:build")
    assert result.exit_code == 2, result.output
    assert f"importing {source} failed: SyntaxError" in error_line(result)


@pytest.mark.parametrize("command", ["compile", "inspect", "bench"])
def test_unknown_target_exits_2_listing_the_known_ones(command, tmp_path):
    arguments = {"compile": ["-o", str(tmp_path / "out")], "inspect": [], "bench": ["--runs", "3"]}[command]
    result = run(command, "mlp", "--target", "gpu-int3", *arguments)
    assert result.exit_code == 2, result.output
    known = ", ".join(sorted(TARGETS))
    assert error_line(result) == f"fxpress: error: unknown target 'gpu-int3'; known targets: {known}"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["compile", "inspect", "bench"])
def test_unknown_model_exits_2_listing_the_zoo(command, tmp_path):
    arguments = ["-o", str(tmp_path / "out")] if command == "compile" else []
    result = run(command, "no-such-model", *arguments)
    assert result.exit_code == 2
    line = error_line(result)
    assert "unknown model 'no-such-model'" in line
    assert all(name in line for name in ("mlp", "lenet", "efficientnet-lite0")) and "file.py:factory" in line
    assert list(tmp_path.iterdir()) == []


def _booby_trapped_pickle(path: Path, marker: Path) -> None:
    """A pickle whose loading creates ``marker``: proof that nothing unpickled it."""

    class Trap:
        def __reduce__(self):
            return open, (str(marker), "w")

    path.write_bytes(pickle.dumps(Trap()))


@pytest.mark.parametrize("spec", ["{pt}", "{pt}:load", "{pth}"], ids=["pt", "pt-factory", "pth"])
def test_pickled_model_file_is_refused_unopened(tmp_path, spec):
    marker = tmp_path / "unpickled"
    paths = {"pt": tmp_path / "model.pt", "pth": tmp_path / "weights.PTH"}
    for path in paths.values():
        _booby_trapped_pickle(path, marker)
    result = run("compile", spec.format(**paths), "-o", str(tmp_path / "out"))
    assert result.exit_code == 2, result.output
    line = error_line(result)
    assert "is a pickled file and fxpress does not unpickle" in line and "file.py:factory" in line
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_pickled_model_is_refused_by_verify_and_bench_too(existing, tmp_path):
    marker = tmp_path / "unpickled"
    _booby_trapped_pickle(tmp_path / "model.pt", marker)
    for args in (["verify", str(existing), "--model", str(tmp_path / "model.pt")],
                 ["bench", str(existing), "--model", str(tmp_path / "model.pt"), "--runs", "3"]):
        result = run(*args)
        assert result.exit_code == 2, result.output
        assert "does not unpickle" in error_line(result)
    assert not marker.exists()


def test_opset_below_the_backend_minimum_is_refused_before_any_work():
    calls = []

    class Counting(torch.nn.Linear):
        def forward(self, x):
            calls.append(1)
            return super().forward(x)

    old = dataclasses.replace(TARGETS["cpu-fp32"], name="cpu-fp32-opset16", backend_options={"opset": 16})
    with pytest.raises(TargetError, match=r"opset 16 is below 17, the lowest the onnxruntime backend supports"):
        compiler.compile(Counting(4, 2).eval(), old, example_inputs=(torch.randn(2, 4),))
    assert calls == []  # refused before capture and the passes, not after


def test_unknown_backend_option_is_refused_listing_the_options():
    target = dataclasses.replace(TARGETS["cpu-fp32"], backend_options={"opset": 18, "threads": 4})
    with pytest.raises(TargetError, match="has no option.* threads; its options: .*graph_optimization_level"):
        compiler.compile(torch.nn.Linear(4, 2).eval(), target, example_inputs=(torch.randn(2, 4),))


def test_model_option_with_a_model_to_compile_conflicts(tmp_path):
    result = run("bench", "mlp", "--model", "lenet", "--runs", "3")
    assert result.exit_code == 2
    assert "--model names the original of an artifact" in error_line(result)


@pytest.mark.parametrize("kind", ["missing", "empty-directory", "file"])
def test_verify_of_a_non_artifact_exits_2(tmp_path, kind):
    path = tmp_path / "thing"
    if kind == "empty-directory":
        path.mkdir()
    elif kind == "file":
        path.write_text("{}")
    result = run("verify", str(path), "--model", "mlp")
    assert result.exit_code == 2
    assert f"{path} is not an artifact directory (no manifest.json)" in result.stderr


def test_verify_without_a_known_original_exits_2(existing):
    result = run("verify", str(existing))
    assert result.exit_code == 2
    assert "verify needs the original model: pass --model" in error_line(result)


def test_bench_compare_of_a_non_zoo_artifact_without_model_exits_2(existing):
    result = run("bench", str(existing), "--compare", "--runs", "3", "--warmup", "0", "--batch", "1")
    assert result.exit_code == 2
    assert "--compare needs the original model: pass --model" in error_line(result)


# --- accuracy, strict, capture, unsupported: 6, 8, 3, 4 ---------------------------------------------


def test_verify_against_a_different_model_exits_6(existing, factories):
    same = run("verify", str(existing), "--model", f"{factories}:tiny", "--samples", "8")
    assert same.exit_code == 0, same.output  # the control: its own original passes
    assert "PASS" in same.stdout
    different = run("verify", str(existing), "--model", f"{factories}:other", "--samples", "8")
    assert different.exit_code == 6, different.output
    assert "FAIL" in different.stdout
    assert "differs from the eager model beyond the target's tolerance" in error_line(different)


def test_strict_with_an_unfoldable_batch_norm_exits_8_without_artifact(factories, tmp_path):
    strict = run("compile", f"{factories}:unfoldable", "-o", str(tmp_path / "strict"), "--strict")
    assert strict.exit_code == 8, strict.output
    line = error_line(strict)
    assert "strict mode: 1 fallback(s) recorded" in line and "anchor output has other users" in line
    assert list(tmp_path.iterdir()) == []
    lenient = run("compile", f"{factories}:unfoldable", "-o", str(tmp_path / "lenient"), "--json")
    assert lenient.exit_code == 0, lenient.output  # the control: the same model compiles, with the fallback noted
    assert any("anchor output has other users" in text for text in json.loads(lenient.stdout)["report"]["fallbacks"])


def test_capture_failure_exits_3_naming_the_module(factories, tmp_path):
    result = run("compile", f"{factories}:data_dependent", "-o", str(tmp_path / "out"))
    assert result.exit_code == 3, result.output
    line = error_line(result)
    assert "'gate'" in line and "user_models.py:" in line
    assert list(tmp_path.iterdir()) == []


def test_unsupported_operator_exits_4_naming_op_and_module(tmp_path):
    source = tmp_path / "mystery_model.py"
    source.write_text(UNSUPPORTED)
    result = run("compile", f"{source}:build", "-o", str(tmp_path / "out"))
    assert result.exit_code == 4, result.output
    line = error_line(result)
    assert "no ONNX mapping for 1 operator(s): fxpress_cli_test.mystery in module 'head.0'" in line
    assert sorted(path.name for path in tmp_path.iterdir()) == ["mystery_model.py"]


def test_internal_error_exits_70_and_says_so(factories, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(artifact, "_write_files", broken)
    result = run("compile", f"{factories}:tiny", "-o", str(tmp_path / "out"))
    assert result.exit_code == 70
    assert error_line(result) == "fxpress: error: internal error: ZeroDivisionError: a bug (rerun with --debug)"
    assert list(tmp_path.iterdir()) == []
    debug = run("--debug", "compile", f"{factories}:tiny", "-o", str(tmp_path / "out"))
    assert debug.exit_code == 70 and "Traceback" in debug.stderr


def test_interrupt_exits_130_and_leaves_the_old_artifact(existing, factories, monkeypatch):
    before = snapshot(existing)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(artifact, "_swap_into_place", interrupted)
    result = run("compile", f"{factories}:tiny", "-o", str(existing), "--force")
    assert result.exit_code == 130
    assert error_line(result) == "fxpress: error: interrupted; nothing was written"
    assert snapshot(existing) == before and staging_left(existing.parent) == []


# --- files: exit 7 ----------------------------------------------------------------------------------


def test_existing_output_without_force_exits_7_before_compiling(existing, factories, tmp_path, monkeypatch):
    before = snapshot(existing)
    marker = tmp_path / "factory-ran"
    monkeypatch.setenv("FXPRESS_TEST_MARKER", str(marker))
    result = run("compile", f"{factories}:tiny", "-o", str(existing))
    assert result.exit_code == 7
    assert error_line(result) == f"fxpress: error: {existing} already exists; pass --force (force=True) to replace it"
    assert snapshot(existing) == before and not marker.exists()


def test_force_replaces_the_existing_output(existing, factories):
    (existing / "stale.txt").write_text("old")
    result = run("compile", f"{factories}:other", "-o", str(existing), "--force")
    assert result.exit_code == 0, result.output
    assert sorted(path.name for path in existing.iterdir()) == ARTIFACT_FILES
    assert staging_left(existing.parent) == []
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected = resolve(f"{factories}:other").model(x)
    torch.testing.assert_close(compiler.load(existing)(x), expected, rtol=1e-3, atol=1e-5)


def test_output_below_a_file_exits_7_before_compiling(factories, tmp_path, monkeypatch):
    (tmp_path / "blocker").write_text("a file")
    marker = tmp_path / "factory-ran"
    monkeypatch.setenv("FXPRESS_TEST_MARKER", str(marker))
    result = run("compile", f"{factories}:tiny", "-o", str(tmp_path / "blocker" / "out"))
    assert result.exit_code == 7
    assert "blocker is not a directory; choose another output path" in error_line(result)
    assert not marker.exists() and (tmp_path / "blocker").read_text() == "a file"


@pytest.mark.parametrize("command", ["verify", "bench"])
def test_tampered_artifact_exits_7(existing, factories, command):
    model = existing / "model.onnx"
    model.write_bytes(model.read_bytes()[:-10])
    extra = ["--runs", "3", "--warmup", "0", "--batch", "1"] if command == "bench" else []
    result = run(command, str(existing), "--model", f"{factories}:tiny", *extra)
    assert result.exit_code == 7, result.output
    assert error_line(result) == (f"fxpress: error: {model} does not match the SHA-256 in the manifest: "
                                  "it was changed or truncated")


def test_unwritable_output_directory_exits_7(factories, tmp_path):
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        if os.access(parent, os.W_OK):
            pytest.skip("running as a user whom permissions do not stop (root)")
        result = run("compile", f"{factories}:tiny", "-o", str(parent / "out"))
        assert result.exit_code == 7
        assert f"cannot write into {parent}: permission denied" in error_line(result)
        assert list(parent.iterdir()) == []
    finally:
        parent.chmod(0o700)


# --- --json and --help --------------------------------------------------------------------------------


def test_json_outputs_parse(tiny_artifact, factories, tmp_path):
    compiled = run("compile", f"{factories}:tiny", "-o", str(tmp_path / "out"), "--json")
    assert compiled.exit_code == 0, compiled.output
    payload = json.loads(compiled.stdout)
    assert payload["artifact"] == str(tmp_path / "out") and payload["report"]["model"] == "user_models"

    inspected = json.loads(run("inspect", f"{factories}:tiny", "--json").stdout)
    assert [entry["name"] for entry in inspected["passes"]][0] == "remove_noops"

    targets = json.loads(run("targets", "--json").stdout)
    assert [target["name"] for target in targets] == list(TARGETS)

    verified = run("verify", str(tiny_artifact), "--model", f"{factories}:tiny", "--samples", "4", "--json")
    assert verified.exit_code == 0, verified.output
    assert json.loads(verified.stdout)["within_tolerance"] is True

    benched = run("bench", "mlp", "--runs", "3", "--warmup", "0", "--batch", "1", "--json")
    assert benched.exit_code == 0, benched.output
    results = json.loads(benched.stdout)["results"]
    assert [(row["runner"], row["batch"], row["runs"]) for row in results] == [("fxpress", 1, 3)]


def test_zoo_json_parses():
    result = run("zoo", "--json")
    assert result.exit_code == 0, result.output
    records = json.loads(result.stdout)
    assert records[0]["name"] == "mlp" and records[0]["inputs"][0]["shape"] == [1, 784]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_of_every_command_shows_unwrapped_examples(command):
    result = run(command, "--help")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    start = lines.index("  Examples:")  # its own line: click kept the block unwrapped
    assert lines[start + 1].startswith(f"    fxpress {command}")


# --- other processes: killed, interrupted, concurrent --------------------------------------------------

# Runs the command in a child whose onnx.save_model writes half of model.onnx, then does ACTION.
_DYING_WRITER = textwrap.dedent('''
    import os
    import signal
    import sys
    import time

    import onnx

    from compiler.cli import main


    def half_then_signal(model, path, *args, **kwargs):
        data = model.SerializeToString()
        with open(path, "wb") as handle:
            handle.write(data[: len(data) // 2])
            handle.flush()
            os.fsync(handle.fileno())
        os.kill(os.getpid(), getattr(signal, sys.argv[1]))
        time.sleep(30)  # the signal arrives long before this ends
        raise AssertionError("the signal did not stop the write")


    onnx.save_model = half_then_signal
    # A child started from a background job inherits SIGINT ignored, and Python then raises no
    # KeyboardInterrupt: restore the default so the test sees what an interactive user gets.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    main.main(sys.argv[2:], prog_name="fxpress")
''')

# Runs the command in a child that waits, before moving its artifact into place, until the other
# child's staging directory exists too (or the destination does): a real race, every time.
_RACING_WRITER = textwrap.dedent('''
    import sys
    import time

    import compiler.artifact as artifact
    from compiler.cli import main

    real_swap = artifact._swap_into_place


    def swap_after_the_other(staging, directory, force):
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if len(list(directory.parent.glob(f".{directory.name}.partial-*"))) >= 2 or directory.exists():
                break
            time.sleep(0.02)
        real_swap(staging, directory, force)


    artifact._swap_into_place = swap_after_the_other
    main.main(sys.argv[1:], prog_name="fxpress")
''')


def _child(script: str, *args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_sigkill_while_writing_keeps_the_old_artifact_and_the_next_write_cleans_up(existing, factories):
    before = snapshot(existing)
    parent = existing.parent
    child = _child(_DYING_WRITER, "SIGKILL", "compile", f"{factories}:other", "-o", str(existing), "--force",
                   cwd=parent)
    _, stderr = child.communicate(timeout=300)
    assert child.returncode == -9, stderr
    assert snapshot(existing) == before  # the old artifact is whole
    stale = staging_left(parent)
    assert stale == [stale[0]] and stale[0].startswith(f".out.partial-{child.pid}-")
    half = parent / stale[0] / "model.onnx"
    assert 0 < half.stat().st_size < len(before["model.onnx"]) // 2 + 10_000  # it was killed mid-write

    sibling = run("compile", f"{factories}:tiny", "-o", str(parent / "sibling"))
    assert sibling.exit_code == 0, sibling.output
    assert staging_left(parent) == []  # the dead writer's staging went with the next write beside it
    assert snapshot(existing) == before
    again = run("compile", f"{factories}:tiny", "-o", str(existing), "--force")
    assert again.exit_code == 0, again.output
    assert staging_left(parent) == [] and sorted(path.name for path in existing.iterdir()) == ARTIFACT_FILES
    compiler.load(existing)


def test_sigint_while_writing_exits_130_and_keeps_the_old_artifact(existing, factories):
    before = snapshot(existing)
    child = _child(_DYING_WRITER, "SIGINT", "compile", f"{factories}:other", "-o", str(existing), "--force",
                   cwd=existing.parent)
    _, stderr = child.communicate(timeout=300)
    assert child.returncode == 130, stderr
    assert "fxpress: error: interrupted; nothing was written" in stderr
    assert snapshot(existing) == before and staging_left(existing.parent) == []


@pytest.mark.parametrize("force", [False, True], ids=["no-force", "force"])
def test_concurrent_compiles_to_one_output_leave_one_complete_artifact(factories, tmp_path, force):
    destination = tmp_path / "out"
    args = ["compile", f"{factories}:tiny", "-o", str(destination), *(["--force"] if force else [])]
    children = [_child(_RACING_WRITER, *args, cwd=tmp_path) for _ in range(2)]
    outcomes = [(child.wait(timeout=300), child.stderr.read()) for child in children]
    codes = sorted(code for code, _ in outcomes)
    if force:
        assert codes == [0, 0], outcomes
    else:
        assert codes == [0, 7], outcomes
        loser = next(stderr for code, stderr in outcomes if code == 7)
        assert f"{destination} appeared while writing (another compile?)" in loser
    assert sorted(path.name for path in destination.iterdir()) == ARTIFACT_FILES
    assert staging_left(tmp_path) == []
    x = torch.randn(2, 8)
    with torch.no_grad():
        expected = resolve(f"{factories}:tiny").model(x)
    torch.testing.assert_close(compiler.load(destination)(x), expected, rtol=1e-3, atol=1e-5)
