"""A call outside what the artifact accepts raises InputError before ONNX Runtime is reached.

Every bad call is tried on a freshly compiled model and on the same model loaded from disk (the
checks then come from the manifest alone); the command maps the error to exit 2.
"""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from compiler import InputError, UsageError, compile, load
from compiler.cli import main
from tests.support import PositionTable, tokens


class Features(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x):
        return self.linear(x)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    torch.manual_seed(0)
    token_model = compile(PositionTable().eval(), example_inputs=tokens(2, 16))
    torch.manual_seed(0)
    feature_model = compile(Features().eval(), example_inputs=(torch.randn(2, 4),))
    directory = tmp_path_factory.mktemp("artifacts")
    token_model.save(directory / "tokens")
    feature_model.save(directory / "features")
    loaded = (load(directory / "tokens"), load(directory / "features"))
    return {"compiled": (token_model, feature_model), "loaded": loaded}


@pytest.fixture(params=["compiled", "loaded"])
def models(request, artifacts):
    return artifacts[request.param]


def never_run(*args, **kwargs):
    raise AssertionError("the runtime was reached")


def assert_input_error(model, inputs, message: str, **attributes) -> InputError:
    model._runner.run = never_run  # the check must come first: ONNX Runtime is never called
    with pytest.raises(InputError) as raised:
        model(*inputs)
    del model._runner.run
    assert message in str(raised.value)
    for name, value in attributes.items():
        assert getattr(raised.value, name) == value, name
    assert isinstance(raised.value, UsageError) and raised.value.exit_code == 2
    return raised.value


def test_wrong_number_of_inputs(models):
    ids, _ = tokens(2, 16)
    assert_input_error(models[0], (ids,), "the model takes 2 input(s) (input_ids, attention_mask), got 1",
                       given=1, accepted=2)


def test_not_a_tensor(models):
    ids, mask = tokens(2, 16)
    assert_input_error(models[0], (ids.tolist(), mask), "input 'input_ids' must be a torch.Tensor, got list",
                       input_name="input_ids")


def test_wrong_dtype(models):
    ids, mask = tokens(2, 16)
    assert_input_error(models[0], (ids, mask.float()),
                       "input 'attention_mask' has dtype float32; the artifact accepts int64",
                       input_name="attention_mask", given="float32", accepted="int64")


def test_wrong_rank(models):
    ids, mask = tokens(2, 16)
    assert_input_error(models[0], (ids[0], mask),
                       "input 'input_ids' has rank 1 (shape (16,)); the artifact accepts rank 2: "
                       "(batch >= 1, sequence 1..32)", input_name="input_ids", dimension=None)


def test_sequence_beyond_the_bound(models):
    assert_input_error(models[0], tokens(2, 40),
                       "input 'input_ids' dimension 1 (sequence) is 40; the artifact accepts 1 to 32",
                       input_name="input_ids", dimension=1, given=40, accepted="1 to 32")


def test_empty_batch(models):
    ids, mask = tokens(2, 16)
    assert_input_error(models[0], (ids[:0], mask[:0]),
                       "input 'input_ids' dimension 0 (batch) is 0; the artifact accepts 1 or more",
                       dimension=0, given=0)


def test_inputs_that_disagree_on_the_batch(models):
    ids, mask = tokens(3, 16)
    assert_input_error(models[0], (ids, mask[:2]),
                       "input 'attention_mask' dimension 0 (batch) is 2 but input 'input_ids' has batch 3",
                       input_name="attention_mask", dimension=0, given=2, accepted=3)


def test_a_fixed_dimension_of_another_size(models):
    assert_input_error(models[1], (torch.randn(2, 5),),
                       "input 'x' dimension 1 is 5; the artifact accepts only 4 there: (batch >= 1, 4)",
                       input_name="x", dimension=1, given=5, accepted=4)


def test_good_calls_still_run(models):
    token_model, feature_model = models
    assert token_model(*tokens(1, 32)).shape == (1, 3)
    assert feature_model(torch.randn(7, 4)).shape == (7, 3)


FACTORY = '''
import torch
from torch import nn


def static():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 4)).eval(), torch.randn(2, 8), {}


class FixedBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 4)

    def forward(self, x):
        return self.linear(x).reshape(2, 4)


def fixed_batch():
    torch.manual_seed(0)
    return FixedBatch().eval(), torch.randn(2, 8)
'''


def test_command_exits_2_naming_the_input(tmp_path):
    factory = tmp_path / "user_models.py"
    factory.write_text(FACTORY)
    runner = CliRunner()
    compiled = runner.invoke(main, ["compile", f"{factory}:static", "-o", str(tmp_path / "static")])
    assert compiled.exit_code == 0, compiled.output
    result = runner.invoke(main, ["bench", str(tmp_path / "static"), "--batch", "3", "--runs", "3", "--warmup", "1"])
    assert result.exit_code == 2, result.output
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("fxpress: error: ")]
    assert "input 'input' dimension 0 is 3; the artifact accepts only 2 there" in line


def test_command_strict_refuses_a_capture_fallback_with_exit_8(tmp_path):
    factory = tmp_path / "user_models.py"
    factory.write_text(FACTORY)
    runner = CliRunner()
    result = runner.invoke(main, ["compile", f"{factory}:fixed_batch", "-o", str(tmp_path / "out"), "--strict"])
    assert result.exit_code == 8, result.output
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("fxpress: error: ")]
    assert "capture fell back to torch.export, static shapes" in line
    assert not (tmp_path / "out").exists()
    relaxed = runner.invoke(main, ["compile", f"{factory}:fixed_batch", "-o", str(tmp_path / "out")])
    assert relaxed.exit_code == 0, relaxed.output
    assert "fallback: capture fell back to torch.export, static shapes" in relaxed.output
