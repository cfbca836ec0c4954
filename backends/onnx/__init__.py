"""What every ONNX-producing backend shares: IR export, provenance, quantisation-op translations, checks, weights.

Imports the core only (``compiler``); backends import it. It knows ONNX, not any runtime.
"""
