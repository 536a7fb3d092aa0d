"""LoRA adapters through the bridge, in one process on the tiny MoE fixture (randomised norms and scales), with
explicitly randomised adapter weights (LoRA's B starts at zero, so untrained adapters would prove nothing):

- the merged export reproduces the model's logits (fp32, 1e-4) with adapters on attention (sliding and K=V
  global layers), on the shared expert (whose gate/up weight is stored fused with w1/w2) and on every routed
  expert, also after the norms changed (as training would change them);
- the HF PEFT adapter, loaded with ``peft`` onto the source checkpoint, reproduces them too; its tensors are
  where PEFT expects them (no v_proj on K=V layers, the shared expert's A divided by w1/w2);
- what the adapter format cannot express (routed experts, a trained base) is refused before anything is written,
  and a written adapter that does not fit its base is refused naming the tensor.

The recipe-level tests (training, resume, recipes.export) are in tests/test_recipe.py.
"""

import json
from types import SimpleNamespace

import pytest
import torch

from gemma4vl.config.schema import PeftConfig
from gemma4vl.testing.fixtures import load_checkpoint_tensors
from gemma4vl.testing.megatron_harness import forward_logits, hf_model, load_megatron, synthetic_batch
from gemma4vl.testing.pytest_fixtures import tiny_checkpoint

ATOL = 1e-4
PEFT_TARGETS = ["linear_qkv", "linear_proj", "*.shared_experts.linear_fc1", "*.shared_experts.linear_fc2"]
RANK, ALPHA = 4, 8.0


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory, layout="released", dtype="float32")


def lora_model(path, targets, seed=0):
    """(AutoBridge, model chunks, LoRA) with LoRA on ``targets`` and every adapter weight random."""
    from gemma4vl.config.container import _peft

    bridge, model = load_megatron(path)
    lora = _peft(SimpleNamespace(peft=PeftConfig(method="lora", rank=RANK, alpha=ALPHA, target_modules=targets)))
    model = lora(model, training=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model[0].named_parameters():
            if ".adapter." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return bridge, model, lora


def max_diff(a, b, batch):
    valid = batch.segment_ids > 0
    return (a - b)[valid].abs().max().item()


def test_merged_export_with_adapters_on_fused_and_routed_weights_reproduces_the_model(megatron_cpu, released,
                                                                                      tmp_path):
    from gemma4vl.export import export_hf_checkpoint

    # Routed experts are grouped parameters (no Linear modules): LoRA targets them not at all (refused in
    # validation, test_config), so the adapted weights are attention's and the shared expert's.
    bridge, model, _ = lora_model(released.path, PEFT_TARGETS)
    # The norms the shared-expert fusion divides by, changed as training would change them.
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in model[0].language_model.decoder.layers:
            layer.pre_mlp_layernorm.weight.mul_(1 + 0.3 * torch.rand(layer.pre_mlp_layernorm.weight.shape,
                                                                     generator=g))
    batch = synthetic_batch(released.config, seed=3)
    ours = forward_logits(model, batch)
    report = export_hf_checkpoint(bridge, model, tmp_path / "merged")
    with torch.no_grad():
        exported = hf_model(report.path)(**batch.hf_kwargs()).logits
        source = hf_model(released.path)(**batch.hf_kwargs()).logits
    assert max_diff(exported, ours, batch) <= ATOL
    assert max_diff(source, ours, batch) > 100 * ATOL  # the adapters and norms change the model
    # Every adapted tensor changed, the shared expert's included; the routed experts are as imported.
    before, after = load_checkpoint_tensors(released.path), load_checkpoint_tensors(report.path)
    p = "model.language_model.layers.1."
    for name in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                 "mlp.down_proj.weight"):
        assert not torch.allclose(before[p + name], after[p + name], atol=1e-3), name
    for name in ("experts.gate_up_proj", "experts.down_proj"):
        assert torch.equal(before[p + name], after[p + name]), name


def test_peft_adapter_reproduces_the_model(megatron_cpu, released, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    from gemma4vl.export import export_hf_adapter

    bridge, model, lora = lora_model(released.path, PEFT_TARGETS, seed=1)
    batch = synthetic_batch(released.config, seed=4)
    ours = forward_logits(model, batch)
    report = export_hf_adapter(bridge, model, tmp_path / "adapter", lora)
    with torch.no_grad():
        peft_logits = PeftModel.from_pretrained(hf_model(released.path), str(report.path)).eval()(
            **batch.hf_kwargs()).logits
        source = hf_model(released.path)(**batch.hf_kwargs()).logits
    assert max_diff(peft_logits, ours, batch) <= ATOL
    assert max_diff(source, ours, batch) > 100 * ATOL

    config = json.loads((report.path / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", RANK, ALPHA)
    assert config["base_model_name_or_path"] == str(released.path.resolve())
    tensors = load_file(report.path / "adapter_model.safetensors")
    text = released.config.text_config
    layer_types = text.layer_types
    full, sliding = layer_types.index("full_attention"), layer_types.index("sliding_attention")
    names = {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in tensors}
    assert names == set(config["target_modules"])
    for i in range(len(layer_types)):
        p = f"model.language_model.layers.{i}."
        expected = {p + "self_attn." + m for m in ("q_proj", "k_proj", "o_proj")} | {
            p + "mlp." + m for m in ("gate_proj", "up_proj", "down_proj")}
        if i != full and layer_types[i] == "sliding_attention":
            expected.add(p + "self_attn.v_proj")
        assert {n for n in names if n.startswith(p)} == expected, i  # K=V layers: no v_proj
    # The shared expert's A: the Megatron adapter's A divided by w1/w2 per input column (the source's norms).
    source_tensors = load_checkpoint_tensors(released.path)
    for i in (sliding, full):
        p = f"model.language_model.layers.{i}."
        a_mg = model[0].language_model.decoder.layers[i].mlp.shared_experts.linear_fc1.adapter.linear_in.weight
        factor = (source_tensors[p + "pre_feedforward_layernorm.weight"].double()
                  / source_tensors[p + "pre_feedforward_layernorm_2.weight"].double())
        for m in ("gate_proj", "up_proj"):
            a_hf = tensors[f"base_model.model.{p}mlp.{m}.lora_A.weight"]
            torch.testing.assert_close(a_hf.double(), a_mg.detach().double() / factor, rtol=1e-6, atol=0)
        b_mg = model[0].language_model.decoder.layers[i].mlp.shared_experts.linear_fc1.adapter.linear_out.weight
        gate_b, up_b = tensors[f"base_model.model.{p}mlp.gate_proj.lora_B.weight"], \
            tensors[f"base_model.model.{p}mlp.up_proj.lora_B.weight"]
        assert torch.equal(torch.cat([gate_b, up_b]), b_mg.detach())
    # Parameters: rank x (in + out) per HF module (A is repeated for q/k/v and gate/up, B is split).
    shapes = {k: v.shape for k, v in source_tensors.items()}
    assert report.num_parameters == sum(RANK * sum(shapes[n + ".weight"]) for n in names)


def test_adapter_format_refuses_what_it_cannot_express(megatron_cpu, released, tmp_path):
    from gemma4vl.bridge.adapters import AdapterFormatError
    from gemma4vl.export import export_hf_adapter

    bridge, model, lora = lora_model(released.path, ["linear_qkv"])
    model[0].language_model.decoder.final_layernorm.weight.requires_grad_(True)
    with pytest.raises(AdapterFormatError, match="base weights were trained too.*final_layernorm"):
        export_hf_adapter(bridge, model, tmp_path / "adapter", lora)
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a partial directory


def test_an_adapter_that_does_not_fit_its_base_is_refused(megatron_cpu, released, tmp_path):
    from safetensors.torch import load_file, save_file

    from gemma4vl.bridge.checkpoint import CheckpointError
    from gemma4vl.export import export_hf_adapter
    from gemma4vl.export.adapter_export import verify_adapter

    bridge, model, lora = lora_model(released.path, ["linear_qkv"], seed=2)
    report = export_hf_adapter(bridge, model, tmp_path / "adapter", lora)
    weights = report.path / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = "base_model.model.model.language_model.layers.1.self_attn.q_proj.lora_B.weight"
    tensors[key] = tensors[key][:-1]
    save_file(tensors, weights)
    with pytest.raises(CheckpointError, match=r"layers\.1\.self_attn\.q_proj\.lora_B\.weight' has shape"):
        verify_adapter(report.path, released.path)


def test_adapter_export_config_is_checked_before_training():
    from gemma4vl.bridge.adapters import peft_format_problems, routed_lora_problems

    assert peft_format_problems(PEFT_TARGETS) == [] and routed_lora_problems(PEFT_TARGETS) == []
    assert len(routed_lora_problems(["linear_fc1", "*.local_experts.*.linear_fc2", "linear_qkv"])) == 2
    (routed,) = peft_format_problems(["linear_fc1"])  # matches the shared and the routed experts
    assert "mlp.experts.local_experts.*.linear_fc1" in routed and "export.format=merged" in routed
    (nothing,) = peft_format_problems(["q_proj"])
    assert "'q_proj' matches none" in nothing


# (targets, adapted modules per layer, adapter parameters at rank 4 on the tiny fixture; its base has 399,952)
@pytest.mark.parametrize("targets, adapted, total", [
    (["linear_qkv", "linear_proj"], 2, 10_240),
    (PEFT_TARGETS, 4, 18_432),
])
def test_lora_parameter_counts_are_the_models(megatron_cpu, released, targets, adapted, total):
    """lora_parameter_counts (docs/lora.md's memory table uses it for the 26B model) counts the adapter
    parameters Megatron-Bridge's LoRA creates, target by target; the base stays frozen."""
    from gemma4vl.bridge import read_hf_config
    from gemma4vl.bridge.adapters import adapter_target, lora_parameter_counts
    from gemma4vl.config.container import _peft

    _, model = load_megatron(released.path)
    lora = _peft(SimpleNamespace(peft=PeftConfig(method="lora", rank=RANK, alpha=ALPHA, target_modules=targets)))
    model = lora(model, training=True)  # as in training: the base frozen, the adapters trainable
    got: dict[str, int] = {}
    for name, p in model[0].named_parameters():
        assert p.requires_grad == (".adapter." in name), name
        if p.requires_grad:
            target = adapter_target(name.partition(".adapter.")[0])
            got[target] = got.get(target, 0) + p.numel()
    expected = {t: n for t, n in lora_parameter_counts(read_hf_config(released.path), RANK).items() if t in got}
    assert len(got) == adapted and got == expected and sum(got.values()) == total
    assert sum(p.numel() for p in model[0].parameters()) == 399_952 + total
