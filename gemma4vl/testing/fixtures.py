"""Tiny random Gemma 4 VL checkpoints and an offline tokenizer / processor, for tests and benchmarks.

Python:

    from gemma4vl.testing.fixtures import write_checkpoint, make_image, tiny_chat
    info = write_checkpoint(tmp_path / "ckpt")                 # tiny-moe, float32, released config layout
    model = Gemma4ForConditionalGeneration.from_pretrained(info.path)
    processor = AutoProcessor.from_pretrained(info.path)

CLI (also installed as `gemma4vl-make-fixture`):

    python -m gemma4vl.testing.fixtures --variant tiny-moe --out DIR [--layout released|per_layer_config]
        [--dtype float32|bfloat16] [--max-shard-size 2MB] [--seed 0] [--num-layers N]

Variants: "tiny-moe" (the 26B-A4B architecture in miniature, hidden 64) and "real-width" (26B-A4B's widths, vocab
262144 and 128 experts included, with `num_layers` decoder layers, default 2, and a shallow vision tower; bfloat16,
1 GB shards, about 4.9 GB). Every norm weight, `router.scale`, `router.per_expert_scale`, the vision standardize
scale and `layer_scalar` are random (never 1): fused-norm bugs cannot hide behind identity weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ._checkpoint_fixture import (
    DTYPES,
    INIT_RULES,
    LAYOUTS,
    VARIANT_DEFAULTS,
    VARIANTS,
    build_config,
    check_out_dir,
    config_dict,
    generation_config_dict,
    layer_scalar_map,
    parse_size,
    tensor_specs,
    write_json,
    write_weights,
)
from ._tokenizer_fixture import (
    CHAT_TEMPLATE_SOURCE,
    SPECIAL_TOKEN_IDS,
    SUPPORTED_MAX_SOFT_TOKENS,
    TOKENIZER_VOCAB_SIZE,
    ProcessorInfo,
    SpecialTokenIds,
    build_tokenizer,
    expected_num_soft_tokens,
    has_torchvision,
    load_chat_template,
    padded_vocab_size,
    write_tokenizer_and_processor,
)

__all__ = [
    "CHAT_TEMPLATE_SOURCE",
    "CheckpointInfo",
    "INIT_RULES",
    "LAYOUTS",
    "ProcessorInfo",
    "SPECIAL_TOKEN_IDS",
    "SpecialTokenIds",
    "TOKENIZER_VOCAB_SIZE",
    "VARIANTS",
    "build_config",
    "build_tokenizer",
    "expected_num_soft_tokens",
    "has_torchvision",
    "load_chat_template",
    "main",
    "make_image",
    "padded_vocab_size",
    "tiny_chat",
    "write_checkpoint",
    "write_tokenizer_and_processor",
]


@dataclasses.dataclass
class CheckpointInfo:
    """What `write_checkpoint` wrote."""

    path: Path
    variant: str
    layout: str
    dtype: torch.dtype
    seed: int
    config: Any  # transformers.Gemma4Config (the in-memory config the files were written from)
    files: list[str]  # relative to `path`, sorted
    num_parameters: int
    weights_bytes: int
    token_ids: SpecialTokenIds
    layer_scalars: dict[str, float]
    processor: ProcessorInfo | None  # None when written with with_processor=False

    @property
    def sharded(self) -> bool:
        return "model.safetensors.index.json" in self.files

    def file_sizes(self) -> dict[str, int]:
        return {f: (self.path / f).stat().st_size for f in self.files}


def _resolve_dtype(dtype: torch.dtype | str | None, variant: str) -> torch.dtype:
    if dtype is None:
        return VARIANT_DEFAULTS[variant].dtype
    if isinstance(dtype, str):
        key = dtype.removeprefix("torch.")
        key = {"fp32": "float32", "bf16": "bfloat16"}.get(key, key)
        if key not in DTYPES:
            raise ValueError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        return DTYPES[key]
    if dtype not in DTYPES.values():
        raise ValueError(f"unsupported dtype {dtype}; choose torch.float32 or torch.bfloat16")
    return dtype


def write_checkpoint(
    out_dir: str | os.PathLike,
    variant: str = "tiny-moe",
    dtype: torch.dtype | str | None = None,
    layout: str = "released",
    max_shard_size: int | str | None = None,
    seed: int = 0,
    attention_k_eq_v: bool = True,
    with_processor: bool = True,
    *,
    num_layers: int | None = None,
    vision_layers: int | None = None,
    max_soft_tokens: int | None = None,
    overwrite: bool = False,
) -> CheckpointInfo:
    """Write a random `Gemma4ForConditionalGeneration` checkpoint (HF layout) into `out_dir`.

    Args:
        variant: "tiny-moe" or "real-width".
        dtype: torch.float32 / torch.bfloat16 (or their names); default float32 for tiny-moe, bfloat16 for
            real-width. Values are the same for both dtypes (bfloat16 = the float32 values rounded).
        layout: config.json layout, "released" (flat global_head_dim / num_global_key_value_heads, as google's
            checkpoints) or "per_layer_config" (what transformers >= 5.15 save_pretrained writes). Same weights.
        max_shard_size: e.g. "2MB", "1GB" or bytes: sharded files + model.safetensors.index.json. None: one
            model.safetensors for tiny-moe, "1GB" shards for real-width.
        seed: weights depend only on (seed, tensor name).
        attention_k_eq_v: full-attention layers without v_proj (26B-A4B); False adds v_proj there.
        with_processor: also write the tokenizer / processor files (`AutoProcessor.from_pretrained(out_dir)`).
        num_layers: decoder layers (tiny-moe default 4 [sliding, full, sliding, full]; real-width default 2).
        vision_layers: vision encoder layers (default 2).
        max_soft_tokens: processor image budget (70/140/280/560/1120); default 70 (tiny-moe), 280 (real-width).
        overwrite: replace checkpoint files already in `out_dir` instead of refusing.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    dtype = _resolve_dtype(dtype, variant)
    defaults = VARIANT_DEFAULTS[variant]
    if max_shard_size is None:
        max_shard_size = defaults.max_shard_size
    parse_size(max_shard_size)  # validate before writing anything
    max_soft_tokens = defaults.max_soft_tokens if max_soft_tokens is None else int(max_soft_tokens)
    if max_soft_tokens not in SUPPORTED_MAX_SOFT_TOKENS:
        raise ValueError(f"max_soft_tokens must be one of {SUPPORTED_MAX_SOFT_TOKENS}, got {max_soft_tokens}")

    out = Path(out_dir)
    check_out_dir(out, overwrite)
    config = build_config(
        variant,
        num_layers=num_layers,
        vision_layers=vision_layers,
        attention_k_eq_v=attention_k_eq_v,
    )
    specs = tensor_specs(config)
    out.mkdir(parents=True, exist_ok=True)

    weight_files, nbytes, nparams = write_weights(out, specs, seed, dtype, max_shard_size)
    write_json(out / "config.json", config_dict(config, layout, dtype, max_soft_tokens))
    write_json(out / "generation_config.json", generation_config_dict())
    files = weight_files + ["config.json", "generation_config.json"]

    processor = None
    if with_processor:
        vcfg = config.vision_config
        processor = write_tokenizer_and_processor(
            out,
            patch_size=vcfg.patch_size,
            pooling_kernel_size=vcfg.pooling_kernel_size,
            max_soft_tokens=max_soft_tokens,
        )
        files += processor.files
    return CheckpointInfo(
        path=out,
        variant=variant,
        layout=layout,
        dtype=dtype,
        seed=seed,
        config=config,
        files=sorted(set(files)),
        num_parameters=nparams,
        weights_bytes=nbytes,
        token_ids=SPECIAL_TOKEN_IDS,
        layer_scalars=layer_scalar_map(specs, seed),
        processor=processor,
    )


# ----------------------------------------------------------------------------------------------------------------
# Inputs for tests


def load_checkpoint_tensors(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of every ``*.safetensors`` shard in ``checkpoint_dir`` (tests compare whole checkpoints)."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(Path(checkpoint_dir).glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def make_image(seed: int = 0, size: int | tuple[int, int] = 64):
    """A deterministic RGB `PIL.Image` (smooth gradient + noise); `size` is an int (square) or (width, height).

    With the tiny-moe processor (patch 4, pooling 2, budget 70) a 64x64 image is used as is (no resize) and
    becomes 64 soft tokens.
    """
    import numpy as np
    from PIL import Image

    if isinstance(size, int):
        width = height = size
    else:
        width, height = size
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {size!r}")
    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, size=3)
    freq = rng.uniform(0.05, 0.3, size=(3, 2))
    base = np.stack(
        [0.5 + 0.35 * np.sin(freq[c, 0] * xx + freq[c, 1] * yy + phase[c]) for c in range(3)], axis=-1
    )
    pixels = np.clip(base + rng.normal(0, 0.08, size=base.shape), 0, 1)
    return Image.fromarray((pixels * 255).round().astype(np.uint8)).convert("RGB")


def tiny_chat(
    image=None,
    *,
    seed: int = 0,
    size: int | tuple[int, int] = 64,
    system: str | None = "You are a helpful assistant.",
    question: str = "What is in this image?",
    answer: str | None = "A colourful test pattern.",
) -> list[dict]:
    """A `messages` list with one image (HF content-list format): [system], user(image + text), [assistant]."""
    if image is None:
        image = make_image(seed, size)
    messages: list[dict] = []
    if system is not None:
        messages.append({"role": "system", "content": system})
    messages.append(
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}
    )
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


# ----------------------------------------------------------------------------------------------------------------
# CLI


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n} B"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gemma4vl-make-fixture",
        description="Write a random Gemma 4 VL checkpoint (HF layout) with an offline tokenizer / processor.",
    )
    p.add_argument("--variant", choices=VARIANTS, default="tiny-moe")
    p.add_argument("--out", required=True, help="output directory (created; must not hold another checkpoint)")
    p.add_argument("--layout", choices=LAYOUTS, default="released", help="config.json layout (default: released)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="default: float32 for tiny-moe, bfloat16 for real-width")
    p.add_argument("--max-shard-size", default=None,
                   help="shard the weights, e.g. 2MB, 1GB (default: one file for tiny-moe, 1GB for real-width)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-layers", type=int, default=None,
                   help="decoder layers (default: 4 for tiny-moe, 2 for real-width); >= 2")
    p.add_argument("--vision-layers", type=int, default=None, help="vision encoder layers (default 2)")
    p.add_argument("--max-soft-tokens", type=int, default=None, choices=SUPPORTED_MAX_SOFT_TOKENS,
                   help="processor image budget (default: 70 for tiny-moe, 280 for real-width)")
    p.add_argument("--no-k-eq-v", dest="attention_k_eq_v", action="store_false",
                   help="give full-attention layers a v_proj (attention_k_eq_v=False)")
    p.add_argument("--no-processor", dest="with_processor", action="store_false",
                   help="write only weights and configs, no tokenizer / processor files")
    p.add_argument("--overwrite", action="store_true", help="replace checkpoint files already in --out")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.max_shard_size is not None:
        try:
            parse_size(args.max_shard_size)
        except ValueError as e:
            parser.error(str(e))
    for name in ("num_layers", "vision_layers"):
        v = getattr(args, name)
        if v is not None and v < (2 if name == "num_layers" else 1):
            parser.error(f"--{name.replace('_', '-')} must be >= {2 if name == 'num_layers' else 1}, got {v}")
    t0 = time.perf_counter()
    try:
        info = write_checkpoint(
            args.out,
            variant=args.variant,
            dtype=args.dtype,
            layout=args.layout,
            max_shard_size=args.max_shard_size,
            seed=args.seed,
            attention_k_eq_v=args.attention_k_eq_v,
            with_processor=args.with_processor,
            num_layers=args.num_layers,
            vision_layers=args.vision_layers,
            max_soft_tokens=args.max_soft_tokens,
            overwrite=args.overwrite,
        )
    except (ValueError, FileExistsError, NotADirectoryError, ImportError) as e:
        print(f"gemma4vl-make-fixture: error: {e}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - t0
    text = info.config.text_config
    print(f"wrote {info.variant} checkpoint to {info.path} in {elapsed:.1f} s")
    print(
        f"  layout={info.layout} dtype={str(info.dtype).removeprefix('torch.')} seed={info.seed} "
        f"layers={text.num_hidden_layers} ({', '.join(t.split('_')[0] for t in text.layer_types)}) "
        f"vision_layers={info.config.vision_config.num_hidden_layers} vocab={text.vocab_size}"
    )
    print(f"  parameters: {info.num_parameters:,} ({_human(info.weights_bytes)} of weights)")
    for name, size in info.file_sizes().items():
        print(f"  {size:>15,}  {name}")
    if info.processor is not None and not info.processor.loadable_with_auto_processor:
        print("  note: torchvision is missing, so AutoProcessor cannot load this directory here "
              "(AutoTokenizer / AutoImageProcessor can)")
    ids = info.token_ids
    print(f"  token ids: bos={ids.bos} eos={ids.eos_ids} pad={ids.pad} boi={ids.boi} image={ids.image} "
          f"eoi={ids.eoi} turn=({ids.turn_start}, {ids.turn_end})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
