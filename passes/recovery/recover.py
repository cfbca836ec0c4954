"""Distillation recovery: fine-tune the IR's weights towards the model as it was captured.

The teacher is the captured IR before any pass (the pass context's ``teacher``), the student the
IR after the lossy passes before this one (pruning, later low-rank). Every float weight and bias
read by a conv or linear is trained with Adam on the user's unlabelled data (``train_data``, or
the calibration data when none is given) until the wall-clock budget is spent:

* classifiers: KL divergence between the softened distributions at ``temperature``, scaled by
  ``temperature ** 2`` (Hinton et al.);
* embedding models (unit-norm output rows): one minus the cosine of each row;
* plus, with ``features`` > 0, ``feature_weight`` times the normalised squared error at up to
  ``features`` intermediate tensors matched to the teacher's (:mod:`passes.recovery.features`:
  block boundaries, sliced to the channels pruning kept), the teacher's values cached within
  ``feature_cache_mb``.

Image inputs are drawn both as they are and mirrored left to right (``augment="auto"``, see
:func:`mirror_dims`): twice the distinct samples for the same data, which the short budgets here
need more than they need steps. The learning rate decays from ``lr`` to 0 along a cosine over the
budget (``schedule="cosine"``).
Each sample's teacher output is computed the first time the sample is drawn and kept (the data
does not change), and 4-D tensors train in channels-last order (measured about 25% faster for
convolutions on this CPU): both buy steps within the same wall-clock budget. Batches are drawn in
a seeded order; ``max_steps`` bounds the steps as well (tests use it, since a
time budget runs a machine-dependent number of steps). A tenth of the samples (at least 8, when
there are 80 or more) is held out: the ledger shows the loss curve and the held-out distance to
the teacher (agreement of the top class, or mean cosine) before and after.
"""

from __future__ import annotations

import math
import time

import torch
import torch.fx as fx
import torch.nn.functional as F

from compiler import ir
from compiler.errors import PassError
from compiler.pass_base import Pass, PassContext, PassResult
from compiler.sequences import Padding, find_padding
from passes.recovery.features import FeaturePoint, feature_loss, feature_points, with_features

_WEIGHTED = ("aten.conv2d", "aten.conv1d", "aten.linear")
_CURVE_POINTS = 10
_POOL = 32  # batches sorted by length together (padded token data)
_AUGMENTS = ("auto", "mirror", "none")
_IMAGE_CHANNELS = (1, 3, 4)


class Recover(Pass):
    """Distil the IR towards the captured model within a wall-clock budget."""

    name = "recover"
    exact = False
    needs_calibration = True
    needs_teacher = True
    default_options = {"seconds": 180.0, "max_steps": None, "lr": 1e-4, "temperature": 2.0,
                       "batch_size": 16, "seed": 0, "schedule": "cosine", "features": 4, "feature_weight": 1.0,
                       "feature_cache_mb": 1024, "augment": "auto"}

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        """A teacher, data, and sane options."""
        super().requires(gm, ctx)
        if ctx.teacher is None:
            raise PassError(f"pass {self.name!r} needs the captured model as its teacher in the pass context")
        seconds = self.options["seconds"]
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds < 0:
            raise PassError(f"pass {self.name!r}: seconds must be a number >= 0, got {seconds!r}")
        if self.options["schedule"] not in ("cosine", "constant"):
            raise PassError(f"pass {self.name!r}: schedule must be 'cosine' or 'constant', "
                            f"got {self.options['schedule']!r}")
        features = self.options["features"]
        if isinstance(features, bool) or not isinstance(features, int) or features < 0:
            raise PassError(f"pass {self.name!r}: features is a count of points >= 0, got {features!r}")
        if self.options["augment"] not in _AUGMENTS:
            raise PassError(f"pass {self.name!r}: augment must be one of {', '.join(_AUGMENTS)}, "
                            f"got {self.options['augment']!r}")
        for key in ("lr", "temperature", "feature_weight", "feature_cache_mb"):
            if not isinstance(self.options[key], (int, float)) or self.options[key] <= 0:
                raise PassError(f"pass {self.name!r}: {key} must be positive, got {self.options[key]!r}")

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        """Train until the budget is spent; report the loss curve and held-out quality."""
        if self.options["seconds"] == 0 or self.options["max_steps"] == 0:
            return PassResult(gm, modified=False, stats={"steps": 0, "reason": "no budget"})
        samples = _samples(ctx.train_data if ctx.train_data is not None else ctx.calibration_data)
        train, held_out = _split(samples)
        teacher = ctx.teacher
        kind = _kind(teacher, train)
        before = _quality(gm, teacher, held_out, kind)
        names = _trainable(gm)
        parameters = [ir.get_attribute(gm, name) for name in names]
        mirror, augmented = mirror_dims(train, self.options["augment"])
        points = feature_points(gm, teacher, tuple(tensor[:2] for tensor in train), self.options["features"],
                                self.options["feature_cache_mb"] * 2 ** 20, Views(train, mirror).count)
        padding = find_padding(teacher, train)
        curve, steps, seconds = distil(gm, teacher, train, parameters, kind, self.options, points, padding, mirror)
        _freeze(gm, names)
        return PassResult(gm, modified=steps > 0, stats={
            "steps": steps, "seconds": round(seconds, 1), "loss": kind, "tensors_trained": len(names),
            "padding_cut": padding is not None, "augment": augmented,
            "feature_points": [point.node for point in points],
            "samples": {"train": _count(train), "held_out": _count(held_out)}, "loss_curve": curve,
            "held_out_before": before, "held_out_after": _quality(gm, teacher, held_out, kind),
        })

def distil(student, teacher, train: tuple[torch.Tensor, ...], parameters: list[torch.Tensor], kind: str,
           options: dict, points: list[FeaturePoint] | None = None, padding: Padding | None = None,
           mirror: tuple[int | None, ...] | None = None) -> tuple[list[float], int, float]:
    """Train ``parameters`` of ``student`` towards ``teacher`` on ``train``; the loss curve, steps, seconds.

    ``student`` and ``teacher`` are any callables on the samples (an IR, an eager ``nn.Module``);
    a tuple or list output is read at its first element. ``options`` are the pass's: ``seconds``,
    ``max_steps``, ``lr``, ``schedule`` (``"cosine"`` decays to 0 over the budget, or
    ``"constant"``), ``temperature``, ``batch_size``, ``seed``, ``feature_weight``. With ``points``
    (both IRs), the loss adds the feature term at those points. With ``padding`` (padded token data
    whose padding provably does not reach the outputs, :func:`compiler.sequences.find_padding`),
    batches are drawn among samples of similar length and cut to their longest sample: on the zoo's
    MiniLM sentences (16 of 128 tokens real on average) a step then costs a fraction of a padded one.
    With ``mirror`` (:func:`mirror_dims`), every sample is drawn as it is and mirrored.
    """
    if points:
        student, teacher = with_features(student, points), _TeacherViews(with_features(teacher, points), points)
    optimiser = torch.optim.Adam(parameters, lr=options["lr"])
    generator = torch.Generator().manual_seed(options["seed"])
    started, steps, losses = time.perf_counter(), 0, []
    deadline = started + options["seconds"]
    limit = options["max_steps"] or math.inf
    views = Views(train, mirror)
    targets = _TeacherCache(teacher, views, padding)
    while steps < limit and time.perf_counter() < deadline:
        for index in _batches(views.count, options["batch_size"], generator, targets.lengths):
            batch, target = _cut(views[index], padding), targets.outputs(index)
            loss = _step_loss(targets.masked(student(*batch), batch, bool(points)), target, kind, options,
                              bool(points))
            optimiser.zero_grad()
            loss.backward()
            if options["schedule"] == "cosine":
                _cosine(optimiser, options["lr"], _progress(started, steps, options, limit))
            optimiser.step()
            losses.append(loss.item())
            steps += 1
            if steps >= limit or time.perf_counter() >= deadline:
                break
    return _curve(losses), steps, time.perf_counter() - started


def _step_loss(output: object, target: object, kind: str, options: dict, features: bool) -> torch.Tensor:
    if not features:
        return _loss(_first(output), target, kind, options["temperature"])
    (outputs, values), (logits, *wanted) = output, target
    return (_loss(_first(outputs), logits, kind, options["temperature"])
            + options["feature_weight"] * feature_loss(values, wanted))


class _TeacherViews:
    """The teacher with feature outputs, as one tuple: its first output, then each point's sliced value."""

    def __init__(self, teacher: fx.GraphModule, points: list[FeaturePoint]):
        self.teacher, self.points = teacher, points

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs, values = self.teacher(*inputs)
        return (_first(outputs), *(point.teacher_view(value) for point, value in zip(self.points, values,
                                                                                       strict=True)))


def _first(output: object) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _progress(started: float, steps: int, options: dict, limit: float) -> float:
    """How far through its budget the training is, in [0, 1]: by steps when ``max_steps`` is set, else by time.

    A step budget makes the schedule, hence a seeded run, reproducible: mixing in the clock made the
    learning rate of every step depend on how fast the machine was (two seeded runs differed).
    """
    if math.isfinite(limit):
        return min(1.0, steps / limit)
    return min(1.0, (time.perf_counter() - started) / options["seconds"]) if options["seconds"] else 0.0


def _cosine(optimiser: torch.optim.Optimizer, peak: float, progress: float) -> None:
    for group in optimiser.param_groups:
        group["lr"] = peak * 0.5 * (1 + math.cos(math.pi * progress))


def _samples(data) -> tuple[torch.Tensor, ...]:
    """All samples of validated batches, concatenated along the batch dimension."""
    if data is None:
        raise PassError("pass 'recover' needs data: pass train_data (or calibration_data) to compile()")
    batches = list(data)
    return tuple(_channels_last(torch.cat([batch[index] for batch in batches])) for index in range(len(batches[0])))


def _channels_last(tensor: torch.Tensor) -> torch.Tensor:
    """4-D float tensors in channels-last order: CPU convolutions train about 25% faster so (measured)."""
    if tensor.dim() == 4 and tensor.is_floating_point():
        return tensor.contiguous(memory_format=torch.channels_last)
    return tensor


def _split(samples: tuple[torch.Tensor, ...]) -> tuple[tuple, tuple]:
    count = samples[0].shape[0]
    held = max(8, count // 10) if count >= 80 else 0
    return tuple(t[: count - held] for t in samples), tuple(t[count - held:] for t in samples)


def mirror_dims(samples: tuple[torch.Tensor, ...], augment: str) -> tuple[tuple[int | None, ...] | None, str]:
    """Which dimension of each input to mirror (None: leave it), and what the ledger says of it.

    ``"auto"`` and ``"mirror"`` mirror image inputs left to right: 4-D float tensors with 1, 3 or 4
    channels in the second dimension (NCHW, the width mirrored) or else in the last (NHWC). Mirrored
    natural images are natural images: on EfficientNet-Lite0 at -30% MACs, 180 s of recovery on
    2048 crops and their mirror images left 81.0% agreement on held-out crops against 79.0% on the
    crops alone (``python -m bench.prune_peers --train 2048``, with ``--recover '{"augment": "none"}'``).
    ``"mirror"`` refuses data without an image input; ``"auto"`` then trains on the samples as they are.
    """
    if augment == "none":
        return None, "none"
    dims = tuple(_width_dim(tensor) for tensor in samples)
    if all(dim is None for dim in dims):
        if augment == "mirror":
            raise PassError("pass 'recover': augment='mirror' needs an image input (a 4-D float tensor with 1, 3 or "
                            "4 channels, NCHW or NHWC); the data has shapes "
                            f"{[tuple(tensor.shape[1:]) for tensor in samples]}; use augment='none'")
        return None, "none (no image input)"
    return dims, "mirror"


def _width_dim(tensor: torch.Tensor) -> int | None:
    if tensor.dim() != 4 or not tensor.is_floating_point():
        return None
    if tensor.shape[1] in _IMAGE_CHANNELS and tensor.shape[3] not in _IMAGE_CHANNELS:
        return 3
    if tensor.shape[3] in _IMAGE_CHANNELS and tensor.shape[1] not in _IMAGE_CHANNELS:
        return 2
    return None


class Views:
    """The training samples, then (with ``mirror``) their mirror images: index ``i + count`` mirrors sample ``i``."""

    def __init__(self, samples: tuple[torch.Tensor, ...], mirror: tuple[int | None, ...] | None = None):
        self.samples, self.mirror = samples, mirror
        self.originals = _count(samples)
        self.count = self.originals * (2 if mirror else 1)

    def __getitem__(self, index: torch.Tensor) -> tuple[torch.Tensor, ...]:
        batch = tuple(tensor[index % self.originals] for tensor in self.samples)
        if not self.mirror:
            return batch
        mirrored = index >= self.originals
        return tuple(tensor if dim is None else torch.where(mirrored.view(-1, 1, 1, 1), tensor.flip(dim), tensor)
                     for tensor, dim in zip(batch, self.mirror, strict=True))

    def lengths(self, padding: Padding) -> torch.Tensor:
        """Each view's real length: its sample's."""
        return padding.lengths(self.samples).repeat(self.count // self.originals)


def _count(samples: tuple[torch.Tensor, ...]) -> int:
    return int(samples[0].shape[0]) if samples else 0


def _batches(count: int, size: int, generator: torch.Generator, lengths: torch.Tensor | None = None):
    """Indices of one epoch over ``count`` samples in a seeded order, ``size`` at a time.

    With ``lengths``, each pool of ``_POOL`` batches is sorted by length before it is cut into
    batches, and the batches are shuffled: samples of similar length share a batch, so cutting
    the batch to its longest sample leaves little padding.
    """
    order = torch.randperm(count, generator=generator)
    if lengths is None:
        yield from (order[start:start + size] for start in range(0, len(order), size))
        return
    batches = []
    for start in range(0, len(order), size * _POOL):
        pool = order[start:start + size * _POOL]
        pool = pool[torch.argsort(lengths[pool], stable=True)]
        batches.extend(pool[offset:offset + size] for offset in range(0, len(pool), size))
    yield from (batches[i] for i in torch.randperm(len(batches), generator=generator).tolist())


def _cut(batch: tuple[torch.Tensor, ...], padding: Padding | None) -> tuple[torch.Tensor, ...]:
    return batch if padding is None else padding.trim(batch)


class _TeacherCache:
    """The teacher's output per training sample, computed the first time a sample is drawn.

    Its first output, or with ``_TeacherViews`` the whole tuple (first output, then feature values).
    With ``padding``, the teacher runs on the drawn samples cut to their longest, and values with a
    token dimension (found by running it at two lengths) are stored at the full length with padded
    positions zeroed, and handed out cut to the batch's longest sample, as the student sees it;
    :meth:`masked` zeroes the student's padded positions alike, so the loss reads real tokens only.
    """

    def __init__(self, teacher, samples: Views, padding: Padding | None = None):
        self.teacher, self.samples, self.padding = teacher, samples, padding
        self.whole = isinstance(teacher, _TeacherViews)
        self.values: list[torch.Tensor] = []
        self.known = torch.zeros(self.samples.count, dtype=torch.bool)
        self.tokens = self._token_outputs() if padding is not None else []
        self.lengths = self.samples.lengths(padding) if padding is not None else None

    def outputs(self, index: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        missing = index[~self.known[index]]
        if len(missing):
            inputs = _cut(self.samples[missing], self.padding)
            with torch.no_grad():
                fresh = self._run(inputs)
            if not self.values:
                self.values = [value.new_zeros((self.known.shape[0], *self._sample_shape(value, token)))
                               for value, token in zip(fresh, self._tokens(fresh), strict=True)]
            valid = self.padding.valid(inputs) if self.padding else None
            for store, value, token in zip(self.values, fresh, self._tokens(fresh), strict=True):
                if token:
                    store[missing, :value.shape[1]] = _zero_padding(value, valid)
                else:
                    store[missing] = value
            self.known[missing] = True
        length = int(self.lengths[index].max()) if self.lengths is not None else None
        taken = tuple(store[index, :length] if token else store[index]
                      for store, token in zip(self.values, self._tokens(self.values), strict=True))
        return taken if self.whole else taken[0]

    def masked(self, output: object, batch: tuple[torch.Tensor, ...], features: bool) -> object:
        """The student's ``output`` on ``batch`` with the padded positions of its token outputs zeroed."""
        if not any(self.tokens):
            return output
        valid = self.padding.valid(batch)
        if not features:
            return _zero_padding(_first(output), valid) if self.tokens[0] else output
        outputs, values = output
        first = _zero_padding(_first(outputs), valid) if self.tokens[0] else _first(outputs)
        return first, [_zero_padding(value, valid) if token else value
                       for value, token in zip(values, self.tokens[1:], strict=True)]

    def _run(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        fresh = self.teacher(*inputs)
        return fresh if self.whole else (_first(fresh),)

    def _token_outputs(self) -> list[bool]:
        """Which outputs have a token dimension (dimension 1): those whose size follows the input's length."""
        one = self.samples[torch.zeros(1, dtype=torch.long)]
        full = self.padding.length
        with torch.no_grad():
            long, short = self._run(self.padding.trim(one, full)), self._run(self.padding.trim(one, full - 1))
        return [value.dim() >= 2 and value.shape[1] == full and other.shape[1] == full - 1
                for value, other in zip(long, short, strict=True)]

    def _tokens(self, values) -> list[bool]:
        return self.tokens or [False] * len(values)

    def _sample_shape(self, value: torch.Tensor, token: bool) -> tuple[int, ...]:
        """One sample's stored shape: a token output at the full padded length."""
        return (self.padding.length, *value.shape[2:]) if token else tuple(value.shape[1:])


def _zero_padding(value: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``value`` (batch, length, ...) with the positions ``valid`` marks False set to zero."""
    return value * valid.reshape(*valid.shape, *[1] * (value.dim() - 2)).to(value.dtype)


def _kind(teacher, samples) -> str:
    """``"cosine"`` for unit-norm output rows (sentence embeddings), ``"kl"`` otherwise."""
    with torch.no_grad():
        output = _first(teacher(*(tensor[:8] for tensor in samples)))
    rows = output.reshape(output.shape[0], -1).norm(dim=1)
    return "cosine" if torch.allclose(rows, torch.ones_like(rows), atol=1e-3) else "kl"


def _loss(student: torch.Tensor, teacher: torch.Tensor, kind: str, temperature: float) -> torch.Tensor:
    if kind == "cosine":
        return (1 - F.cosine_similarity(student.flatten(1), teacher.flatten(1), dim=1)).mean()
    soft_teacher = F.log_softmax(teacher / temperature, dim=-1)
    soft_student = F.log_softmax(student / temperature, dim=-1)
    return F.kl_div(soft_student, soft_teacher, log_target=True, reduction="batchmean") * temperature ** 2


def _quality(gm, teacher, samples, kind: str) -> float | None:
    """Held-out agreement of the top class (kl) or mean cosine (cosine) with the teacher."""
    if not _count(samples):
        return None
    with torch.no_grad():
        student, target = _first(gm(*samples)), _first(teacher(*samples))
    if kind == "cosine":
        return round(float(F.cosine_similarity(student.flatten(1), target.flatten(1), dim=1).mean()), 4)
    return round(float((student.argmax(-1) == target.argmax(-1)).double().mean()), 4)


def _trainable(gm: fx.GraphModule) -> list[str]:
    """Weights and biases of convs and linears, made trainable parameters; their attribute names."""
    names = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and ir.op_name(node) in _WEIGHTED:
            for argument in node.args[1:3]:
                if isinstance(argument, fx.Node) and argument.op == "get_attr" and argument.target not in names:
                    if ir.get_attribute(gm, argument.target).is_floating_point():
                        names.append(argument.target)
    for name in names:
        tensor = _channels_last(ir.get_attribute(gm, name).detach().clone())
        owner_path, _, attribute = name.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        owner._buffers.pop(attribute, None)
        owner._parameters[attribute] = torch.nn.Parameter(tensor, requires_grad=True)
    return names


def _freeze(gm: fx.GraphModule, names: list[str]) -> None:
    for name in names:
        ir.set_attribute(gm, name, ir.get_attribute(gm, name).detach().contiguous())


def _curve(losses: list[float]) -> list[float]:
    """About ten points of the loss, each the mean of its stretch of steps."""
    if not losses:
        return []
    size = max(1, len(losses) // _CURVE_POINTS)
    return [round(sum(losses[i:i + size]) / len(losses[i:i + size]), 5) for i in range(0, len(losses), size)]
