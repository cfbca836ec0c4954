"""Calibration data: every accepted form gives re-iterable, validated batches; every bad input gives a
one-line CalibrationDataError that names the batch and the input."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from compiler.errors import CalibrationDataError
from passes.quant.calibration_data import CalibrationBatches, validate_calibration_data

IMAGE = (torch.randn(2, 3, 8, 8),)
IMAGE_DIMS = {0: {0: ("batch", 1, None)}}
TOKEN_DIMS = {index: {0: ("batch", 1, None), 1: ("sequence", 1, 64)} for index in range(2)}


def _tokens(batch: int = 2, sequence: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randint(0, 100, (batch, sequence)), torch.ones(batch, sequence, dtype=torch.int64)


def _image(batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, 3, 8, 8)


def validate_image(data, **options) -> CalibrationBatches:
    return validate_calibration_data(data, IMAGE, ("x",), IMAGE_DIMS, **options)


def validate_tokens(data, **options) -> CalibrationBatches:
    return validate_calibration_data(data, _tokens(), ("ids", "mask"), TOKEN_DIMS, **options)


def _shapes(batches: CalibrationBatches) -> list[tuple[tuple[int, ...], ...]]:
    return [tuple(tuple(tensor.shape) for tensor in batch) for batch in batches]


# --- accepted forms ------------------------------------------------------------------------------


def test_a_tensor_is_one_batch():
    batches = validate_image(_image(4))
    assert _shapes(batches) == [((4, 3, 8, 8),)] and batches.samples == 4 and len(batches) == 1
    assert not batches.materialised and not batches.streamed and batches.warnings == ()


def test_a_list_of_tensors_is_a_list_of_batches_for_a_one_input_model():
    batches = validate_image([_image(4), _image(1), _image(3)])
    assert _shapes(batches) == [((4, 3, 8, 8),), ((1, 3, 8, 8),), ((3, 3, 8, 8),)]
    assert batches.samples == 8
    assert _shapes(validate_image((_image(2),))) == [((2, 3, 8, 8),)]  # (x,) reads the same either way


def test_a_tuple_of_tensors_is_one_batch_for_a_multi_input_model():
    ids, mask = _tokens(3, 10)
    batches = validate_tokens((ids, mask))
    assert len(batches) == 1 and batches[0][0] is ids and batches[0][1] is mask


def test_dict_batches_with_the_right_keys_are_ordered_like_the_inputs():
    ids, mask = _tokens(2, 16)
    batches = validate_tokens([{"mask": mask, "ids": ids}, {"ids": ids, "mask": mask}])
    assert all(batch[0] is ids and batch[1] is mask for batch in batches)
    assert _shapes(validate_tokens({"ids": ids, "mask": mask})) == [((2, 16), (2, 16))]


def test_variable_batch_and_sequence_lengths_are_accepted_for_dynamic_dimensions():
    data = [dict(zip(("ids", "mask"), _tokens(batch, sequence), strict=True))
            for batch, sequence in ((1, 5), (4, 64), (2, 33))]
    batches = validate_tokens(data)
    assert _shapes(batches) == [((1, 5), (1, 5)), ((4, 64), (4, 64)), ((2, 33), (2, 33))]
    assert batches.samples == 7


def test_a_generator_is_materialised_once_and_can_be_iterated_again():
    source = (_image(2) for _ in range(3))
    batches = validate_image(source)
    with pytest.raises(StopIteration):
        next(source)  # validation exhausted the generator
    first, second = list(batches), list(batches)
    assert len(first) == len(second) == len(batches) == 3
    assert all(a[0] is b[0] for a, b in zip(first, second, strict=True))
    assert batches.materialised and not batches.streamed and batches.origin == "generator"
    assert "read once, held in memory" in batches.summary()


def test_a_data_loader_is_read_again_on_every_pass_not_held():
    loader = DataLoader(TensorDataset(torch.randn(10, 3, 8, 8)), batch_size=4)
    batches = validate_image(loader)
    assert batches.streamed and not batches.materialised and batches.origin == "DataLoader"
    assert len(batches) == 3 and batches.samples == 10
    assert [batch[0].shape[0] for batch in batches] == [4, 4, 2]
    assert [batch[0].shape[0] for batch in batches] == [4, 4, 2]
    assert batches[-1][0].shape[0] == 2 and batches[1][0].shape[0] == 4
    with pytest.raises(IndexError):
        batches[3]


def test_a_source_that_changes_between_passes_is_refused_when_read_again():
    class Shrinking:
        def __init__(self):
            self.passes = 0

        def __iter__(self):
            self.passes += 1
            return iter([_image(2)] * (4 - self.passes))

    batches = validate_image(Shrinking())
    with pytest.raises(CalibrationDataError, match="yielded 2 batch.* when read again but 3 when validated"):
        list(batches)


def test_a_bad_batch_met_again_while_streaming_names_its_batch():
    class Flaky:
        def __init__(self):
            self.passes = 0

        def __iter__(self):
            self.passes += 1
            return iter([_image(2), _image(2) if self.passes == 1 else torch.full((2, 3, 8, 8), float("nan"))])

    batches = validate_image(Flaky())
    with pytest.raises(CalibrationDataError, match="calibration batch 1, input 'x': holds 384 NaN"):
        list(batches)


def test_samples_are_counted_along_dimension_zero_across_batches():
    data = [_image(2), _image(3), _image(1)]
    assert validate_image(data, min_samples=6).samples == 6
    with pytest.raises(CalibrationDataError) as error:
        validate_image(data, min_samples=7)
    assert str(error.value) == (
        "calibration data holds 6 sample(s) in 3 batch(es); at least 7 are needed: give more data or lower min_samples"
    )


def test_constant_inputs_are_allowed_and_reported():
    batches = validate_image([torch.full((2, 3, 8, 8), 0.5), torch.full((1, 3, 8, 8), 0.5)])
    assert len(batches) == 2
    assert batches.warnings == (
        "input 'x' is constant (every value is 0.5) in all 2 calibration batch(es); "
        "its observers will widen the zero range",
    )
    assert validate_image([torch.full((2, 3, 8, 8), 0.5), _image(1)]).warnings == ()


def test_tensors_are_not_copied_and_are_detached_from_autograd():
    image = _image(2)
    assert validate_image([image])[0][0] is image
    trained = _image(2).requires_grad_()
    validated = validate_image(trained)[0][0]
    assert not validated.requires_grad and validated.data_ptr() == trained.data_ptr()


def test_a_dtype_of_the_right_kind_is_converted_and_reported():
    batches = validate_image(torch.randn(2, 3, 8, 8, dtype=torch.float64))
    assert batches[0][0].dtype == torch.float32
    assert batches.warnings == (
        "input 'x': calibration data of dtype torch.float64 is converted to torch.float32, the example input's dtype",
    )
    ids, mask = _tokens()
    tokens = validate_tokens((ids.int(), mask))
    assert tokens[0][0].dtype == torch.int64 and torch.equal(tokens[0][0], ids)


# --- refused inputs --------------------------------------------------------------------------------


def _good_then(bad):
    """Two good batches, then ``bad``: the error must name batch 2."""
    return [_image(2), _image(3), bad]


BAD_IMAGES = {
    "wrong rank": (_good_then(torch.randn(2, 3, 8)),
                   "calibration batch 2, input 'x': has rank 3 (shape (2, 3, 8)); expected rank 4 like the example "
                   "input (2, 3, 8, 8)"),
    "wrong static size (a varying height)": (
        _good_then(torch.randn(2, 3, 9, 8)),
        "calibration batch 2, input 'x': dimension 2 has size 9 but is static: it must be 8 like the example input "
        "(2, 3, 8, 8) (dynamic dimensions: 0 ('batch'))"),
    "integer data for a float input": (
        _good_then(torch.randint(0, 255, (2, 3, 8, 8), dtype=torch.uint8)),
        "calibration batch 2, input 'x': has dtype torch.uint8; expected a floating-point tensor (torch.float32, "
        "like the example input)"),
    "not on the CPU": (_good_then(torch.empty(2, 3, 8, 8, device="meta")),
                       "calibration batch 2, input 'x': is on meta; calibration runs on the CPU: move it with .cpu()"),
    "NaN": (_good_then(torch.randn(2, 3, 8, 8).index_fill_(0, torch.tensor([1]), float("nan"))),
            "calibration batch 2, input 'x': holds 192 NaN and 0 Inf value(s); remove or replace them"),
    "Inf": (_good_then(torch.randn(2, 3, 8, 8).index_fill_(1, torch.tensor([0]), float("-inf"))),
            "calibration batch 2, input 'x': holds 0 NaN and 128 Inf value(s); remove or replace them"),
    "zero-size batch": (_good_then(torch.randn(0, 3, 8, 8)),
                        "calibration batch 2, input 'x': is empty (shape (0, 3, 8, 8)); every batch needs values"),
    "not a tensor": (_good_then("image.png"), "calibration batch 2, input 'x': is a str, not a tensor"),
    "a numpy array": (_good_then(np.zeros((2, 3, 8, 8), dtype=np.float32)),
                      "calibration batch 2, input 'x': is a ndarray, not a tensor; convert it with torch.as_tensor"),
    "a label with the data": ([(_image(2), torch.tensor([0, 1]))],
                              "calibration batch 0: has 2 value(s); the model has 1 input(s) ('x'): give one tensor "
                              "per input"),
    "extra dict key": ([{"x": _image(2), "label": torch.tensor([1, 0])}],
                       "calibration batch 0: unexpected key(s) 'label'; expected the keys 'x'"),
    "float64 beyond float16": (
        torch.full((1, 3, 8, 8), 1e6, dtype=torch.float64),
        "calibration batch 0, input 'x': has values beyond the largest torch.float16, 65504: it cannot be converted"),
    "empty list": ([], "calibration data (list) is empty: it yielded no batch; give at least one"),
    "empty generator": ((batch for batch in []), "calibration data (generator) is empty: it yielded no batch"),
    "None": (None, "calibration data is None; give a tensor, a tuple or dict of tensors, or an iterable of them"),
    "a number": (3.0, "calibration data of type float is neither a tensor, a tuple, a dict nor an iterable"),
    "a numpy array at the top": (np.zeros((2, 3, 8, 8)), "calibration data is of type ndarray; give a tensor"),
}


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_bad_image_data_is_refused_naming_the_batch_and_input(case):
    data, message = BAD_IMAGES[case]
    example = (torch.randn(2, 3, 8, 8, dtype=torch.float16),) if "float16" in case else IMAGE
    with pytest.raises(CalibrationDataError) as error:
        validate_calibration_data(data, example, ("x",), IMAGE_DIMS)
    assert str(error.value).startswith(message)
    assert "\n" not in str(error.value)
    assert error.value.exit_code == 5


BAD_TOKENS = {
    "missing key": ([{"ids": _tokens()[0]}],
                    "calibration batch 0: missing key(s) 'mask'; expected the keys 'ids', 'mask'"),
    "missing and extra keys": (
        [dict(zip(("ids", "mask"), _tokens(), strict=True)), {"ids": _tokens()[0], "labels": 1, "token_type": 2}],
        "calibration batch 1: missing key(s) 'mask'; unexpected key(s) 'labels', 'token_type'; expected the keys "
        "'ids', 'mask'"),
    "a lone tensor for two inputs": (
        _tokens()[0], "calibration batch 0: is a single Tensor; the model has 2 inputs ('ids', 'mask'): give a tuple, "
                      "or a dict keyed by input name"),
    "too few tensors": ([(_tokens()[0],)], "calibration batch 0: has 1 value(s); the model has 2 input(s)"),
    "sequence beyond its maximum": (
        [_tokens(2, 16), _tokens(2, 65)],
        "calibration batch 1, input 'ids': dimension 1 ('sequence') has size 65, outside its range 1..64"),
    "inputs disagree on the sequence length": (
        [(_tokens(2, 16)[0], _tokens(2, 17)[1])],
        "calibration batch 0, input 'mask': dimension 1 ('sequence') has size 17 but 16 in input 'ids'; inputs "
        "sharing it must agree"),
    "inputs disagree on the batch size": (
        [(_tokens(2, 16)[0], _tokens(3, 16)[1])],
        "calibration batch 0, input 'mask': dimension 0 ('batch') has size 3 but 2 in input 'ids'"),
    "float data for an integer input": (
        [(torch.randn(2, 16), _tokens()[1])],
        "calibration batch 0, input 'ids': has dtype torch.float32; expected an integer tensor (torch.int64"),
    "boolean mask for an integer input": (
        [(_tokens()[0], torch.ones(2, 16, dtype=torch.bool))],
        "calibration batch 0, input 'mask': has dtype torch.bool; expected an integer tensor (torch.int64"),
}


@pytest.mark.parametrize("case", sorted(BAD_TOKENS))
def test_bad_token_data_is_refused_naming_the_batch_and_input(case):
    data, message = BAD_TOKENS[case]
    with pytest.raises(CalibrationDataError) as error:
        validate_tokens(data)
    assert str(error.value).startswith(message)
    assert "\n" not in str(error.value)


def test_integers_that_do_not_fit_the_example_dtype_are_refused():
    example = (torch.zeros(2, 4, dtype=torch.int32),)
    with pytest.raises(CalibrationDataError, match="batch 0, input 'ids': has values that do not fit torch.int32"):
        validate_calibration_data(torch.full((2, 4), 2**40), example, ("ids",), {0: {0: ("batch", 1, None)}})


def test_a_static_sequence_length_is_refused_when_it_varies():
    static = {index: {0: ("batch", 1, None)} for index in range(2)}
    data = [_tokens(2, 16), _tokens(2, 20)]
    with pytest.raises(CalibrationDataError, match="calibration batch 1, input 'ids': dimension 1 has size 20 but is "
                                                   r"static: it must be 16 .* \(dynamic dimensions: 0 \('batch'\)\)"):
        validate_calibration_data(data, _tokens(), ("ids", "mask"), static)


def test_a_dynamic_dimension_below_its_minimum_is_refused():
    dims = {0: {0: ("batch", 2, 8)}}
    with pytest.raises(CalibrationDataError, match="batch 0, input 'x': dimension 0 \\('batch'\\) has size 1, "
                                                   "outside its range 2..8"):
        validate_calibration_data(_image(1), IMAGE, ("x",), dims)


def test_programming_errors_are_value_errors_not_calibration_errors():
    with pytest.raises(ValueError, match="min_samples must be at least 1"):
        validate_image(_image(), min_samples=0)
    with pytest.raises(ValueError, match="2 input names for 1 example inputs"):
        validate_calibration_data(_image(), IMAGE, ("x", "y"), IMAGE_DIMS)


class _Fresh:
    """A re-iterable source making new batches on every pass, remembering weak references to them."""

    def __init__(self, count: int):
        self.count, self.made, self.most_alive = count, [], 0

    def __iter__(self):
        for index in range(self.count):
            gc.collect()
            self.most_alive = max(self.most_alive, sum(ref() is not None for ref in self.made))
            batch = torch.full((4, 3, 8, 8), float(index))
            self.made.append(weakref.ref(batch))
            yield batch


def test_validating_a_re_iterable_source_holds_at_most_one_batch_at_a_time():
    source = _Fresh(6)
    batches = validate_image(source)
    assert source.most_alive <= 1, f"{source.most_alive} earlier batches alive while validating"
    gc.collect()
    assert all(ref() is None for ref in source.made), "validation kept batches alive"
    assert [float(batch[0].max()) for batch in batches] == [float(index) for index in range(6)]
