"""The compiled model: callable on torch tensors, with its ledger, ONNX model and save()."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import onnx
import torch
import torch.utils._pytree as pytree

from compiler.backend_base import Runner
from compiler.errors import EmulationError
from compiler.input_spec import check_inputs, specs_from_manifest
from compiler.report import Ledger


class CompiledModel:
    """A lowered model that behaves like the original: same inputs, outputs shaped the same."""

    def __init__(
        self,
        model: onnx.ModelProto,
        runner: Runner,
        report: Ledger,
        manifest: dict,
        output_spec: pytree.TreeSpec,
        output_constants: dict[int, object] | None = None,
        graph_module: torch.fx.GraphModule | None = None,
        emulator: Callable[..., tuple[torch.Tensor, ...]] | None = None,
        files: dict[str, bytes] | None = None,
    ):
        self._model = model
        self._runner = runner
        self.report = report
        self.manifest = manifest
        self._output_spec = output_spec
        self._output_constants = dict(output_constants or {})
        self.graph_module = graph_module  # the optimised IR; None for a model loaded from disk
        self._emulator = emulator  # the backend's emulation of its kernels, where it has one
        self._input_specs = specs_from_manifest(manifest)
        self.files = dict(files or {})  # the backend's further artifact files (name -> bytes)

    @property
    def onnx(self) -> onnx.ModelProto:
        """The ONNX model."""
        return self._model

    @property
    def input_names(self) -> list[str]:
        """Names of the model's inputs, in call order."""
        return [spec["name"] for spec in self.manifest["inputs"]]

    def __call__(self, *inputs: torch.Tensor) -> object:
        """Run on torch tensors; return torch tensors in the structure the original returned.

        Raises:
            InputError: the inputs are not what the artifact accepts (their number, a dtype, a
                rank, a size outside a dynamic dimension's range or different from a fixed one).
        """
        self.check_inputs(inputs)
        tensors = iter(self._runner.run(tuple(inputs)))
        flat = [
            self._output_constants[index] if index in self._output_constants else next(tensors)
            for index in range(self._output_spec.num_leaves)
        ]
        return pytree.tree_unflatten(flat, self._output_spec)

    def check_inputs(self, inputs: tuple[object, ...]) -> None:
        """Raise InputError unless ``inputs`` are what the artifact accepts (see :mod:`compiler.input_spec`)."""
        if self._input_specs is not None:
            check_inputs(self._input_specs, inputs)

    def simulate(self, *inputs: torch.Tensor, exact: bool = True) -> object:
        """Run the optimised IR in PyTorch, shaped like the model's outputs.

        The default is the integer emulation (:mod:`backends.onnxruntime.emulation`): every group ONNX
        Runtime fuses into an integer kernel (QLinearConv, QGemm, QLinearAdd) is computed with
        that kernel's arithmetic, and float convs, linears and global means with MLAS's and
        Eigen's summation orders, so the result equals the runtime's bit for bit (on x86-64),
        at about three times the cost of the float simulation. That is what to compare the
        runtime with: the float simulation breaks rounding ties differently, and the network
        amplifies each tie, so on efficientnet-lite0 only ~93% of its logits are within one
        output step of the runtime's.

        Args:
            *inputs: the model's inputs.
            exact: False runs the fake-quantised IR as it is, in float32 (the float simulation:
                faster, and what the quantisation passes optimise).

        Raises:
            ArtifactError: for a model loaded from disk, which holds only the ONNX model.
        """
        if self.graph_module is None:
            from compiler.errors import ArtifactError

            raise ArtifactError("a loaded model has no IR to simulate; compile() the model to get one")
        self.check_inputs(inputs)
        if exact and self._emulator is None:
            raise EmulationError(f"the {self.report.target} backend has no emulation of its kernels; "
                                 "use simulate(..., exact=False)")
        if exact:
            tensors = iter(self._emulator(self.graph_module, *inputs))
        else:
            with torch.no_grad():
                tensors = iter(self.graph_module(*inputs))
        flat = [
            self._output_constants[index] if index in self._output_constants else next(tensors)
            for index in range(self._output_spec.num_leaves)
        ]
        return pytree.tree_unflatten(flat, self._output_spec)

    def save(self, directory: str | Path, *, force: bool = False) -> Path:
        """Write the model, manifest, reports and the backend's further files into ``directory``, atomically."""
        from compiler.artifact import write_artifact

        return write_artifact(Path(directory), self._model, self.manifest, self.report, force=force, files=self.files)

    def __repr__(self) -> str:
        return f"CompiledModel(target={self.report.target!r}, inputs={self.input_names})"
