"""Random Gemma 4 VL checkpoints in HF layout, written tensor by tensor with safetensors (no HF model in memory).

The tensor names and shapes come from `Gemma4ForConditionalGeneration` built on the meta device, so they always
match the installed transformers; values come from one seeded generator per tensor (seed, name), so they do not
depend on the shard layout, the config layout or the order of writing, and a bfloat16 checkpoint is exactly the
float32 one rounded.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import zlib
from pathlib import Path
from typing import Any

import torch

from ._tokenizer_fixture import SPECIAL_TOKEN_IDS, SpecialTokenIds, padded_vocab_size

VARIANTS = ("tiny-moe", "real-width")
LAYOUTS = ("released", "per_layer_config")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# ----------------------------------------------------------------------------------------------------------------
# Shapes

# The 26B-A4B shape in miniature (see shared/notes/platform.md): sliding and full layers with different head dims
# and KV-head counts, K=V on full layers, MoE + dense "shared" MLP, softcapping, tied embeddings, no per-layer
# inputs, no KV sharing, bidirectional image attention. Head counts keep 26B-A4B's ratios (16 query heads, 8 KV
# heads on sliding and 2 on full layers -> 8 / 4 / 2 here), so tensor parallel 2 divides both layer types.
TINY_TEXT: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=16,
    global_head_dim=32,
    num_global_key_value_heads=2,
    sliding_window=8,
    max_position_embeddings=4096,
    final_logit_softcapping=30.0,
    enable_moe_block=True,
    num_experts=4,
    top_k_experts=2,
    moe_intermediate_size=32,
    hidden_size_per_layer_input=0,
    num_kv_shared_layers=0,
    use_double_wide_mlp=False,
    use_bidirectional_attention="vision",
    tie_word_embeddings=True,
)
# position_embedding_size 256 covers any image for budgets <= 140 and square images up to 1120 soft tokens.
TINY_VISION: dict[str, Any] = dict(
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=16,
    patch_size=4,
    pooling_kernel_size=2,
    position_embedding_size=256,
    standardize=True,
)
# google/gemma-4-26B-A4B widths (released config.json): everything but the depths.
REAL_TEXT: dict[str, Any] = dict(
    TINY_TEXT,
    hidden_size=2816,
    intermediate_size=2112,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=256,
    global_head_dim=512,
    num_global_key_value_heads=2,
    sliding_window=1024,
    max_position_embeddings=262144,
    num_experts=128,
    top_k_experts=8,
    moe_intermediate_size=704,
    vocab_size=262144,
)
REAL_VISION: dict[str, Any] = dict(
    hidden_size=1152,
    intermediate_size=4304,
    num_attention_heads=16,
    num_key_value_heads=16,
    head_dim=72,
    patch_size=16,
    pooling_kernel_size=3,
    position_embedding_size=10240,
    standardize=True,
)


@dataclasses.dataclass(frozen=True)
class VariantDefaults:
    num_layers: int
    vision_layers: int
    dtype: torch.dtype
    max_shard_size: str | None
    max_soft_tokens: int


VARIANT_DEFAULTS = {
    "tiny-moe": VariantDefaults(4, 2, torch.float32, None, 70),
    "real-width": VariantDefaults(2, 2, torch.bfloat16, "1GB", 280),
}


def layer_types_for(variant: str, num_layers: int) -> list[str]:
    """tiny-moe alternates [sliding, full, ...]; real-width uses 26B-A4B's 5:1 pattern; the last layer is full."""
    if variant == "tiny-moe":
        types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]
    else:
        types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(num_layers)]
    types[-1] = "full_attention"
    return types


def build_config(
    variant: str = "tiny-moe",
    *,
    num_layers: int | None = None,
    vision_layers: int | None = None,
    attention_k_eq_v: bool = True,
    token_ids: SpecialTokenIds = SPECIAL_TOKEN_IDS,
):
    """A `Gemma4Config` for a fixture variant, with the fixture tokenizer's special token ids."""
    from transformers import Gemma4Config

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    d = VARIANT_DEFAULTS[variant]
    num_layers = d.num_layers if num_layers is None else int(num_layers)
    vision_layers = d.vision_layers if vision_layers is None else int(vision_layers)
    if num_layers < 2:
        raise ValueError(f"num_layers must be >= 2 (at least one sliding and one full-attention layer), got {num_layers}")
    if vision_layers < 1:
        raise ValueError(f"vision_layers must be >= 1, got {vision_layers}")
    text = dict(TINY_TEXT if variant == "tiny-moe" else REAL_TEXT)
    text.setdefault("vocab_size", padded_vocab_size(64))
    text.update(
        num_hidden_layers=num_layers,
        layer_types=layer_types_for(variant, num_layers),
        attention_k_eq_v=bool(attention_k_eq_v),
        pad_token_id=token_ids.pad,
        bos_token_id=token_ids.bos,
        eos_token_id=token_ids.eos,
    )
    vision = dict(TINY_VISION if variant == "tiny-moe" else REAL_VISION)
    vision["num_hidden_layers"] = vision_layers
    cfg = Gemma4Config(
        text_config=text,
        vision_config=vision,
        audio_config=None,
        boi_token_id=token_ids.boi,
        eoi_token_id=token_ids.eoi,
        image_token_id=token_ids.image,
        video_token_id=token_ids.video,
        boa_token_id=token_ids.boa,
        eoa_token_index=token_ids.eoa,
        audio_token_id=token_ids.audio,
        tie_word_embeddings=True,
        eos_token_id=token_ids.eos_ids,
    )
    cfg.architectures = ["Gemma4ForConditionalGeneration"]
    return cfg


def config_dict(config, layout: str, dtype: torch.dtype, max_soft_tokens: int) -> dict[str, Any]:
    """config.json content in either layout.

    * "per_layer_config": exactly what transformers 5.23 `save_pretrained` writes (text `per_layer_config`, no
      `global_head_dim`, vision rope type "axial").
    * "released": what google's checkpoints (and transformers 5.8-5.14) carry: flat `global_head_dim` /
      `num_global_key_value_heads`, vision rope type "default", plus the released top-level extras
      (`eoa_token_id`, `vision_soft_tokens_per_image`, vision `default_output_length` / `global_head_dim`).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    # Sub-configs carry the dtype too, as in google's config.json and in any re-save of a loaded model.
    for c in (config, config.text_config, config.vision_config):
        c.dtype = dtype
    d = config.to_diff_dict()  # what save_pretrained serialises
    if layout == "per_layer_config":
        return d
    text = d["text_config"]
    plc = text.pop("per_layer_config")
    full = [int(i) for i, t in enumerate(text["layer_types"]) if t == "full_attention"]
    overrides = {json.dumps(v, sort_keys=True) for v in plc.values()}
    if set(map(int, plc)) != set(full) or len(overrides) != 1:
        raise AssertionError(f"per_layer_config not expressible in the released layout: {plc}")
    over = next(iter(plc.values()))
    text["global_head_dim"] = over["head_dim"]
    text["num_global_key_value_heads"] = over.get("num_key_value_heads") if text["attention_k_eq_v"] else None
    vision = d["vision_config"]
    vision["rope_parameters"] = dict(vision["rope_parameters"], rope_type="default")
    vision["default_output_length"] = max_soft_tokens
    vision["global_head_dim"] = vision["head_dim"]
    d["eoa_token_id"] = d["eoa_token_index"]
    d["vision_soft_tokens_per_image"] = max_soft_tokens
    return d


def generation_config_dict(token_ids: SpecialTokenIds = SPECIAL_TOKEN_IDS) -> dict[str, Any]:
    from transformers import GenerationConfig

    gc = GenerationConfig(
        bos_token_id=token_ids.bos,
        eos_token_id=token_ids.eos_ids,
        pad_token_id=token_ids.pad,
        do_sample=True,
        temperature=1.0,
        top_k=64,
        top_p=0.95,
    )
    return gc.to_diff_dict()


# ----------------------------------------------------------------------------------------------------------------
# Tensors

@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    kind: str  # see INIT_RULES


def tensor_specs(config) -> list[TensorSpec]:
    """Every tensor of the checkpoint (state_dict order, tied lm_head dropped), from a meta-device model."""
    from transformers import Gemma4ForConditionalGeneration

    with torch.device("meta"):
        model = Gemma4ForConditionalGeneration(config)
    tied = set(getattr(model, "_tied_weights_keys", None) or {}) if config.tie_word_embeddings else set()
    specs = [
        TensorSpec(name, tuple(t.shape), init_kind(name))
        for name, t in model.state_dict().items()
        if name not in tied
    ]
    return specs


_QK_NORM = re.compile(r"\.(q_norm|k_norm)\.weight$")
_NORM = re.compile(r"(norm|layernorm(_\d)?)\.weight$")

# kind -> (distribution, a, b): "normal" (mean a, std b), "uniform" (low a, high b) or "uniform_not1" (uniform on
# [a, b] minus the band 1 +- ONE_GAP, so that no value is, or rounds in bfloat16 to, exactly 1).
ONE_GAP = 0.05
INIT_RULES: dict[str, tuple[str, float, float]] = {
    "qk_norm": ("uniform", 0.3, 0.75),  # sets the softmax temperature (attention scaling is 1.0)
    "norm": ("uniform_not1", 0.5, 1.5),
    "router_scale": ("uniform_not1", 0.5, 1.5),
    "per_expert_scale": ("uniform_not1", 0.5, 1.5),
    "std_scale": ("uniform_not1", 0.5, 1.5),
    "std_bias": ("normal", 0.0, 0.5),
    "layer_scalar": ("layer_scalar", 0.5, 1.5),
    "router_proj": ("normal", 0.0, 1.0),  # router logits of O(1) spread: no near-ties in top-k selection
    "embedding": ("normal", 0.0, 0.05),
    "position_embedding": ("normal", 0.0, 0.02),
    "linear": ("normal", 0.0, 0.02),
}


def init_kind(name: str) -> str:
    if name.endswith("layer_scalar"):
        return "layer_scalar"
    if _QK_NORM.search(name):
        return "qk_norm"
    if name.endswith("router.scale"):
        return "router_scale"
    if name.endswith("router.per_expert_scale"):
        return "per_expert_scale"
    if name.endswith("router.proj.weight"):
        return "router_proj"
    if name.endswith("std_scale"):
        return "std_scale"
    if name.endswith("std_bias"):
        return "std_bias"
    if _NORM.search(name):
        return "norm"
    if name.endswith("embed_tokens.weight") or name.endswith("embedding_projection.weight"):
        return "embedding"
    if name.endswith("position_embedding_table"):
        return "position_embedding"
    if name.endswith(".weight") or name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
        return "linear"
    raise ValueError(f"no init rule for checkpoint tensor {name!r} (new transformers parameter?)")


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1))


_CHUNK = 1 << 24  # elements generated at a time (bounds float32 scratch memory to 64 MiB)


def _layer_scalars(seed: int, num_layers: int) -> list[float]:
    """Distinct per-layer scalars in [0.5, 1.5], at least ONE_GAP away from 1 and min(0.02, 0.4 / num_layers)
    from each other (distinct in bfloat16 too for up to 50 layers)."""
    g = _generator(seed, "layer_scalar")
    spacing = min(0.02, 0.4 / max(num_layers, 1))
    vals: list[float] = []
    while len(vals) < num_layers:
        v = float(torch.empty(1).uniform_(0.5, 1.5, generator=g))
        if abs(v - 1.0) >= ONE_GAP and all(abs(v - u) >= spacing for u in vals):
            vals.append(round(v, 6))
    return vals


def make_tensor(spec: TensorSpec, seed: int, dtype: torch.dtype, layer_scalars: dict[str, float]) -> torch.Tensor:
    dist, a, b = INIT_RULES[spec.kind]
    if dist == "layer_scalar":
        return torch.full(spec.shape, layer_scalars[spec.name], dtype=torch.float32).to(dtype)
    out = torch.empty(spec.shape, dtype=dtype)
    flat = out.view(-1)
    g = _generator(seed, spec.name)
    n = flat.numel()
    for start in range(0, n, _CHUNK):
        m = min(_CHUNK, n - start)
        tmp = torch.empty(m, dtype=torch.float32)
        if dist == "normal":
            tmp.normal_(a, b, generator=g)
        elif dist == "uniform":
            tmp.uniform_(a, b, generator=g)
        elif dist == "uniform_not1":
            tmp.uniform_(a, b - 2 * ONE_GAP, generator=g)
            tmp = torch.where(tmp >= 1 - ONE_GAP, tmp + 2 * ONE_GAP, tmp)
        else:
            raise AssertionError(dist)
        flat[start : start + m] = tmp
    return out


def layer_scalar_map(specs: list[TensorSpec], seed: int) -> dict[str, float]:
    names = [s.name for s in specs if s.kind == "layer_scalar"]
    return dict(zip(names, _layer_scalars(seed, len(names))))


# ----------------------------------------------------------------------------------------------------------------
# Writing

def parse_size(size: int | str | None) -> int | None:
    """Bytes of a fixture's ``max_shard_size`` (None: one unsharded file), by the run config's own parser
    (:func:`gemma4vl.config.validate.parse_size`: KB/MB/GB decimal, KiB/MiB/GiB binary, as transformers)."""
    from gemma4vl.config.validate import parse_size as parse_config_size

    return None if size is None else parse_config_size(size, "max_shard_size")


def plan_shards(specs: list[TensorSpec], dtype: torch.dtype, max_bytes: int | None) -> list[list[TensorSpec]]:
    """Greedy in state_dict order, like `save_pretrained`: a tensor larger than the limit gets a shard of its own."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        nbytes = math.prod(s.shape) * itemsize
        if max_bytes is not None and shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += nbytes
    return shards


def write_weights(
    out: Path, specs: list[TensorSpec], seed: int, dtype: torch.dtype, max_shard_size: int | str | None
) -> tuple[list[str], int, int]:
    """Write the safetensors file(s) (+ index when sharded). Returns (files, total bytes, total parameters)."""
    from safetensors.torch import save_file

    max_bytes = parse_size(max_shard_size)
    shards = plan_shards(specs, dtype, max_bytes)
    scalars = layer_scalar_map(specs, seed)
    sharded = max_bytes is not None
    if sharded:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    else:
        names = ["model.safetensors"]
    weight_map: dict[str, str] = {}
    total_bytes = total_params = 0
    for fname, shard in zip(names, shards):
        tensors = {s.name: make_tensor(s, seed, dtype, scalars) for s in shard}
        for s in shard:
            weight_map[s.name] = fname
            total_params += tensors[s.name].numel()
            total_bytes += tensors[s.name].numel() * tensors[s.name].element_size()
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        del tensors
    files = list(names)
    if sharded:
        index = {
            "metadata": {"total_parameters": total_params, "total_size": total_bytes},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        files.append("model.safetensors.index.json")
    return files, total_bytes, total_params


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse to mix a new checkpoint with an old one's weight files (stale shards would be loaded too)."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output path {out} exists and is not a directory")
    if not out.exists():
        return
    stale = sorted(p.name for p in out.iterdir() if p.name.startswith("model") and ".safetensors" in p.name)
    if stale and not overwrite:
        raise FileExistsError(
            f"{out} already holds checkpoint files ({', '.join(stale[:3])}{', ...' if len(stale) > 3 else ''}); "
            "choose an empty directory or pass overwrite=True (--overwrite)"
        )
    for name in stale:
        os.remove(out / name)
