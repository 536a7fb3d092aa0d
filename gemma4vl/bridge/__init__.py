"""The Gemma 4 VL bridge between Hugging Face checkpoints and our Megatron-Core model.

Importing this package imports Megatron-Bridge (through the Transformer Engine import shim when TE is absent)
and registers :class:`Gemma4VLBridge` for ``Gemma4ForConditionalGeneration``.
"""

from gemma4vl.runtime import import_megatron_bridge

import_megatron_bridge()

from gemma4vl.bridge.checkpoint import CheckpointError  # noqa: E402
from gemma4vl.bridge.fusion import FusionError  # noqa: E402
from gemma4vl.bridge.gemma4vl_bridge import Gemma4VLBridge, precheck_hf_checkpoint  # noqa: E402
from gemma4vl.bridge.hf_config import HFConfigError, read_hf_config  # noqa: E402
from gemma4vl.bridge.provider import Gemma4VLModelProvider, provider_from_hf_config  # noqa: E402

__all__ = [
    "CheckpointError",
    "FusionError",
    "Gemma4VLBridge",
    "Gemma4VLModelProvider",
    "HFConfigError",
    "precheck_hf_checkpoint",
    "provider_from_hf_config",
    "read_hf_config",
]
