"""Memory of a LoRA run vs full finetuning: parameters with gradients and optimizer state (docs/lora.md).

    python bench/lora_memory.py [--rank 16] [--dp 1]

Training memory that does not depend on the batch is: every weight (bf16, 2 B per parameter), and for each
*trainable* parameter its gradient (fp32 buffer: ``grad_reduce_in_fp32``, 4 B) and Adam's state (fp32 main copy,
m and v: 12 B, divided by ``--dp`` with the distributed optimizer). Activations come on top and are the same for
LoRA and full finetuning at the same batch (LoRA adds rank-wide activations only).

1. **Measured, tiny fixture** (CPU, fp32 fixture): the Megatron model built through the bridge, Megatron-Bridge's
   LoRA applied as in training; trainable parameters counted from ``requires_grad`` and compared with
   :func:`gemma4vl.bridge.adapters.lora_parameter_counts` and the HF-based total used for the 26B model (the
   baseline of this run: ratio measured / computed must be 1).
2. **google/gemma-4-26B-A4B** (from its architecture: 30 layers, 27-layer vision tower; the model is instantiated
   on the meta device, no weights): the same counts and the bytes above, for full finetuning (all weights; vision
   tower frozen as in ``experiment=gemma4_26b_sft``) and the LoRA presets ``peft=lora`` (attention)
   and ``peft=lora_shared_expert``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's gemma4vl

GB = 1e9
PRESETS = {  # conf/peft/*.yaml: name -> adapted targets (keys of lora_parameter_counts)
    "lora": ("self_attention.linear_qkv", "self_attention.linear_proj"),
    "lora_shared_expert": ("self_attention.linear_qkv", "self_attention.linear_proj",
                           "mlp.shared_experts.linear_fc1", "mlp.shared_experts.linear_fc2"),
}
PRESET_TARGETS = {  # the same presets as peft.target_modules
    "lora": ["linear_qkv", "linear_proj"],
    "lora_shared_expert": ["linear_qkv", "linear_proj", "*.shared_experts.linear_fc1", "*.shared_experts.linear_fc2"],
}


def write_config(config, out_dir: Path) -> Path:
    """config.json (released layout) of a transformers ``Gemma4Config``, for :func:`read_hf_config`."""
    from gemma4vl.testing._checkpoint_fixture import config_dict

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config_dict(config, "released", torch.bfloat16, 280)))
    return out_dir


def hf_counts(config) -> tuple[int, int]:
    """(all parameters, vision tower parameters) of transformers' model of ``config`` (meta device)."""
    from transformers import Gemma4ForConditionalGeneration

    with torch.device("meta"):
        model = Gemma4ForConditionalGeneration(config)
    total = sum(p.numel() for p in model.parameters())
    vision = sum(p.numel() for n, p in model.named_parameters() if n.startswith("model.vision_tower."))
    return total, vision


def megatron_total(hf, hf_total: int) -> int:
    """The Megatron model's parameters from transformers': plus the value rows K=V layers keep in ``linear_qkv``
    (unused; see docs/bridge.md), minus the two [H] vectors per MoE layer that the bridge fuses into other weights
    (``router.scale``, ``pre_feedforward_layernorm``: buffers, "anchors", in the Megatron model)."""
    extra = 0
    for layer_type in hf.arch.layer_types:
        spec = hf.arch.attention(layer_type)
        if spec.k_eq_v:
            extra += spec.num_kv_heads * spec.head_dim * hf.hidden_size
        if hf.num_experts:
            extra -= 2 * hf.hidden_size
    return hf_total + extra


def measure_tiny(rank: int) -> list[tuple]:
    """Rows (what, measured, computed) on the tiny fixture."""
    from types import SimpleNamespace

    from gemma4vl.bridge import read_hf_config
    from gemma4vl.bridge.adapters import lora_parameter_counts
    from gemma4vl.config.container import _peft
    from gemma4vl.config.schema import PeftConfig
    from gemma4vl.runtime.distributed import destroy_model_parallel, initialize_model_parallel
    from gemma4vl.testing.fixtures import write_checkpoint
    from gemma4vl.testing.megatron_harness import load_megatron

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        info = write_checkpoint(Path(tmp) / "tiny", variant="tiny-moe", dtype="float32", layout="released")
        hf = read_hf_config(info.path)
        counts = lora_parameter_counts(hf, rank)
        initialize_model_parallel("cpu")
        try:
            _, model = load_megatron(info.path)
            rows.append(("full finetuning: all parameters", sum(p.numel() for p in model[0].parameters()),
                         megatron_total(hf, hf_counts(info.config)[0])))
            for name, targets in PRESET_TARGETS.items():
                _, model = load_megatron(info.path)
                lora = _peft(SimpleNamespace(peft=PeftConfig(method="lora", rank=rank, alpha=2.0 * rank,
                                                             target_modules=targets)))
                model = lora(model, training=True)
                trainable = sum(p.numel() for p in model[0].parameters() if p.requires_grad)
                rows.append((f"peft={name}: trainable", trainable, sum(counts[t] for t in PRESETS[name])))
        finally:
            destroy_model_parallel()
    return rows


def memory_26b(rank: int, dp: int) -> list[tuple]:
    """Rows (what, trainable, weights GB, gradients GB, optimizer GB) for gemma-4-26B-A4B."""
    from gemma4vl.bridge import read_hf_config
    from gemma4vl.bridge.adapters import lora_parameter_counts
    from gemma4vl.testing._checkpoint_fixture import build_config

    config = build_config("real-width", num_layers=30, vision_layers=27)
    with tempfile.TemporaryDirectory() as tmp:
        hf = read_hf_config(write_config(config, Path(tmp)))
    hf_total, vision = hf_counts(config)
    total = megatron_total(hf, hf_total)
    counts = lora_parameter_counts(hf, rank)
    setups = [("full finetuning", total, total), ("full, vision tower frozen", total, total - vision)]
    for name, targets in PRESETS.items():
        adapters = sum(counts[t] for t in targets)
        setups.append((f"peft={name} (rank {rank})", total + adapters, adapters))
    return [(what, params, trainable, 2 * params / GB, 4 * trainable / GB, 12 * trainable / dp / GB)
            for what, params, trainable in setups]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (conf/peft/*.yaml: 16)")
    parser.add_argument("--dp", type=int, default=1, help="data-parallel size sharding the optimizer state")
    args = parser.parse_args()

    print(f"1. tiny fixture, rank {args.rank}: parameters counted on the Megatron model vs computed")
    print(f"{'':40} {'measured':>12} {'computed':>12} {'ratio':>7}")
    for what, measured, computed in measure_tiny(args.rank):
        print(f"{what:40} {measured:>12,} {computed:>12,} {measured / computed:>7.4f}")

    rows = memory_26b(args.rank, args.dp)
    full = rows[0]
    print(f"\n2. gemma-4-26B-A4B, bf16 weights, fp32 gradients, Adam fp32 state / DP {args.dp}")
    print(f"{'':40} {'parameters':>15} {'trainable':>15} {'weights':>8} {'grads':>8} {'optim':>8} {'total':>8} "
          f"{'grads+optim':>12}")
    for what, params, trainable, w, g, o in rows:
        ratio = (g + o) / (full[4] + full[5])
        print(f"{what:40} {params:>15,} {trainable:>15,} {w:>6.2f}GB {g:>6.2f}GB {o:>6.2f}GB {w + g + o:>6.2f}GB "
              f"{ratio:>11.4f}x")


if __name__ == "__main__":
    main()
