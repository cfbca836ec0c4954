"""Shared helpers of the per-pass tests, offered as factory fixtures.

Fixtures rather than an importable module: test directories have no ``__init__.py``, and a second
``conftest`` imported by name would clash with this one.

Every helper checks what every pass owes whatever it does: the graph lints after the pass, and
outputs are compared in float64 against the eager model (run twice first, to expose a
nondeterministic model rather than blame the pass), at the capture batch size and at another.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from compiler import ir
from compiler.capture import capture
from compiler.pass_base import Pass, PassContext, PassResult
from compiler.pass_manager import PassManager
from compiler.report import Ledger

EXACT_RTOL = EXACT_ATOL = 1e-4
CAPTURE_BATCH = 2
OTHER_BATCH = 5  # a batch size the graph was not captured at: catches specialised shapes


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same random state, so failures reproduce."""
    torch.manual_seed(0)


def as_tuple(inputs: object) -> tuple[torch.Tensor, ...]:
    return (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)


def flat_outputs(outputs: object) -> tuple[torch.Tensor, ...]:
    return tuple(leaf for leaf in pytree.tree_leaves(outputs) if isinstance(leaf, torch.Tensor))


def _capture_gm(model: torch.nn.Module, inputs: object) -> fx.GraphModule:
    """The IR of ``model`` (put in eval mode) captured on ``inputs``."""
    return capture(model.eval(), as_tuple(inputs)).graph_module


def _run_pass(pass_cls: type[Pass], gm: fx.GraphModule, inputs: object, **options) -> PassResult:
    """Run one pass as the pass manager would call it; the result must lint and recompile."""
    inputs = as_tuple(inputs)
    result = pass_cls(**options)(gm, PassContext(example_inputs=inputs, probe_inputs=inputs))
    assert isinstance(result, PassResult)
    result.graph_module.graph.lint()
    result.graph_module.recompile()
    return result


def _randomize_batch_norm(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every BatchNorm non-default statistics and affine parameters.

    The defaults (mean 0, variance 1, weight 1, bias 0) make BatchNorm nearly the identity, which
    hides a fold that swaps, drops or misplaces a term. Weights get both signs: a fold that
    applies |gamma| or forgets the sign of the scale shows up.
    """
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if not isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            continue
        channels = module.num_features
        with torch.no_grad():
            if module.running_mean is not None:
                module.running_mean.copy_(torch.rand(channels, generator=generator) * 4 - 2)
                module.running_var.copy_(torch.rand(channels, generator=generator) * 3 + 0.25)
            if module.affine:
                sign = torch.where(torch.rand(channels, generator=generator) < 0.3, -1.0, 1.0)
                module.weight.copy_(sign * (torch.rand(channels, generator=generator) * 1.5 + 0.5))
                module.bias.copy_(torch.randn(channels, generator=generator))
    return model


def batch_variant(inputs: object, batch: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Fresh random inputs like ``inputs`` with the batch dimension set to ``batch``."""
    generator = torch.Generator().manual_seed(seed)
    return tuple(
        torch.randn((batch, *tensor.shape[1:]), generator=generator, dtype=tensor.dtype)
        for tensor in as_tuple(inputs)
    )


def eager(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The model's flat outputs, after checking that two runs agree exactly."""
    with torch.no_grad():
        first, second = flat_outputs(model(*inputs)), flat_outputs(model(*inputs))
    for one, two in zip(first, second, strict=True):
        assert torch.equal(one, two), "the eager model is not deterministic"
    return first


def _assert_matches_model(
    model: torch.nn.Module,
    gm: fx.GraphModule,
    example_inputs: object,
    batches: Sequence[int] = (CAPTURE_BATCH, OTHER_BATCH),
) -> None:
    """``gm`` computes what ``model`` computes, within rtol = atol = 1e-4 in float64."""
    for seed, batch in enumerate(batches):
        inputs = batch_variant(example_inputs, batch, seed)
        expected = eager(model, inputs)
        with torch.no_grad():
            actual = flat_outputs(gm(*inputs))
        assert len(actual) == len(expected)
        for out, ref in zip(actual, expected, strict=True):
            assert out.shape == ref.shape
            torch.testing.assert_close(
                out.to(torch.float64), ref.to(torch.float64), rtol=EXACT_RTOL, atol=EXACT_ATOL,
                msg=lambda text, batch=batch: f"batch size {batch}: {text}",
            )


def _run_in_manager(
    pass_: Pass, model: torch.nn.Module, inputs: object
) -> tuple[fx.GraphModule, Ledger]:
    """Capture ``model`` and run ``pass_`` through a verifying PassManager; return gm and ledger."""
    inputs = as_tuple(inputs)
    gm = _capture_gm(model, inputs)
    reference = eager(model, inputs)
    ledger = Ledger(model=type(model).__name__, target="test")
    context = PassContext(example_inputs=inputs, probe_inputs=inputs)
    gm = PassManager([pass_], verify=True).run(gm, context, reference, ledger)
    assert [entry.name for entry in ledger.entries] == [pass_.name]
    return gm, ledger


def _assert_untouched(result: PassResult, fingerprint_before: str) -> None:
    """A pass that found nothing to do says so and leaves the graph and its tensors alone."""
    assert result.modified is False
    assert ir.fingerprint(result.graph_module) == fingerprint_before


@pytest.fixture
def capture_gm() -> Callable[..., fx.GraphModule]:
    return _capture_gm


@pytest.fixture
def run_pass() -> Callable[..., PassResult]:
    return _run_pass


@pytest.fixture
def randomize_batch_norm() -> Callable[..., torch.nn.Module]:
    return _randomize_batch_norm


@pytest.fixture
def assert_matches_model() -> Callable[..., None]:
    return _assert_matches_model


@pytest.fixture
def run_in_manager() -> Callable[..., tuple[fx.GraphModule, Ledger]]:
    return _run_in_manager


@pytest.fixture
def assert_untouched() -> Callable[..., None]:
    return _assert_untouched
