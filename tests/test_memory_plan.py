"""The memory model (gemma4vl/config/memory.py, ``python -m recipes.plan``): parameter counts equal the model
built on the meta device, the shipped 26B-A4B layouts fit with >= 10% margin, validation refuses a layout that
does not fit, and selective (MoE-block) recompute computes the same loss and gradients as no recompute."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from gemma4vl.bridge import read_hf_config
from gemma4vl.config.compose import to_run_config
from gemma4vl.config.memory import GIB, SHAPES_DIR, architecture_dir, count_parameters, plan_memory
from gemma4vl.config.validate import ConfigError, validate
from gemma4vl.testing.megatron_harness import load_megatron, synthetic_batch
from gemma4vl.testing.pytest_fixtures import tiny_checkpoint
from test_config import compose_run

SHAPE_26B = SHAPES_DIR / "google--gemma-4-26B-A4B"
ROOT = Path(__file__).resolve().parents[1]


def _meta_counts(hf_dir) -> dict[str, int]:
    """Parameters of our model built on the meta device, grouped like :class:`ParameterCounts`."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    from gemma4vl.bridge.provider import provider_from_hf_config

    provider = provider_from_hf_config(read_hf_config(hf_dir), torch.bfloat16)
    provider.use_cpu_initialization = True
    provider.finalize()
    provider._pg_collection = ProcessGroupCollection.use_mpu_process_groups()
    with torch.device("meta"):
        model = provider.provide()
    groups = {"experts": 0, "vision_tower": 0, "embed_vision": 0, "embedding": 0, "decoder": 0}
    for name, param in model.named_parameters():
        assert param.device.type == "meta"
        key = ("experts" if ".mlp.experts." in name else "vision_tower" if name.startswith("vision_tower.")
               else "embed_vision" if name.startswith("embed_vision.") else "embedding" if "word_embeddings" in name
               else "decoder")
        groups[key] += param.numel()
    return groups


@pytest.mark.parametrize("which", ["tiny", "26b"])
def test_parameter_counts_equal_the_meta_built_model(megatron_cpu, tmp_path_factory, which):
    hf_dir = tiny_checkpoint(tmp_path_factory).path if which == "tiny" else SHAPE_26B
    counts = count_parameters(read_hf_config(hf_dir))
    meta = _meta_counts(hf_dir)
    assert counts.output == 0  # Gemma 4 ties the output layer to the embedding
    assert {"experts": counts.experts, "vision_tower": counts.vision_tower, "embed_vision": counts.embed_vision,
            "embedding": counts.embedding, "decoder": counts.decoder_dense} == meta
    if which == "26b":  # 26B total, 3.8B active per token
        assert counts.total == sum(meta.values())
        assert 25.5e9 < counts.total < 26.2e9 and counts.experts == 30 * 128 * 3 * 704 * 2816


def test_bundled_26b_shape_is_the_fixture_generators_30_layer_real_width_config():
    """The bundled architecture-only config.json is what the real-width fixture writes for 30 / 27 layers (one
    source for the 26B-A4B shape); no weights are bundled."""
    from gemma4vl.testing._checkpoint_fixture import build_config, config_dict

    expected = config_dict(build_config("real-width", num_layers=30, vision_layers=27), "released",
                           torch.bfloat16, 280)
    assert json.loads((SHAPE_26B / "config.json").read_text()) == json.loads(json.dumps(expected))
    assert sorted(p.name for p in SHAPE_26B.iterdir()) == ["config.json"]
    assert architecture_dir("google/gemma-4-26B-A4B") == SHAPE_26B
    with pytest.raises(FileNotFoundError, match="model.hf_path='nope/none'"):
        architecture_dir("nope/none")


def _run(experiment, *overrides, tmp_path=Path("/tmp/gemma4vl-test-plan")):
    cfg = compose_run([f"experiment={experiment}", *overrides], run_dir=tmp_path)
    with open_dict(cfg):
        cfg.data.processor_path = "x"
        cfg.data.path = "y"
    return to_run_config(cfg)


@pytest.mark.parametrize("experiment,world", [("gemma4_26b_sft", 8), ("gemma4_26b_lora", 4)])
def test_shipped_26b_layouts_fit_with_ten_percent_margin(experiment, world):
    run = _run(experiment)
    hf = read_hf_config(SHAPE_26B)
    assert run.parallel.world_size == world and run.trainer.device_memory_gib == 79.1
    plan = plan_memory(run, hf, world, fused_adam=True)
    assert plan.peak_bytes <= 0.9 * plan.device_bytes, plan.render()
    assert plan.render().splitlines()[-1] == (f"per-GPU peak estimate: {plan.peak_bytes / GIB:.1f} GiB of 79.1 GiB")
    validate(run, world, hf, fused_adam=True)
    # The README's hardware table quotes this figure: its row for the experiment says the same peak.
    readme_row = next(line for line in (ROOT / "README.md").read_text().splitlines()
                      if line.startswith(f"   | `experiment={experiment}`"))
    assert f"| {plan.peak_bytes / GIB:.1f} GiB" in readme_row, readme_row
    counts = count_parameters(hf, list(run.peft.target_modules) if run.peft.method == "lora" else None,
                              run.peft.rank)
    experts_local = counts.experts / run.parallel.expert
    dense_local = counts.total - counts.experts
    # Weights: bf16, experts split over EP, everything else replicated (TP 1).
    assert plan.line("weights").bytes == pytest.approx(2 * (experts_local + dense_local + counts.lora), abs=1)
    if experiment == "gemma4_26b_sft":
        # bf16 main grads of everything but the frozen vision tower; Adam state (12 B) of the dense part over
        # DP 8, of the experts over expert-DP 1 (EP 8 uses all 8 GPUs); the step copies the shard's grads to fp32.
        trainable = experts_local + dense_local - counts.vision_tower
        assert plan.line("grads").bytes == pytest.approx(2 * trainable, abs=1)
        shard = experts_local + (dense_local - counts.vision_tower) / 8
        assert plan.line("optimizer state").bytes == pytest.approx(12 * shard, abs=1)
        assert plan.line("optimizer step").bytes == pytest.approx(4 * shard, abs=1)
        # torch's multi-tensor AdamW would need another fp32 temporary per state element: no 10% margin then.
        assert plan_memory(run, hf, world, fused_adam=False).peak_bytes > 0.9 * plan.device_bytes
    else:
        assert plan.line("grads").bytes == pytest.approx(4 * counts.lora, abs=1)
        assert plan.line("optimizer state").bytes == pytest.approx(12 * counts.lora, abs=1)


def test_validation_refuses_a_layout_that_does_not_fit():
    hf = read_hf_config(SHAPE_26B)
    run = _run("gemma4_26b_sft", "trainer.recompute=none")
    with pytest.raises(ConfigError, match=r"does not fit trainer.device_memory_gib=79.1: estimated \d+\.\d GiB"):
        validate(run, 8, hf, fused_adam=True)
    # fp32 main grads leave the SFT layout without margin; selective (MoE-block) recompute does not fit it,
    # while the LoRA layout has room for it (and not for no recompute at all).
    fp32 = plan_memory(_run("gemma4_26b_sft", "optim.main_grads_dtype=fp32"), hf, 8, fused_adam=True)
    assert fp32.peak_bytes > 0.9 * fp32.device_bytes
    selective = plan_memory(_run("gemma4_26b_sft", "trainer.recompute=selective"), hf, 8, fused_adam=True)
    assert selective.peak_bytes > selective.device_bytes
    assert _run("gemma4_26b_lora").trainer.recompute == "selective"
    none = plan_memory(_run("gemma4_26b_lora", "trainer.recompute=none"), hf, 4, fused_adam=True)
    assert none.peak_bytes > none.device_bytes
    with pytest.raises(ConfigError, match="parallel.world_size=8 but the run has 4 processes"):
        validate(run, 4, hf, fused_adam=True)
    with pytest.raises(ConfigError, match="optim.main_grads_dtype='bf16' needs trainer.precision='bf16'"):
        validate(_run("gemma4_26b_sft", "trainer.precision=fp32", "trainer.device_memory_gib=null"), 8, hf)


def test_selective_moe_recompute_equals_no_recompute(megatron_cpu, tmp_path_factory):
    """Megatron-Core's MoE-layer checkpoint around our MoE block: same loss and gradients (fp32, CPU)."""
    from transformers import AutoConfig

    hf_dir = tiny_checkpoint(tmp_path_factory).path
    batch = synthetic_batch(AutoConfig.from_pretrained(hf_dir), seed=5)
    labels = torch.roll(batch.input_ids, -1, dims=1)
    results = []
    for extra in ({}, {"recompute_granularity": "selective", "recompute_modules": ["moe"]}):
        _, model = load_megatron(hf_dir, **extra)
        model[0].train()
        layer = model[0].language_model.decoder.layers[0]
        assert layer.mlp.moe_layer_recompute == bool(extra)
        loss = model[0](**replace(batch, labels=labels).model_kwargs())
        loss.sum().backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model[0].named_parameters()
                                        if p.grad is not None}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    assert sorted(grads_a) == sorted(grads_b) and any(".mlp.experts." in n for n in grads_a)
    assert [n for n in grads_a if not torch.equal(grads_a[n], grads_b[n])] == []


def test_selective_recompute_of_other_modules_is_refused(megatron_cpu, tmp_path_factory):
    with pytest.raises(ValueError, match=r"selective recompute of \['core_attn'\]"):
        load_megatron(tiny_checkpoint(tmp_path_factory).path, recompute_granularity="selective",
                      recompute_modules=["core_attn"])


@pytest.mark.parametrize("dtype,seq,tolerance", [(torch.bfloat16, 256, 0.05), (torch.float32, 128, 0.10)],
                         ids=["bf16", "fp32"])
def test_layer_activation_inventory_matches_the_bytes_autograd_saves(megatron_cpu, tmp_path_factory, dtype, seq,
                                                                     tolerance):
    """Per decoder layer, the plan's activation inventory against the storages autograd saves for backward in
    a forward pass of the tiny model on CPU (weights excluded; both layer types). The CPU attention and expert
    paths keep what the GPU paths keep except SDPA's kernel internals (bench/gpu_step.py measures the GPU)."""
    from transformers import AutoConfig

    from gemma4vl.config.memory import layer_activation_bytes

    hf_dir = tiny_checkpoint(tmp_path_factory).path
    hf = read_hf_config(hf_dir)
    _, model = load_megatron(hf_dir, params_dtype=dtype)
    model = model[0].train()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    batch = synthetic_batch(AutoConfig.from_pretrained(hf_dir), seed=1, batch=2, seq=seq)
    current: list = [None]
    saved: dict[int, dict[int, int]] = {}

    def pack(tensor):
        ptr = tensor.untyped_storage().data_ptr()
        if current[0] is not None and ptr not in weights:
            saved.setdefault(current[0], {})[ptr] = tensor.untyped_storage().nbytes()
        return tensor

    for i, layer in enumerate(model.language_model.decoder.layers):
        layer.register_forward_pre_hook(lambda module, args, i=i: current.__setitem__(0, i))
        layer.register_forward_hook(lambda module, args, out: current.__setitem__(0, None))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(**replace(batch, labels=torch.roll(batch.input_ids, -1, dims=1)).model_kwargs())
    act_bytes = 2 if dtype == torch.bfloat16 else 4
    for i, layer_type in enumerate(hf.arch.layer_types):
        measured = sum(saved[i].values())
        estimate = sum(layer_activation_bytes(hf, layer_type, 2, seq, act_bytes, expert_imbalance=1.0).values())
        assert abs(estimate - measured) <= tolerance * measured, (i, layer_type, estimate, measured)
