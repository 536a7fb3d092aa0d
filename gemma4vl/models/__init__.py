"""Gemma 4 vision-language model on Megatron-Core (no Hugging Face layout knowledge: that is the bridge's)."""

from gemma4vl.models.arch import FULL, SLIDING, AttentionSpec, Gemma4Arch, RopeSpec
from gemma4vl.models.gemma4vl_model import Gemma4VLModel, ImageTokenMismatch
from gemma4vl.models.language_model import Gemma4LanguageModel

__all__ = [
    "FULL",
    "SLIDING",
    "AttentionSpec",
    "Gemma4Arch",
    "RopeSpec",
    "Gemma4VLModel",
    "Gemma4LanguageModel",
    "ImageTokenMismatch",
]
