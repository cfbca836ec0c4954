"""TensorRT-style explicit-QDQ ONNX: placement policy, lowering, calibration cache and placement linter."""
