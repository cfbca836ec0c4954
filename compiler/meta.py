"""Every ``node.meta`` key fxpress reads or writes, in one place.

Passes share per-node data only through these keys, never through globals. Keys owned by
torch are listed first; fxpress keys are prefixed ``fxpress_`` so they never clash with torch's.
"""

from __future__ import annotations

# --- written by torch.export (kept up to date by passes that create nodes) ---
VAL = "val"  # FakeTensor (or SymInt) with the symbolic output shape and dtype
NN_MODULE_STACK = "nn_module_stack"  # {key: (module path, class name)}, outermost first
STACK_TRACE = "stack_trace"  # source lines of the user code that produced the node

# --- written by fxpress ---
MODULE_PATH = "fxpress_module_path"  # dotted PyTorch module path, e.g. "_blocks.3._depthwise_conv"
MODULE_TYPE = "fxpress_module_type"  # class name of that module, e.g. "Conv2d" ("" at the root)
SHAPE = "fxpress_shape"  # concrete output shape on the probe batch: tuple[int, ...], or None
DTYPE = "fxpress_dtype"  # output dtype on the probe batch, as a string such as "float32"
PARAMS = "fxpress_params"  # number of parameter elements this node reads through get_attr inputs
MACS = "fxpress_macs"  # multiply-accumulates of this node on the probe batch
FUSION_GROUP = "fxpress_fusion_group"  # name of the anchor (conv/linear) node of a fusion group
FUSION_ROLE = "fxpress_fusion_role"  # "anchor" or "activation" within that group
FUSED_ACTIVATION = "fxpress_fused_activation"  # on an anchor: the activation kind, e.g. "relu6"

# Quantisation (calibrate, insert_qdq).
FIXED_RANGE = "fxpress_fixed_range"  # on a tensor whose quantisation range is known, not calibrated: (low, high)
QUANT_RANGE = "fxpress_quant_range"  # on a tensor to quantise: {"low", "high", "observer", "min", "max"}
QUANT_PARAMS = "fxpress_quant_params"  # on a fake-quantise node: {"scale", "zero_point", "dtype", ...}
QUANT_DECISION = "fxpress_quant_decision"  # on an op kept in float by an override or analysis: the reason
QUANT_SENSITIVITY = "fxpress_quant_sensitivity"  # on an integer op: {"sqnr_db" (quantised alone), "decision"}
WEIGHT_INTEGERS = "fxpress_weight_integers"  # on a weight: {"integers", "scales", "largest", "method"} (gptq)

# Pruning (prune_channels) for recovery.
KEPT_FEATURES = "fxpress_kept_features"  # on a pruned writer: {"dim", "index"}: its features in the unpruned output
# BatchNorm folding, for BatchNorm-scale pruning importance.
BN_GAMMA = "fxpress_bn_gamma"  # on a conv/linear that absorbed a BatchNorm: its gamma, one per output channel
# on a dequantised weight or bias (and a corrected bias): the get_attr target of the float tensor it stands for
FLOAT_SOURCE = "fxpress_float_source"

ALL_KEYS = (
    VAL, NN_MODULE_STACK, STACK_TRACE, MODULE_PATH, MODULE_TYPE, SHAPE, DTYPE, PARAMS, MACS,
    FUSION_GROUP, FUSION_ROLE, FUSED_ACTIVATION, FIXED_RANGE, QUANT_RANGE, QUANT_PARAMS, QUANT_DECISION,
    QUANT_SENSITIVITY, WEIGHT_INTEGERS, KEPT_FEATURES, BN_GAMMA, FLOAT_SOURCE,
)


# torch.export's marker for nodes created outside any module call (e.g. symbolic size reads).
PLACEHOLDER_SCOPE = "_empty_nn_module_stack"


def module_path_from_stack(stack: dict | None) -> tuple[str, str]:
    """Return (innermost module path, its class name) from an ``nn_module_stack`` entry."""
    entries = [value for key, value in (stack or {}).items() if not key.startswith(PLACEHOLDER_SCOPE)]
    if not entries:
        return "", ""
    path, class_name = entries[-1]
    if isinstance(class_name, type):
        class_name = class_name.__name__
    return str(path), str(class_name).rsplit(".", 1)[-1]
