"""The pass manager: lint after every pass, honest ``modified``, exactness, dumps, the ledger."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
import torch.fx as fx

from compiler import TARGETS, VerificationError, inspect
from compiler.capture import capture
from compiler.pass_base import Pass, PassContext, PassResult
from compiler.pass_manager import PassManager
from compiler.report import Ledger
from passes import REGISTRY
from tests.support import SmallCNN, randomize_batch_norm

CPU_FP32_PASSES = [spec.name for spec in TARGETS["cpu-fp32"].pipeline]


def make_model() -> SmallCNN:
    torch.manual_seed(0)
    return randomize_batch_norm(SmallCNN())


# --- passes that misbehave on purpose --------------------------------------------------------


def first_weight(gm: fx.GraphModule) -> torch.Tensor:
    return gm.get_submodule("layers.0.conv").weight


class LyingPass(Pass):
    """Changes the graph (inserts ``relu`` before the output) and says it did not."""

    name = "lying_pass"

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        output = gm.graph.output_node()
        (result,) = output.args[0]
        with gm.graph.inserting_before(output):
            extra = gm.graph.call_function(torch.ops.aten.relu.default, (result,))
        output.args = ((extra,),)
        gm.recompile()
        return PassResult(gm, modified=False)


class SilentWeightEdit(Pass):
    """Edits a weight in place (same graph text) and says nothing changed."""

    name = "silent_weight_edit"

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        with torch.no_grad():
            first_weight(gm).mul_(1.0)  # same values, but an in-place write all the same
        return PassResult(gm, modified=False)


class PerturbWeight(Pass):
    """Adds noise to a conv weight: not exact, whatever it claims."""

    name = "perturb_weight"

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        with torch.no_grad():
            first_weight(gm).add_(0.05)
        return PassResult(gm, modified=True, stats={"perturbed": 1})


class ApproximatePerturbWeight(PerturbWeight):
    name = "approximate_perturb_weight"
    exact = False


class BreakTopologicalOrder(Pass):
    """Moves the first conv before its input: the graph no longer lints."""

    name = "break_order"

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        conv = next(node for node in gm.graph.nodes if node.target == torch.ops.aten.conv2d.default)
        next(iter(gm.graph.nodes)).prepend(conv)
        return PassResult(gm, modified=True)


# --- helpers ---------------------------------------------------------------------------------


@pytest.fixture
def setup():
    """(captured gm, context, eager reference, empty ledger) for a fresh copy of the CNN."""
    model = make_model()
    inputs = (torch.randn(2, 3, 8, 8),)
    with torch.no_grad():
        reference = (model(*inputs),)
    gm = capture(model, inputs).graph_module
    return gm, PassContext(inputs, inputs), reference, Ledger(model="SmallCNN", target="test")


def cleanup_passes() -> list[Pass]:
    return [REGISTRY["remove_noops"](), REGISTRY["eliminate_dead_code"]()]


def run(setup, passes, **options) -> tuple[fx.GraphModule, Ledger]:
    gm, context, reference, ledger = setup
    return PassManager(passes, **options).run(gm, context, reference, ledger), ledger


# --- verification ------------------------------------------------------------------------------


def test_a_pass_that_lies_about_modified_is_named_with_its_predecessors(setup):
    with pytest.raises(VerificationError) as raised:
        run(setup, [*cleanup_passes(), LyingPass()])
    message = str(raised.value)
    assert "'lying_pass'" in message and "modified=False" in message
    assert "after remove_noops, eliminate_dead_code" in message


def test_a_silent_in_place_weight_edit_counts_as_a_change(setup):
    with pytest.raises(VerificationError, match="'silent_weight_edit' reported modified=False"):
        run(setup, [SilentWeightEdit()])


def test_first_pass_failure_says_it_was_first(setup):
    with pytest.raises(VerificationError, match=r"'lying_pass'.*\(the first pass\)"):
        run(setup, [LyingPass()])


def test_honesty_check_is_part_of_verify(setup):
    gm, ledger = run(setup, [LyingPass()], verify=False)
    assert ledger.entries[0].name == "lying_pass"
    assert ledger.entries[0].op_delta == {"aten.relu": 1}


def test_graph_is_linted_after_every_pass(setup):
    with pytest.raises(VerificationError) as raised:
        run(setup, [*cleanup_passes(), BreakTopologicalOrder()], verify=False)
    message = str(raised.value)
    assert "does not lint after pass 'break_order'" in message
    assert "after remove_noops, eliminate_dead_code" in message


def test_exact_pass_that_perturbs_a_weight_is_refused(setup):
    with pytest.raises(VerificationError) as raised:
        run(setup, [REGISTRY["remove_noops"](), PerturbWeight()])
    message = str(raised.value)
    assert "exact pass 'perturb_weight' changed the outputs" in message
    assert "(after remove_noops)" in message


def test_inexact_pass_is_accepted_and_its_drift_is_recorded(setup):
    _, ledger = run(setup, [REGISTRY["remove_noops"](), ApproximatePerturbWeight()])
    clean, perturbed = ledger.entries
    assert clean.drift["max_abs"] == 0.0
    assert perturbed.name == "approximate_perturb_weight"
    assert perturbed.modified and perturbed.stats == {"perturbed": 1}
    assert perturbed.drift["max_abs"] > 1e-3
    assert perturbed.drift["cosine"] < 1.0
    assert perturbed.drift["sqnr_db"] is not None and perturbed.drift["sqnr_db"] < 100


# --- dumps -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inspected(tmp_path_factory):
    dump_dir = tmp_path_factory.mktemp("dumps")
    ledger = inspect(make_model(), example_inputs=(torch.randn(2, 3, 8, 8),), dump_dir=str(dump_dir))
    return ledger, dump_dir


def test_dump_dir_has_one_file_per_pass(inspected):
    _, dump_dir = inspected
    expected = ["00_capture.txt"] + [f"{index:02d}_{name}.txt" for index, name in enumerate(CPU_FP32_PASSES, 1)]
    assert sorted(path.name for path in dump_dir.iterdir()) == expected
    capture_text = (dump_dir / "00_capture.txt").read_text()
    assert "aten.conv2d" in capture_text and "@ layers.0.conv" in capture_text


def test_fold_conv_bn_dump_differs_by_the_batch_norm_lines(inspected):
    _, dump_dir = inspected
    index = CPU_FP32_PASSES.index("fold_conv_bn") + 1
    before = Counter((dump_dir / f"{index - 1:02d}_{CPU_FP32_PASSES[index - 2]}.txt").read_text().splitlines())
    after = Counter((dump_dir / f"{index:02d}_fold_conv_bn.txt").read_text().splitlines())
    removed, added = before - after, after - before
    removed_batch_norms = [line for line in removed if "= aten.batch_norm(" in line]
    assert len(removed_batch_norms) == 2
    assert {line.rsplit("@ ", 1)[1] for line in removed_batch_norms} == {"layers.0.bn", "layers.1.bn"}
    assert not any("batch_norm" in line for line in after)
    # the only other lines that change: the BN's statistics go, and its consumers are re-wired
    assert all("batch_norm" not in line for line in added)
    assert all("@ layers.0.bn" in line or "@ layers.1.bn" in line or "aten.batch_norm" in line
               or "aten.relu" in line for line in removed)


# --- ledger --------------------------------------------------------------------------------


def test_ledger_entries_have_every_field(inspected):
    ledger, _ = inspected
    assert [entry.name for entry in ledger.entries] == CPU_FP32_PASSES
    for entry in ledger.entries:
        assert isinstance(entry.options, dict)
        assert isinstance(entry.modified, bool)
        assert entry.seconds >= 0.0
        assert isinstance(entry.stats, dict)
        assert all(isinstance(count, int) and count != 0 for count in entry.op_delta.values())
        assert entry.params_before > 0 and entry.params_after > 0
        assert entry.macs_before > 0 and entry.macs_after > 0
        assert set(entry.drift) >= {"max_abs", "cosine"}
        assert entry.drift["max_abs"] < 1e-4 and entry.drift["cosine"] > 0.9999
    fold = ledger.entry("fold_conv_bn")
    assert fold.modified
    assert fold.op_delta == {"aten.batch_norm": -2}
    # each BN's weight, bias, mean and variance go: 4 vectors of 8, twice
    assert fold.params_before - fold.params_after == 2 * 4 * 8
    assert fold.macs_after == fold.macs_before  # batch_norm has no MACs in our count


def test_ledger_records_capture_and_the_initial_graph(inspected):
    ledger, _ = inspected
    assert ledger.front_end == "torch.fx.symbolic_trace"
    assert ledger.initial["ops"]["aten.batch_norm"] == 2
    assert ledger.initial["params"] == ledger.entries[0].params_before


def test_ledger_table_names_every_pass(inspected):
    ledger, _ = inspected
    text = str(ledger)
    assert "target cpu-fp32" in text and "torch.fx.symbolic_trace" in text
    rows = text.splitlines()
    for index, name in enumerate(CPU_FP32_PASSES, 1):
        assert any(row.split()[:2] == [str(index), name] for row in rows), name
    assert "batch_norm-2" in text


def test_ledger_to_dict_is_json_with_passes(inspected):
    ledger, _ = inspected
    data = json.loads(json.dumps(ledger.to_dict()))
    assert [entry["name"] for entry in data["passes"]] == CPU_FP32_PASSES
    assert data["target"] == "cpu-fp32"
    fold = data["passes"][CPU_FP32_PASSES.index("fold_conv_bn")]
    assert fold["op_delta"] == {"aten.batch_norm": -2}
    assert set(fold) >= {
        "name", "options", "modified", "seconds", "stats", "op_delta", "params_before",
        "params_after", "macs_before", "macs_after", "drift",
    }
    assert json.loads(ledger.to_json()) == data
