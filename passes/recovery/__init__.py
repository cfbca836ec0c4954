"""Recovery: distillation of the optimised IR towards the model before the lossy passes (``recover``)."""
