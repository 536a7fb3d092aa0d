"""Strict reading of a Gemma 4 VL ``config.json`` into our architecture description.

Two layouts exist in the wild for the text config's per-layer-type attention shape:

- ``"released"`` (Google's checkpoints; transformers 5.8-5.14): flat ``head_dim`` / ``num_key_value_heads`` for
  sliding layers and ``global_head_dim`` / ``num_global_key_value_heads`` for full layers;
- ``"per_layer_config"`` (transformers >= 5.15 ``save_pretrained``): ``per_layer_config: {"<full layer index>":
  {"head_dim": G, "num_key_value_heads": KV}}``.

Both are read here from the raw JSON with the reference's semantics (in the released layout
``num_global_key_value_heads`` applies only with ``attention_k_eq_v``; otherwise full layers keep
``num_key_value_heads``). Every field we use must be present: a missing field is an error naming the file and
key, never a silent default. The parse is cross-checked against transformers' own reading of the same file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gemma4vl.models.arch import FULL, SLIDING, AttentionSpec, Gemma4Arch, RopeSpec

RELEASED = "released"
PER_LAYER_CONFIG = "per_layer_config"


class HFConfigError(ValueError):
    """A Gemma 4 config.json is missing a field, has an unsupported value, or contradicts itself."""


@dataclass(frozen=True)
class Gemma4HFConfig:
    """What gemma4vl needs from a Gemma 4 VL config.json, read strictly."""

    path: Path
    """The config.json this was read from."""

    layout: str
    """``"released"`` or ``"per_layer_config"`` (see module docstring)."""

    raw: dict
    """The file's JSON content, kept to write the export's config.json in the same layout."""

    arch: Gemma4Arch
    """Gemma 4 specifics for the model."""

    num_layers: int
    """Decoder layers."""

    hidden_size: int
    """Residual stream width."""

    num_attention_heads: int
    """Query heads (same for both layer types)."""

    intermediate_size: int
    """Width of the dense MLP (the MoE layer's shared expert)."""

    vocab_size: int
    """Vocabulary size of the embedding / output layer."""

    rms_norm_eps: float
    """Epsilon of every RMSNorm."""

    tie_word_embeddings: bool
    """Output layer shares the embedding weight."""

    num_experts: int | None
    """Routed experts per MoE layer (None for dense models)."""

    top_k_experts: int | None
    """Experts per token."""

    moe_intermediate_size: int | None
    """Width of each routed expert."""

    max_position_embeddings: int
    """Longest supported sequence."""

    hidden_activation: str
    """MLP activation (Gemma 4: ``gelu_pytorch_tanh``)."""


def _require(cfg: dict, key: str, where: str, path: Path) -> Any:
    if key not in cfg:
        raise HFConfigError(f"{path}: {where} has no '{key}' (required; gemma4vl does not guess defaults)")
    return cfg[key]


def _rope(params: dict, layer_type: str, path: Path) -> RopeSpec:
    if layer_type not in params:
        raise HFConfigError(f"{path}: text_config.rope_parameters has no '{layer_type}' entry")
    p = params[layer_type]
    rope_type = _require(p, "rope_type", f"text_config.rope_parameters.{layer_type}", path)
    theta = float(_require(p, "rope_theta", f"text_config.rope_parameters.{layer_type}", path))
    factor = p.get("factor", 1.0)
    if factor != 1.0:
        raise HFConfigError(f"{path}: rope_parameters.{layer_type}.factor={factor} (RoPE scaling) is not supported")
    if rope_type == "default":
        return RopeSpec(theta=theta, rotary_fraction=1.0)
    if rope_type == "proportional":
        fraction = float(_require(p, "partial_rotary_factor", f"text_config.rope_parameters.{layer_type}", path))
        return RopeSpec(theta=theta, rotary_fraction=fraction)
    raise HFConfigError(f"{path}: rope_parameters.{layer_type}.rope_type={rope_type!r} is not supported "
                        "(expected 'default' or 'proportional')")


def _full_layer_shape(text: dict, layer_types: list[str], path: Path) -> tuple[str, int, int]:
    """(layout, head_dim, kv_heads) of full-attention layers."""
    full_layers = [i for i, t in enumerate(layer_types) if t == FULL]
    if "per_layer_config" in text:
        if "global_head_dim" in text:
            raise HFConfigError(f"{path}: text_config has both 'per_layer_config' and 'global_head_dim'")
        plc = {int(k): v for k, v in text["per_layer_config"].items()}
        if sorted(plc) != full_layers:
            raise HFConfigError(
                f"{path}: text_config.per_layer_config covers layers {sorted(plc)} but the full-attention layers "
                f"are {full_layers}"
            )
        shapes = {(v.get("head_dim"), v.get("num_key_value_heads")) for v in plc.values()}
        if len(shapes) != 1 or None in next(iter(shapes)):
            raise HFConfigError(
                f"{path}: text_config.per_layer_config entries must all give the same head_dim and "
                f"num_key_value_heads; got {sorted(map(str, shapes))}"
            )
        head_dim, kv = next(iter(shapes))
        return PER_LAYER_CONFIG, int(head_dim), int(kv)
    head_dim = int(_require(text, "global_head_dim", "text_config", path))
    if text["attention_k_eq_v"]:
        kv = int(_require(text, "num_global_key_value_heads", "text_config", path))
    else:
        kv = int(text["num_key_value_heads"])
    return RELEASED, head_dim, kv


def read_hf_config(checkpoint_dir: str | Path) -> Gemma4HFConfig:
    """Read ``checkpoint_dir/config.json`` strictly (see module docstring)."""
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise HFConfigError(f"{path}: no such file (expected a Hugging Face Gemma 4 checkpoint directory)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise HFConfigError(f"{path}: not valid JSON ({e})") from e
    archs = raw.get("architectures")
    if archs != ["Gemma4ForConditionalGeneration"]:
        raise HFConfigError(f"{path}: architectures={archs!r}; gemma4vl converts Gemma4ForConditionalGeneration")
    if raw.get("audio_config") is not None:
        raise HFConfigError(f"{path}: has an audio_config; the audio tower is not supported by gemma4vl")
    text = _require(raw, "text_config", "the config", path)
    vision = _require(raw, "vision_config", "the config", path)

    for key, supported in (("hidden_size_per_layer_input", (0, None)), ("num_kv_shared_layers", (0,)),
                           ("attention_bias", (False,)), ("use_double_wide_mlp", (False,))):
        value = _require(text, key, "text_config", path)
        if value not in supported:
            raise HFConfigError(f"{path}: text_config.{key}={value!r} is not supported (supported: {supported})")
    activation = _require(text, "hidden_activation", "text_config", path)
    if activation != "gelu_pytorch_tanh":
        raise HFConfigError(f"{path}: text_config.hidden_activation={activation!r}; expected 'gelu_pytorch_tanh'")

    layer_types = list(_require(text, "layer_types", "text_config", path))
    num_layers = int(_require(text, "num_hidden_layers", "text_config", path))
    if len(layer_types) != num_layers:
        raise HFConfigError(f"{path}: text_config.layer_types has {len(layer_types)} entries, num_hidden_layers "
                            f"is {num_layers}")
    k_eq_v = bool(_require(text, "attention_k_eq_v", "text_config", path))
    rope = _require(text, "rope_parameters", "text_config", path)
    layout, full_head_dim, full_kv = _full_layer_shape(text, layer_types, path)
    sliding_window = int(_require(text, "sliding_window", "text_config", path))
    enable_moe = bool(_require(text, "enable_moe_block", "text_config", path))
    if not enable_moe:
        raise HFConfigError(f"{path}: text_config.enable_moe_block is false; gemma4vl supports the MoE models "
                            "(e.g. gemma-4-26B-A4B) only")
    bidir = _require(text, "use_bidirectional_attention", "text_config", path)
    if bidir not in ("vision", None):
        raise HFConfigError(f"{path}: text_config.use_bidirectional_attention={bidir!r}; expected 'vision' or null")

    arch = Gemma4Arch(
        layer_types=tuple(layer_types),
        sliding=AttentionSpec(
            head_dim=int(_require(text, "head_dim", "text_config", path)),
            num_kv_heads=int(_require(text, "num_key_value_heads", "text_config", path)),
            k_eq_v=False,
            rope=_rope(rope, SLIDING, path),
            window=sliding_window,
        ),
        full=AttentionSpec(head_dim=full_head_dim, num_kv_heads=full_kv, k_eq_v=k_eq_v,
                           rope=_rope(rope, FULL, path), window=None),
        final_logit_softcapping=_require(text, "final_logit_softcapping", "text_config", path),
        enable_moe_block=enable_moe,
        bidirectional_image_attention=bidir == "vision",
        image_token_id=int(_require(raw, "image_token_id", "the config", path)),
        pad_token_id=int(_require(text, "pad_token_id", "text_config", path)),
        vision_config=_vision_config(vision),
    )
    return Gemma4HFConfig(
        path=path,
        layout=layout,
        raw=raw,
        arch=arch,
        num_layers=num_layers,
        hidden_size=int(_require(text, "hidden_size", "text_config", path)),
        num_attention_heads=int(_require(text, "num_attention_heads", "text_config", path)),
        intermediate_size=int(_require(text, "intermediate_size", "text_config", path)),
        vocab_size=int(_require(text, "vocab_size", "text_config", path)),
        rms_norm_eps=float(_require(text, "rms_norm_eps", "text_config", path)),
        tie_word_embeddings=bool(_require(raw, "tie_word_embeddings", "the config", path)),
        num_experts=int(_require(text, "num_experts", "text_config", path)),
        top_k_experts=int(_require(text, "top_k_experts", "text_config", path)),
        moe_intermediate_size=int(_require(text, "moe_intermediate_size", "text_config", path)),
        max_position_embeddings=int(_require(text, "max_position_embeddings", "text_config", path)),
        hidden_activation=activation,
    )


def _vision_config(vision: dict):
    from transformers import Gemma4VisionConfig

    return Gemma4VisionConfig(**{k: v for k, v in vision.items() if k not in ("model_type", "transformers_version")})


def check_against_transformers(cfg: Gemma4HFConfig) -> None:
    """Fail if transformers reads the same file into different attention shapes than we do."""
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(cfg.path.parent).text_config
    for i, layer_type in enumerate(cfg.arch.layer_types):
        ours = cfg.arch.attention(layer_type)
        theirs = hf.per_layer_config[i]
        if (ours.head_dim, ours.num_kv_heads) != (theirs.head_dim, theirs.num_key_value_heads):
            raise HFConfigError(
                f"{cfg.path}: layer {i} ({layer_type}) reads as head_dim={ours.head_dim}, kv_heads="
                f"{ours.num_kv_heads} here but transformers reads head_dim={theirs.head_dim}, kv_heads="
                f"{theirs.num_key_value_heads}"
            )
