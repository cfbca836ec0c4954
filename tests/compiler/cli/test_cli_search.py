"""``fxpress search RECIPE``: the fastest passing trial, its artifact under best/, a resumable trial cache."""

from __future__ import annotations

import json

from click.testing import CliRunner

from compiler.cli import main

RECIPE = """\
gates = ["top1_agreement >= 0.985"]

[model]
source = "digits-cnn"

[compile]
threads = 1

[prune]
round_to = 1

[recover]
seconds = 0

[data.calibration]
zoo = true
samples = 128

[data.evaluation]
zoo = true
samples = 200

[bench]
runs = 10

[search.space]
"prune.macs" = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
"""


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def test_search_writes_the_chosen_artifact_and_a_second_run_reuses_every_trial(tmp_path):
    (tmp_path / "recipe.toml").write_text(RECIPE)
    out = tmp_path / "out"
    first = run("search", str(tmp_path / "recipe.toml"), "-o", str(out), "--no-ray", "--json")
    assert first.exit_code == 0, first.output + first.stderr
    summary = json.loads(first.stdout)
    assert summary["grid_size"] == 8 and summary["trials_run"] < 8 and summary["chosen"]["passed"]
    assert (out / "best" / "model.onnx").is_file() and (out / "search.html").is_file()
    again = json.loads(run("search", str(tmp_path / "recipe.toml"), "-o", str(out), "--no-ray", "--json").stdout)
    assert again["reused"] == summary["trials_run"] and again["chosen"]["patch"] == summary["chosen"]["patch"]


def test_a_search_recipe_is_refused_by_run(tmp_path):
    (tmp_path / "recipe.toml").write_text(RECIPE)
    result = run("run", str(tmp_path / "recipe.toml"), "-o", str(tmp_path / "out"))
    assert result.exit_code == 2 and "run it with fxpress search" in result.stderr


def test_a_search_no_trial_passes_exits_6(tmp_path):
    (tmp_path / "recipe.toml").write_text(RECIPE.replace("top1_agreement >= 0.985", "sqnr_db >= 500"))
    result = run("search", str(tmp_path / "recipe.toml"), "-o", str(tmp_path / "out"), "--no-ray")
    assert result.exit_code == 6 and "no trial of the search passes every gate" in result.stderr


def _verdicts(summary: dict) -> dict:
    """Each trial's verdict by its patch: what a resumed search reproduces (near-equal timings may swap)."""
    return {json.dumps(trial["patch"]): (trial["stage"], trial["passed"]) for trial in summary["trials"]}


def _search_process(recipe, out):
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-m", "compiler.cli", "search", str(recipe), "-o", str(out), "--no-ray",
                             "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_a_finished_trial(out, process) -> None:
    import time

    deadline = time.monotonic() + 300
    while not list(out.glob("trials/*/result.json")):
        assert process.poll() is None and time.monotonic() < deadline, "the search ended before any trial finished"
        time.sleep(0.2)


def test_a_search_killed_after_a_trial_resumes_from_its_cache_and_chooses_the_same(tmp_path):
    import signal

    (tmp_path / "recipe.toml").write_text(RECIPE)
    reference = json.loads(run("search", str(tmp_path / "recipe.toml"), "-o", str(tmp_path / "whole"), "--no-ray",
                               "--json").stdout)
    out = tmp_path / "out"
    for kill in (signal.SIGINT, signal.SIGKILL):
        process = _search_process(tmp_path / "recipe.toml", out)
        _wait_for_a_finished_trial(out, process)
        process.send_signal(kill)
        _, stderr = process.communicate(timeout=120)
        assert process.returncode in (130, -signal.SIGKILL, 0)  # 0: it finished before the signal landed
        if process.returncode == 130:
            assert "finished trials are kept in" in stderr and "run the same command to resume" in stderr
        finished = len(list(out.glob("trials/*/result.json")))
        resumed = json.loads(run("search", str(tmp_path / "recipe.toml"), "-o", str(out), "--no-ray", "--json").stdout)
        assert resumed["reused"] == finished and _verdicts(resumed) == _verdicts(reference)
        for result in out.glob("trials/*/result.json"):
            result.unlink()  # the second round starts afresh
        (out / "latency.json").unlink(missing_ok=True)
