"""Checkpoints and weights, one home for each: files (newest, resolve, load with ``weights_only=True``, atomic save),
what a checkpoint records, weight loading (EMA first, state checks, freezing, rebuilding a recorded network) and
unwrapping DDP / torch.compile.

This layer sits just above ``io`` and below ``networks``: networks that read pretrained files (MedicalNet, the
IP-Adapter) load them through it, and it never imports a network class by name (:func:`build_network` imports the
class a checkpoint records, from trusted modules only, at call time).
"""

from .files import (
    FORMAT_VERSION,
    LOCK_FILE,
    SAVE_LOG,
    CheckpointLoadError,
    checkpoint_format,
    checkpoints_by_age,
    intact_checkpoint_before,
    latest_checkpoint,
    load_checkpoint,
    named_error,
    record_save,
    resolve_checkpoint,
    save_checkpoint_file,
    sort_by_age,
)
from .records import check_diffusion_matches, network_arguments, plain
from .unwrap import unwrap, unwrap_state_dict
from .weights import (
    TRUSTED_NETWORK_MODULES,
    StateComparison,
    build_network,
    check_state_fits,
    compare_state,
    freeze,
    load_frozen,
    load_network_weights,
    shape_of,
    state_mismatch,
    weight_keys,
)

__all__ = [
    "FORMAT_VERSION",
    "LOCK_FILE",
    "SAVE_LOG",
    "TRUSTED_NETWORK_MODULES",
    "CheckpointLoadError",
    "StateComparison",
    "build_network",
    "compare_state",
    "shape_of",
    "check_diffusion_matches",
    "check_state_fits",
    "checkpoint_format",
    "checkpoints_by_age",
    "intact_checkpoint_before",
    "latest_checkpoint",
    "load_checkpoint",
    "freeze",
    "load_frozen",
    "load_network_weights",
    "named_error",
    "network_arguments",
    "plain",
    "record_save",
    "resolve_checkpoint",
    "save_checkpoint_file",
    "sort_by_age",
    "state_mismatch",
    "unwrap",
    "unwrap_state_dict",
    "weight_keys",
]
