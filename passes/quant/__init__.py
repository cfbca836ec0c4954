"""Int8 quantisation: calibration (validated calibration data, streaming observers).

- ``calibration_data``: turns whatever the user gave (a tensor, a tuple, a dict, a list, a
  generator, a DataLoader) into validated batches ordered like the example inputs, or raises a
  ``CalibrationDataError`` that names the batch, the input and the problem.
- ``histogram``: a streaming histogram with a fixed number of bins (memory O(bins)).
- ``clipping``: clipping-range searches over a histogram (percentile, KL divergence, MSE).
- ``observers``: per-tensor observers built on those (MinMax, Percentile, Entropy, MSE) and a
  per-channel MinMax observer for weights, with ``make_observer`` to build one by name.
"""
