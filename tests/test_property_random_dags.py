"""Property test: random small DAGs of conv (with BatchNorm and activations), add, concat and
linear layers go through the cpu-fp32 pipeline and stay valid and within tolerance."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compiler import compile as fxpress_compile
from tests.support import randomize_batch_norm

ACTIVATIONS = {
    "none": torch.nn.Identity, "relu": torch.nn.ReLU, "relu6": torch.nn.ReLU6, "silu": torch.nn.SiLU,
    "gelu": torch.nn.GELU, "hardswish": torch.nn.Hardswish,
}


class RandomDag(torch.nn.Module):
    """Runs a list of steps; each reads earlier values by index and appends one value."""

    def __init__(self, in_channels: int, steps: list[tuple], seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.steps = steps
        self.layers = torch.nn.ModuleList()
        channels = [in_channels]
        for step in steps:
            layer, out_channels = self._build(step, channels)
            self.layers.append(layer)
            channels.append(out_channels)
        self.head = torch.nn.Linear(channels[-1], 5)
        randomize_batch_norm(self, seed)

    @staticmethod
    def _build(step: tuple, channels: list[int]) -> tuple[torch.nn.Module, int]:
        kind, source, other, width, kernel, depthwise, batch_norm, activation = step
        if kind == "conv":
            in_channels = channels[source]
            out_channels = in_channels if depthwise else width
            groups = in_channels if depthwise else 1
            layers = [torch.nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, groups=groups,
                                      bias=not batch_norm)]
            layers += [torch.nn.BatchNorm2d(out_channels)] if batch_norm else []
            layers += [ACTIVATIONS[activation]()]
            return torch.nn.Sequential(*layers), out_channels
        if kind == "add":
            return torch.nn.Identity(), channels[source]
        return torch.nn.Identity(), channels[source] + channels[other]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values = [x]
        for step, layer in zip(self.steps, self.layers, strict=True):
            kind, source, other = step[:3]
            if kind == "conv":
                values.append(layer(values[source]))
            elif kind == "add":
                values.append(values[source] + values[other])
            else:
                values.append(torch.cat([values[source], values[other]], dim=1))
        return self.head(values[-1].mean(dim=(2, 3)))


@st.composite
def dags(draw):
    in_channels = draw(st.integers(1, 4))
    channels = [in_channels]
    steps = []
    for _ in range(draw(st.integers(1, 6))):
        source = draw(st.integers(0, len(channels) - 1))
        same_width = [i for i, c in enumerate(channels) if c == channels[source]]
        kind = draw(st.sampled_from(["conv", "conv", "add", "concat"]))
        if kind == "add" and len(same_width) < 2:
            kind = "conv"
        other = draw(st.sampled_from(same_width if kind == "add" else range(len(channels))))
        step = (kind, source, other, draw(st.integers(1, 6)), draw(st.sampled_from([1, 3])),
                draw(st.booleans()), draw(st.booleans()), draw(st.sampled_from(sorted(ACTIVATIONS))))
        steps.append(step)
        channels.append(RandomDag._build(step, channels)[1])
    return in_channels, steps, draw(st.integers(0, 2**16)), draw(st.integers(4, 7))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dags())
def test_random_dags_compile_and_match_eager(dag):
    in_channels, steps, seed, size = dag
    model = RandomDag(in_channels, steps, seed).eval()
    example = torch.randn(1, in_channels, size, size)
    compiled = fxpress_compile(model, "cpu-fp32", (example,))
    remaining = compiled.report.entries[-1]
    assert remaining.nodes_after <= compiled.report.initial["nodes"]
    histogram = dict(compiled.report.initial["ops"])
    for entry in compiled.report.entries:
        for op, delta in entry.op_delta.items():
            histogram[op] = histogram.get(op, 0) + delta
    assert histogram.get("aten.batch_norm", 0) == 0, "every BatchNorm after a conv must be folded"
    for batch in (1, 3):
        inputs = torch.randn(batch, in_channels, size, size)
        with torch.no_grad():
            expected = model(inputs)
        torch.testing.assert_close(compiled(inputs), expected, rtol=1e-3, atol=1e-5)
