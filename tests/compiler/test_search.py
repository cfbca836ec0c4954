"""The recipe search: dominance along ordered axes, the trial cache, Ray and one process alike."""

from __future__ import annotations

import json

import pytest

from compiler.errors import UsageError
from compiler.gates import parse_gate
from compiler.recipe import from_dict
from compiler.search import Space, _choose, _next_round, _propagate, apply, search

DIGITS = {
    "gates": ["top1_agreement >= 0.97"],
    "model": {"source": "digits-cnn"},
    "compile": {"target": "cpu-fp32", "threads": 1},
    "recover": {"seconds": 0},
    "data": {"calibration": {"zoo": True, "samples": 128}, "evaluation": {"zoo": True, "samples": 200}},
    "bench": {"runs": 10, "warmup": 2},
}


def _simulate(space: Space, passes, width: int = 1) -> tuple[int, dict]:
    """Run the strategy against a known pass/fail rule; the trials it takes and the final status."""
    status, trials = {}, 0
    while pending := _next_round(space, status, width):
        for point in pending:
            trials += 1
            status[point] = "pass" if passes(space.patch(point)) else "fail"
            _propagate(space, status, point)
    return trials, status


def test_an_ordered_axis_is_bisected_and_the_most_aggressive_passing_value_found():
    budgets = [0.1, 0.0, 0.02, 0.01, 0.04, 0.03, 0.06, 0.08, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    space = Space.from_recipe(from_dict({**DIGITS, "compile": {"target": "cpu-int8"},
                                         "search": {"space": {"compile.float_macs": budgets}}}))
    assert space.values[0][0] == 0.9 and space.values[0][-1] == 0.0  # least aggressive (most float) first
    trials, status = _simulate(space, lambda patch: patch["compile.float_macs"] >= 0.04)
    passing = [space.patch(point)["compile.float_macs"] for point, verdict in status.items() if verdict == "pass"]
    assert min(passing) == 0.04 and trials <= 5 and len(status) == 16  # every point decided, 4 log2 16 trials


def test_unordered_axes_are_crossed_and_each_group_searched():
    space = Space.from_recipe(from_dict({**DIGITS, "compile": {"target": "cpu-int8"}, "search": {"space": {
        "compile.calibrator": ["entropy", "percentile"], "compile.float_macs": [0.0, 0.02, 0.04, 0.08, 0.16]}}}))
    trials, status = _simulate(space, lambda p: p["compile.float_macs"] >= (0.04 if p["compile.calibrator"] ==
                                                                            "entropy" else 0.08), width=2)
    assert space.grid_size == 10 and trials <= 6 and len(status) == 10


def test_apply_sets_dotted_keys_and_unset_removes():
    data = apply({**DIGITS, "search": {"space": {}}}, {"prune.macs": 0.3, "compile.threads": "unset"})
    assert data["prune"] == {"macs": 0.3} and "threads" not in data["compile"] and "search" not in data


def test_a_bad_space_value_names_the_key():
    with pytest.raises(UsageError, match=r"search.space.'compile.float_macs' value 2.0: .*compile.float_macs"):
        from_dict({**DIGITS, "compile": {"target": "cpu-int8"}, "search": {"space": {"compile.float_macs": [2.0]}}})
    with pytest.raises(UsageError, match=r"search.space.'compile.targte'"):
        from_dict({**DIGITS, "search": {"space": {"compile.targte": ["cpu-int8"]}}})


def test_a_search_needs_gates_and_a_space(tmp_path):
    with pytest.raises(UsageError, match="search.space"):
        search(from_dict(DIGITS), tmp_path, use_ray=False)
    with pytest.raises(UsageError, match="a search needs gates"):
        search(from_dict({**{k: v for k, v in DIGITS.items() if k != "gates"},
                          "search": {"space": {"prune.macs": [0.1]}}}), tmp_path, use_ray=False)


def test_a_pruning_search_in_one_process_finds_the_fastest_passing_trial_and_resumes(tmp_path):
    space = {"prune.macs": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]}  # the base recipe gives no budget: the space does
    recipe = from_dict({**DIGITS, "gates": ["top1_agreement >= 0.985"], "prune": {"round_to": 1},
                        "search": {"space": space}}, path=tmp_path / "r.toml")
    rounds = []
    first = search(recipe, tmp_path / "out", use_ray=False, on_round=lambda *state: rounds.append(state))
    assert first.chosen is not None and first.chosen["passed"]
    assert rounds[-1][:3] == (8, 8, len(first.trials)) and [state[2] for state in rounds] == sorted(
        {state[2] for state in rounds})  # points decided, grid, trials done (growing), best so far
    assert len(first.trials) + len(first.skipped) == 8 and len(first.trials) <= 4
    edge = max(trial["patch"]["prune.macs"] for trial in first.trials if trial["passed"])
    above = [trial for trial in first.trials if trial["patch"]["prune.macs"] > edge]
    assert above and not any(trial["passed"] for trial in above)  # the next value up was tried and failed
    assert first.front and all(trial.get("latency_ms") for trial in first.trials if trial.get("artifact"))
    assert (tmp_path / "out" / "best" / "model.onnx").is_file()
    summary = json.loads((tmp_path / "out" / "search.json").read_text())
    assert summary["grid_size"] == 8 and summary["chosen"]["patch"] == first.chosen["patch"]
    unfinished = tmp_path / "out" / "trials" / first.trials[-1]["key"] / "result.json"
    unfinished.unlink()  # as if the search had been killed during its last trial
    again = search(recipe, tmp_path / "out", use_ray=False)
    assert again.reused == len(first.trials) - 1 and again.chosen["patch"] == first.chosen["patch"]


def test_a_small_search_runs_on_ray_in_local_mode(tmp_path):
    ray = pytest.importorskip("ray")
    recipe = from_dict({**DIGITS, "compile": {"target": "cpu-int8", "threads": 1}, "search": {"space": {
        "compile.calibrator": ["mse", "entropy", "percentile", "max"]}}}, path=tmp_path / "r.toml")
    try:
        report = search(recipe, tmp_path / "out", use_ray=True, workers=2)
    finally:
        ray.shutdown()
    assert report.executor.startswith("Ray") and len(report.trials) == 4
    assert report.chosen is not None and all(trial["passed"] for trial in report.trials)
    assert (tmp_path / "out" / "search.html").is_file() and report.front


@pytest.mark.parametrize(("margin", "stage"), [(0.0, "rejected in simulation"), (1.0, "lowered")])
def test_a_trial_whose_simulation_misses_by_more_than_the_margin_stops_before_lowering(tmp_path, margin, stage):
    recipe = from_dict({**DIGITS, "gates": ["top1_agreement >= 0.999"], "prune": {"round_to": 1},
                        "search": {"space": {"prune.macs": [0.9]},
                                   "simulation_margin": {"top1_agreement": margin}}}, path=tmp_path / "r.toml")
    report = search(recipe, tmp_path / "out", use_ray=False)
    (trial,) = report.trials
    assert trial["stage"] == stage and not trial["passed"] and trial["metrics"]["top1_agreement"] < 0.999
    assert ("artifact" in trial) == (stage == "lowered")
    if stage == "lowered":  # the simulation's metrics are kept beside the runtime's
        assert trial["simulation_metrics"]["top1_agreement"] < 0.999


def test_a_loosened_gate_moves_towards_passing():
    assert parse_gate("top1_agreement >= 0.97").loosened(0.01).threshold == pytest.approx(0.96)
    assert parse_gate("accuracy_drop <= 1").loosened(0.5).threshold == pytest.approx(1.5)
    with pytest.raises(UsageError, match="search.simulation_margin.top1_agrement: unknown key"):
        from_dict({**DIGITS, "search": {"space": {"prune.macs": [0.1]},
                                        "simulation_margin": {"top1_agrement": 0.01}}})


def test_the_choice_is_the_fastest_unless_timing_cannot_tell_then_the_most_aggressive():
    space = Space.from_recipe(from_dict({**DIGITS, "search": {"space": {"prune.macs": [0.1, 0.2, 0.3]}}}))

    def trial(index, p50, lowest):
        return {"point": [index], "key": str(index), "latency_ms": p50, "block_ratio_min": lowest}

    tied = [trial(0, 1.00, {"1": 0.99, "2": 0.97}), trial(1, 1.01, {"0": 0.98, "2": 0.99}),
            trial(2, 1.02, {"0": 1.00, "1": 0.99})]
    assert _choose(space, tied)["key"] == "2"  # never measurably slower than the fastest: the most aggressive wins
    apart = [trial(0, 1.00, {"2": 0.80}), trial(2, 1.30, {"0": 1.20})]
    assert _choose(space, apart)["key"] == "0" and _choose(space, []) is None


def test_nested_lists_of_float_layers_form_an_ordered_axis_and_others_are_crossed():
    nested = {"compile.float_modules": [["conv1", "conv2"], [], ["conv1"]]}
    space = Space.from_recipe(from_dict({**DIGITS, "compile": {"target": "cpu-int8"}, "search": {"space": nested}}))
    assert space.ordered(0) and space.values[0] == (["conv1", "conv2"], ["conv1"], [])  # least aggressive first
    assert "float_modules" not in apply(DIGITS | {"compile": {"float_modules": ["x"]}},
                                        {"compile.float_modules": []})["compile"]
    crossing = {"compile.float_modules": [["conv1"], ["conv2"]]}
    assert not Space.from_recipe(from_dict({**DIGITS, "compile": {"target": "cpu-int8"},
                                            "search": {"space": crossing}})).ordered(0)


def test_a_ray_cluster_that_cannot_be_joined_is_a_usage_error_naming_the_address(tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")

    def refuse(**options):  # what ray.init raises for an address it cannot reach or authenticate with
        raise ConnectionError(f"Failed to connect to Ray cluster at {options['address']}")

    monkeypatch.setattr(ray, "init", refuse)
    recipe = from_dict({**DIGITS, "search": {"space": {"prune.macs": [0.1]}}}, path=tmp_path / "r.toml")
    with pytest.raises(UsageError, match=r"--ray-address 10.0.0.9:6379: could not join .*RAY_AUTH_MODE=token"):
        search(recipe, tmp_path / "out", address="10.0.0.9:6379")
