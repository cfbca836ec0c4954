"""recover: distillation towards the captured model, seeded, bounded, reported; and the public
``compile(..., prune=..., train_data=..., recover_seconds=...)`` surface that schedules it."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

import models
from compiler import TARGETS, CalibrationDataError, PassSpec, TargetError, compile
from compiler.cli import main
from compiler.errors import PassError
from compiler.pipeline import run_pipeline
from compiler.sequences import find_padding
from passes.recovery.recover import Recover, Views, _batches, _kind, _TeacherCache, distil, mirror_dims


@pytest.fixture(scope="module")
def digits():
    return models.load("digits-cnn")


def recovering_target(**recover):
    base = TARGETS["cpu-fp32"]
    cut = PassSpec("prune_channels", {"macs": 0.5, "importance": "l1", "reconstruct": False})
    extra = (cut, PassSpec("eliminate_dead_code"), PassSpec("recover", recover))
    return dataclasses.replace(base, name="pruned-recovered", pipeline=(*base.pipeline, *extra))


def accuracy(logits, labels) -> float:
    return float((logits.argmax(1) == labels).double().mean())


def test_recovery_wins_back_accuracy_and_is_reproducible(digits):
    data = [digits.calibration_data(512)]
    target = recovering_target(seconds=600, max_steps=150)
    first = run_pipeline(digits.model, target, digits.example_inputs, calibration_data=data)
    second = run_pipeline(digits.model, target, digits.example_inputs, calibration_data=data)
    stats = first.ledger.entry("recover").stats
    assert stats["steps"] == 150 and stats["loss"] == "kl" and stats["tensors_trained"] == 6
    assert stats["loss_curve"][-1] < stats["loss_curve"][0] * 0.75
    assert stats["samples"] == {"train": 461, "held_out": 51}
    images, labels = digits.eval_data(540)[0], digits.eval_labels(540)
    unrecovered = run_pipeline(digits.model, recovering_target(seconds=0), digits.example_inputs,
                               calibration_data=data).graph_module
    with torch.no_grad():
        before = accuracy(unrecovered(images)[0], labels)
        after = accuracy(first.graph_module(images)[0], labels)
        assert torch.equal(first.graph_module(images)[0], second.graph_module(images)[0])  # seeded
    assert after > before + 0.01, (before, after)


def test_image_data_is_drawn_as_it_is_and_mirrored(digits):
    result = run_pipeline(digits.model, recovering_target(seconds=600, max_steps=5), digits.example_inputs,
                          calibration_data=[digits.calibration_data(128)])
    assert result.ledger.entry("recover").stats["augment"] == "mirror"
    unmirrored = run_pipeline(digits.model, recovering_target(seconds=600, max_steps=5, augment="none"),
                              digits.example_inputs, calibration_data=[digits.calibration_data(128)])
    assert unmirrored.ledger.entry("recover").stats["augment"] == "none"


@pytest.mark.parametrize(("shape", "dims"), [
    ((4, 3, 9, 7), (3,)),  # NCHW: the width is the last dimension
    ((4, 9, 7, 3), (2,)),  # NHWC
    ((4, 1, 8, 8), (3,)),
    ((4, 5, 9, 7), None),  # five channels: not an image the rule recognises
    ((4, 16), None),
])
def test_mirroring_finds_the_width_of_image_inputs(shape, dims):
    mirror, said = mirror_dims((torch.rand(shape),), "auto")
    assert mirror == (None if dims is None else dims)
    assert said == ("mirror" if dims else "none (no image input)")


def test_asking_to_mirror_data_without_images_is_a_pass_error():
    with pytest.raises(PassError, match="augment='mirror' needs an image input.*augment='none'"):
        mirror_dims((torch.randint(0, 9, (4, 12)), torch.ones(4, 12)), "mirror")
    assert mirror_dims((torch.rand(4, 3, 8, 8),), "none") == (None, "none")


def test_an_unknown_augmentation_is_a_pass_error(digits):
    with pytest.raises(PassError, match="augment must be one of auto, mirror, none, got 'flip'"):
        run_pipeline(digits.model, recovering_target(augment="flip"), digits.example_inputs,
                     calibration_data=[digits.calibration_data(64)])


def test_a_view_past_the_count_is_its_sample_mirrored_and_the_teacher_sees_it_so():
    images, extra = torch.rand(5, 3, 4, 6), torch.arange(5.0)
    views = Views((images, extra), (3, None))
    assert views.count == 10
    index = torch.tensor([1, 6, 9])
    batch = views[index]
    torch.testing.assert_close(batch[0][0], images[1])
    torch.testing.assert_close(batch[0][1], images[1].flip(-1))
    torch.testing.assert_close(batch[0][2], images[4].flip(-1))
    assert batch[1].tolist() == [1.0, 1.0, 4.0]  # only the image input is mirrored
    teacher = nn.Conv2d(3, 2, 3)
    with torch.no_grad():
        torch.testing.assert_close(_TeacherCache(lambda x, _: teacher(x), views).outputs(index), teacher(batch[0]))


def test_compile_hands_recovery_options_to_the_pass(digits):
    compiled = compile(digits.model, "cpu-fp32", digits.example_inputs, calibration_data=[digits.calibration_data(96)],
                       prune={"macs": 0.3, "importance": "l1", "reconstruct": False}, recover_seconds=60,
                       recover={"augment": "none", "max_steps": 3})
    stats = compiled.report.entry("recover").stats
    assert stats["augment"] == "none" and stats["steps"] == 3


def test_compile_knows_every_recovery_option_but_the_budget():
    from compiler.pruning_options import _RECOVER_OPTIONS
    assert set(_RECOVER_OPTIONS) == set(Recover.default_options) - {"seconds"}


@pytest.mark.parametrize(("recover", "prune", "message"), [
    ({"flip": True}, {"macs": 0.3}, "recover has no key.*flip.*keys: augment"),
    ({"seconds": 5}, {"macs": 0.3}, "the budget is recover_seconds="),
    ("none", {"macs": 0.3}, "recover must be a dict"),
    ({"augment": "none"}, None, "recover options apply to the recovery after prune= or low_rank="),
])
def test_bad_recovery_options_are_target_errors(digits, recover, prune, message):
    with pytest.raises(TargetError, match=message):
        compile(digits.model, "cpu-fp32", digits.example_inputs, prune=prune, recover=recover)


def test_distillation_trains_on_every_image_and_its_mirror_image():
    torch.manual_seed(0)
    images = torch.rand(8, 3, 6, 5)
    teacher, student = nn.Conv2d(3, 2, 3), nn.Conv2d(3, 2, 3)
    seen = []

    def recording(x):
        seen.append(x.detach().clone())
        return student(x).flatten(1)

    options = {**Recover.default_options, "max_steps": 1, "batch_size": 16}
    distil(recording, lambda x: teacher(x).flatten(1), (images,), list(student.parameters()), "kl", options,
           mirror=(3,))
    drawn = {tuple(image.flatten().tolist()) for image in seen[0]}
    assert drawn == {tuple(image.flatten().tolist()) for image in torch.cat([images, images.flip(-1)])}


def test_no_budget_leaves_the_graph_alone(digits):
    result = run_pipeline(digits.model, recovering_target(seconds=0), digits.example_inputs,
                          calibration_data=[digits.calibration_data(64)])
    entry = result.ledger.entry("recover")
    assert entry.modified is False and entry.stats == {"steps": 0, "reason": "no budget"}


def test_compile_prunes_recovers_and_lowers(digits):
    compiled = compile(digits.model, "cpu-fp32", digits.example_inputs, prune={"macs": 0.5},
                       train_data=[digits.calibration_data(256)], recover_seconds=2)
    names = [entry.name for entry in compiled.report.entries]
    assert names[-3:] == ["prune_channels", "eliminate_dead_code", "recover"]
    assert compiled.report.capture["train_data"].startswith("1 batch(es), 256 sample(s)")
    images = digits.eval_data(8)[0]
    with torch.no_grad():
        expected = compiled.graph_module(images)[0]
    torch.testing.assert_close(compiled(images), expected, rtol=1e-3, atol=1e-4)


def test_compile_without_recovery_schedules_none(digits):
    compiled = compile(digits.model, "cpu-fp32", digits.example_inputs, recover_seconds=0,
                       prune={"macs": 0.3, "importance": "l1", "reconstruct": False})
    assert [entry.name for entry in compiled.report.entries][-2:] == ["prune_channels", "eliminate_dead_code"]


def test_recovery_without_data_says_what_to_give(digits):
    with pytest.raises(CalibrationDataError, match="needs calibration_data"):
        compile(digits.model, "cpu-fp32", digits.example_inputs, prune={"macs": 0.3}, recover_seconds=5)


def test_data_aware_pruning_without_data_names_the_pass_that_reads_it(digits):
    with pytest.raises(CalibrationDataError, match=r"needs calibration_data \(read by prune_channels\)"):
        compile(digits.model, "cpu-fp32", digits.example_inputs, prune={"macs": 0.3}, recover_seconds=0)


@pytest.mark.parametrize(("prune", "seconds", "message"), [
    ({"latency": 0.7, "macs": 0.3}, 0, "prune needs one budget"),
    ({"colour": 1}, 0, "prune has no key"),
    ({"round_to": 8}, 0, "prune needs one budget"),
    ([0.3], 0, "prune must be a dict"),
    ({"macs": 0.3}, -1, "recover_seconds must be a number >= 0"),
])
def test_bad_pruning_arguments_are_target_errors(digits, prune, seconds, message):
    with pytest.raises(TargetError, match=message):
        compile(digits.model, "cpu-fp32", digits.example_inputs, prune=prune, recover_seconds=seconds)


class Embedder(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(6, 4)

    def forward(self, x):
        return F.normalize(self.linear(x), dim=1)


def test_unit_norm_outputs_are_distilled_by_cosine_and_logits_by_kl():
    torch.manual_seed(0)
    samples = (torch.randn(16, 6),)
    assert _kind(lambda x: (Embedder()(x),), samples) == "cosine"
    assert _kind(lambda x: (nn.Linear(6, 4)(x),), samples) == "kl"


def test_the_command_prunes_and_recovers_a_zoo_model(tmp_path):
    result = CliRunner().invoke(main, ["compile", "digits-cnn", "-o", str(tmp_path / "out"), "--prune-macs", "0.5",
                                       "--recover-seconds", "1", "--json"])
    assert result.exit_code == 0, result.output
    passes = [entry["name"] for entry in json.loads(result.stdout)["report"]["passes"]]
    assert passes[-3:] == ["prune_channels", "eliminate_dead_code", "recover"]


def test_the_command_prunes_to_a_latency(tmp_path, monkeypatch):
    monkeypatch.setenv("FXPRESS_CACHE_DIR", str(tmp_path / "cache"))  # the layer table of this machine
    result = CliRunner().invoke(main, ["compile", "digits-cnn", "-o", str(tmp_path / "out"), "--prune-latency", "0.8",
                                       "--recover-seconds", "1", "--json"])
    assert result.exit_code == 0, result.output
    prune = next(entry for entry in json.loads(result.stdout)["report"]["passes"] if entry["name"] == "prune_channels")
    assert prune["stats"]["budget"] == {"latency": 0.8}
    assert prune["stats"]["allocation"] == "sensitivity"
    assert prune["stats"]["latency"]["attempts"]


def test_the_command_refuses_two_pruning_budgets(tmp_path):
    result = CliRunner().invoke(main, ["compile", "digits-cnn", "-o", str(tmp_path / "out"), "--prune-macs", "0.3",
                                       "--prune-latency", "0.7"])
    assert result.exit_code == 2
    assert "--prune-macs or --prune-latency, not both" in result.stderr
    assert not (tmp_path / "out").exists()


def test_the_command_switches_mirroring_off(tmp_path):
    result = CliRunner().invoke(main, ["compile", "digits-cnn", "-o", str(tmp_path / "out"), "--prune-macs", "0.5",
                                       "--recover-seconds", "1", "--recover-augment", "none", "--json"])
    assert result.exit_code == 0, result.output
    recover = next(entry for entry in json.loads(result.stdout)["report"]["passes"] if entry["name"] == "recover")
    assert recover["stats"]["augment"] == "none"


def test_the_command_asks_for_data_it_cannot_find(tmp_path):
    factory = tmp_path / "user.py"
    factory.write_text("import torch\nfrom torch import nn\n\ndef build():\n"
                       "    return nn.Sequential(nn.Conv2d(3, 32, 3), nn.ReLU(), nn.Conv2d(32, 4, 1)).eval(), "
                       "torch.randn(2, 3, 8, 8)\n")
    arguments = ["compile", f"{factory}:build", "-o", str(tmp_path / "out"), "--prune-macs", "0.3"]
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 2
    assert "recovery after pruning or factorisation needs data" in result.stderr
    assert "--recover-seconds 0" in result.stderr
    assert not (tmp_path / "out").exists()


class PaddedEncoder(nn.Module):
    """Token embedding, a linear and masked mean pooling, unit-norm rows: padding never reaches the output."""

    def __init__(self, tokens: bool = False):
        super().__init__()
        self.tokens = tokens
        self.embed, self.linear = nn.Embedding(30, 8), nn.Linear(8, 8)

    def forward(self, ids, mask):
        x = torch.relu(self.linear(self.embed(ids)))
        if self.tokens:
            return x
        weights = mask.unsqueeze(-1).to(x.dtype)
        return F.normalize((x * weights).sum(1) / weights.sum(1), dim=1)


def padded_tokens(count: int, length: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(2, length + 1, (count,), generator=generator)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    return torch.randint(1, 30, (count, length), generator=generator) * mask, mask


def test_length_sorted_batches_cover_every_sample_once_with_little_padding():
    samples = padded_tokens(200)
    lengths = samples[1].sum(1)
    batches = list(_batches(200, 8, torch.Generator().manual_seed(0), lengths))
    assert sorted(torch.cat(batches).tolist()) == list(range(200))
    padded = sum(int(lengths[index].max()) * len(index) for index in batches)
    shuffled = sum(int(lengths[index].max()) * len(index) for index in _batches(200, 8,
                                                                                torch.Generator().manual_seed(0)))
    assert padded < 0.8 * shuffled, (padded, shuffled)


@pytest.mark.parametrize("tokens", [False, True], ids=["pooled", "per-token"])
def test_the_teacher_cache_hands_out_what_the_teacher_gives_the_cut_batch(tokens):
    torch.manual_seed(0)
    teacher, samples = PaddedEncoder(tokens).eval(), padded_tokens(40)
    padding = find_padding(teacher, samples)
    assert padding is not None
    cache = _TeacherCache(teacher, Views(samples), padding)
    for index in (torch.tensor([3, 7, 9]), torch.tensor([7, 20, 3, 1])):  # cached, then partly fresh
        batch = padding.trim(tuple(tensor[index] for tensor in samples))
        with torch.no_grad():
            expected = cache.masked(teacher(*batch), batch, features=False)
        torch.testing.assert_close(cache.outputs(index), expected)
        if tokens:  # per-token values: the padded positions are zero, the real ones the teacher's
            assert cache.outputs(index)[~padding.valid(batch)].abs().max() == 0


def test_recovery_on_padded_tokens_cuts_the_padding_and_trains():
    torch.manual_seed(0)
    teacher = PaddedEncoder().eval()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student.linear.weight.mul_(0.5).add_(0.1 * torch.randn_like(student.linear.weight))
    samples = padded_tokens(256)
    padding = find_padding(teacher, samples)
    options = {**Recover.default_options, "max_steps": 60, "lr": 1e-2}
    before = float(F.cosine_similarity(student(*samples), teacher(*samples)).mean())
    seen = []  # (the batch's length, its longest sentence)

    def recording(ids, mask):
        seen.append((ids.shape[1], int(mask.sum(1).max())))
        return student(ids, mask)

    curve, steps, _ = distil(recording, teacher, samples, list(student.linear.parameters()), "cosine", options,
                             padding=padding)
    after = float(F.cosine_similarity(student(*samples), teacher(*samples)).mean())
    assert steps == 60 and curve[-1] < curve[0] and after > before, (before, after)
    assert all(length == longest for length, longest in seen)  # every batch cut to its longest sentence
    assert sum(length for length, _ in seen) < 0.8 * 16 * len(seen)  # length-sorted: well under the padded 16
