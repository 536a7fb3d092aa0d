"""The Gemma 4 VL bridge on the tiny MoE fixture (randomised norms, scales, per-expert scales, layer scalars).

- logit parity with transformers (fp32, 1e-4), text-only and with images, both config.json layouts;
- hidden states after a sliding and after a full-attention layer;
- HF -> Megatron -> HF round trip bit-exact for every tensor (fp32 and bf16 sources, model in fp32);
- after 5 optimizer steps that change norms, router and shared expert, the export reloaded in transformers
  computes the Megatron model's logits (and would not with the checkpoint's original norms).
"""

import json
from dataclasses import replace

import pytest
import torch

from gemma4vl.testing.fixtures import load_checkpoint_tensors
from gemma4vl.testing.megatron_harness import forward_logits, hf_model, load_megatron, synthetic_batch
from gemma4vl.testing.pytest_fixtures import tiny_checkpoint

ATOL = 1e-4


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory, layout="released", dtype="float32")


@pytest.mark.parametrize("layout", ["released", "per_layer_config"])
@pytest.mark.parametrize("images", [False, True])
def test_logit_parity_with_transformers(megatron_cpu, tmp_path_factory, layout, images):
    info = tiny_checkpoint(tmp_path_factory, layout=layout, dtype="float32")
    _, model = load_megatron(info.path)
    batch = synthetic_batch(info.config, seed=3, images=images)
    with torch.no_grad():
        ref = hf_model(info.path)(**batch.hf_kwargs()).logits
    ours = forward_logits(model, batch)
    valid = batch.segment_ids > 0
    assert ours.shape == ref.shape
    diff = (ours - ref)[valid].abs().max().item()
    assert diff <= ATOL, f"max |logit diff| {diff}"
    assert ref[valid].abs().max().item() > 1.0  # the comparison is not between near-zero logits


def test_hidden_states_per_layer_type(megatron_cpu, released):
    """Hidden states after layer 0 (sliding) and layer 1 (full attention, K=V) match the reference's."""
    _, model = load_megatron(released.path)
    batch = synthetic_batch(released.config, seed=5)
    layers = model[0].language_model.decoder.layers
    assert [layers[0].layer_type, layers[1].layer_type] == ["sliding_attention", "full_attention"]
    captured = {}
    hooks = [layers[i].register_forward_hook(lambda m, a, out, i=i: captured.__setitem__(i, out[0]))
             for i in (0, 1)]
    forward_logits(model, batch)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        ref = hf_model(released.path)(**batch.hf_kwargs(), output_hidden_states=True).hidden_states
    valid = batch.segment_ids > 0
    for i in (0, 1):
        ours = captured[i].transpose(0, 1)  # [s, b, h] -> [b, s, h]
        diff = (ours - ref[i + 1])[valid].abs().max().item()
        assert diff <= ATOL, f"layer {i}: max |hidden diff| {diff}"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_is_bit_exact(megatron_cpu, tmp_path_factory, tmp_path, dtype):
    from gemma4vl.export import export_hf_checkpoint

    info = tiny_checkpoint(tmp_path_factory, layout="per_layer_config", dtype=dtype, max_shard_size="300KB")
    bridge, model = load_megatron(info.path, params_dtype=torch.float32)
    report = export_hf_checkpoint(bridge, model, tmp_path / "export", max_shard_bytes=200_000)
    assert report.dtype == getattr(torch, dtype) and len(report.shards) > 1
    source, exported = load_checkpoint_tensors(info.path), load_checkpoint_tensors(report.path)
    assert sorted(exported) == sorted(source)
    not_exact = [k for k in source if not torch.equal(source[k], exported[k])]
    assert not_exact == []
    assert {k: v.dtype for k, v in exported.items()} == {k: v.dtype for k, v in source.items()}
    src_cfg = json.loads((info.path / "config.json").read_text())
    out_cfg = json.loads((report.path / "config.json").read_text())
    assert out_cfg == src_cfg  # same layout (per_layer_config), same dtype
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json", "generation_config.json"):
        if (info.path / name).exists():
            assert (report.path / name).read_bytes() == (info.path / name).read_bytes()


@pytest.mark.parametrize("params_dtype", [torch.float32, torch.bfloat16])
def test_import_fuses_router_and_shared_expert_exactly(megatron_cpu, released, params_dtype):
    """The copy threads fuse while copying (fusion.fuse_into): each fused parameter is exactly
    fuse(checkpoint tensor, factor) rounded to the model's dtype, as a whole-tensor fuse would give."""
    from gemma4vl.bridge.fusion import fuse, router_factor, shared_factor

    bridge, model = load_megatron(released.path, params_dtype=params_dtype)
    src = load_checkpoint_tensors(released.path)
    model_bridge = bridge._model_bridge  # Megatron-Bridge's hook (its streaming loader) still returns fused tensors
    params = dict(model[0].named_parameters())
    hidden = model[0].config.hidden_size
    for layer in range(model[0].config.num_layers):
        hf, mg = f"model.language_model.layers.{layer}.", f"language_model.decoder.layers.{layer}.mlp."
        w2 = src[hf + "pre_feedforward_layernorm_2.weight"]
        router = fuse(src[hf + "router.proj.weight"], router_factor(src[hf + "router.scale"], w2, hidden, "t"))
        shared = shared_factor(src[hf + "pre_feedforward_layernorm.weight"], w2, "t")
        fc1 = torch.cat([fuse(src[hf + "mlp.gate_proj.weight"], shared), fuse(src[hf + "mlp.up_proj.weight"], shared)])
        assert params[mg + "router.weight"].dtype == params_dtype
        assert torch.equal(params[mg + "router.weight"], router.to(params_dtype))
        assert torch.equal(params[mg + "shared_experts.linear_fc1.weight"], fc1.to(params_dtype))
        assert not torch.equal(fc1, torch.cat([src[hf + "mlp.gate_proj.weight"], src[hf + "mlp.up_proj.weight"]]))
        assert torch.equal(model_bridge.maybe_modify_loaded_hf_weight(hf + "router.proj.weight", src), router)
        hooked = model_bridge.maybe_modify_loaded_hf_weight(
            {"gate": hf + "mlp.gate_proj.weight", "up": hf + "mlp.up_proj.weight"}, src)
        assert torch.equal(torch.cat([hooked["gate"], hooked["up"]]), fc1)


@pytest.mark.parametrize("params_dtype", [torch.float32, torch.bfloat16])
def test_import_writes_qkv_like_the_stock_merge(megatron_cpu, released, params_dtype):
    """Without TP the importer copies q, k and v straight into their rows of linear_qkv (mappings.copy_plan);
    the parameter equals Megatron-Bridge's own merge_qkv_weights, for sliding layers and for K=V full layers
    (values = keys), and a plan whose pieces do not fit is an error naming the parameter's shape."""
    from megatron.bridge.models.conversion.param_mapping import merge_qkv_weights

    from gemma4vl.bridge.mappings import qkv_copy_plan

    _, model = load_megatron(released.path, params_dtype=params_dtype)
    src = load_checkpoint_tensors(released.path)
    layers = model[0].language_model.decoder.layers
    seen = set()
    for layer in layers:
        attn = f"model.language_model.layers.{layer.layer_number - 1}.self_attn."
        config = layer.self_attention.linear_qkv.config
        assert config.num_attention_heads // config.num_query_groups > 1  # interleaving is exercised
        q, k = src[attn + "q_proj.weight"], src[attn + "k_proj.weight"]
        v = src.get(attn + "v_proj.weight", k)
        seen.add((layer.layer_type, attn + "v_proj.weight" in src))
        expected = merge_qkv_weights(config, q, k, v).to(params_dtype)
        assert torch.equal(layer.self_attention.linear_qkv.weight, expected)
    assert seen == {("sliding_attention", True), ("full_attention", False)}
    param = torch.empty_like(layers[0].self_attention.linear_qkv.weight)
    config = layers[0].self_attention.linear_qkv.config
    with pytest.raises(ValueError, match=r"linear_qkv of shape .* does not fit"):
        qkv_copy_plan(config, param, torch.zeros(1, param.shape[1]), torch.zeros(1, param.shape[1]),
                      torch.zeros(1, param.shape[1]))


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_fuse_into_equals_a_whole_tensor_fuse(out_dtype):
    from gemma4vl.bridge.fusion import fuse, fuse_into

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(37, 19, generator=g).to(torch.bfloat16)
    factor = torch.rand(19, generator=g, dtype=torch.float64) * 3 + 0.1
    out = torch.empty(37, 19, dtype=out_dtype)
    fuse_into(out, weight, factor, chunk_elements=19 * 5)  # 8 blocks, the last one 2 rows
    assert torch.equal(out, fuse(weight, factor).to(out_dtype))
    with pytest.raises(ValueError, match=r"out \[19, 37\].*weight \[37, 19\]"):
        fuse_into(torch.empty(19, 37), weight, factor)


def _train(model, batch, steps=5, lr=2e-2):
    params = [p for p in model[0].parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    labels = batch.input_ids.roll(-1, dims=1)
    labels[batch.segment_ids == 0] = -100
    losses = []
    model[0].train()
    for _ in range(steps):
        opt.zero_grad()
        loss = model[0](**replace(batch, labels=labels).model_kwargs()).sum() / (labels != -100).sum()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model[0].eval()
    return losses


def test_export_after_training_computes_the_trained_model(megatron_cpu, released, tmp_path):
    from gemma4vl.bridge.fusion import router_factor, unfuse
    from gemma4vl.export import export_hf_checkpoint

    bridge, model = load_megatron(released.path)
    batch = synthetic_batch(released.config, seed=7)
    layer = model[0].language_model.decoder.layers[0]
    before = {n: t.detach().clone() for n, t in (
        ("pre_mlp", layer.pre_mlp_layernorm.weight), ("router", layer.mlp.router.weight),
        ("shared_fc1", layer.mlp.shared_experts.linear_fc1.weight))}
    losses = _train(model, batch)
    assert losses[-1] < losses[0]
    for name, old in before.items():  # norms, router and shared expert all trained
        now = {"pre_mlp": layer.pre_mlp_layernorm.weight, "router": layer.mlp.router.weight,
               "shared_fc1": layer.mlp.shared_experts.linear_fc1.weight}[name]
        assert (now - old).abs().max().item() > 1e-3, name

    trained = forward_logits(model, batch)
    report = export_hf_checkpoint(bridge, model, tmp_path / "export")
    with torch.no_grad():
        reloaded = hf_model(report.path)(**batch.hf_kwargs()).logits
    valid = batch.segment_ids > 0
    diff = (reloaded - trained)[valid].abs().max().item()
    assert diff <= ATOL, f"export vs trained Megatron model: max |logit diff| {diff}"

    # The same check would catch an un-fusion with the checkpoint's original norms: rebuild layer 0's router
    # from the original pre_feedforward_layernorm_2 and watch the reloaded logits move well past tolerance.
    exported = load_checkpoint_tensors(report.path)
    source = load_checkpoint_tensors(released.path)
    p = "model.language_model.layers.0."
    hidden = exported[p + "router.proj.weight"].shape[1]
    stale = exported.copy()
    for i in range(len(released.config.text_config.layer_types)):
        q = f"model.language_model.layers.{i}."
        fused_now = model[0].language_model.decoder.layers[i].mlp.router.weight.detach()
        stale[q + "router.proj.weight"] = unfuse(
            fused_now, router_factor(source[q + "router.scale"], source[q + "pre_feedforward_layernorm_2.weight"],
                                     hidden, where=f"layer {i}"), where=f"layer {i}")
    stale_model = hf_model(report.path)
    stale_model.load_state_dict(stale, strict=False)
    with torch.no_grad():
        stale_logits = stale_model(**batch.hf_kwargs()).logits
    assert (stale_logits - trained)[valid].abs().max().item() > 100 * ATOL


def test_lora_qkv_output_split_tells_layer_types_apart_by_size(megatron_cpu, released):
    """A LoRA B matrix of linear_qkv is split into q/k/v with the sliding or the full layers' shape, whichever
    its size matches; on K=V (full) layers v_proj is reported absent."""
    from megatron.bridge.models.conversion.param_mapping import merge_qkv_weights
    from megatron.bridge.models.conversion.peft_bridge import ABSENT_PROJECTION

    from gemma4vl.bridge import Gemma4VLBridge
    from gemma4vl.bridge.gemma4vl_bridge import _AttentionShape

    _, model = load_megatron(released.path)
    config = model[0].config
    arch = config.gemma4
    rank = 3
    for layer_type in ("sliding_attention", "full_attention"):
        spec = arch.attention(layer_type)
        # merge_qkv_weights reshapes with hidden_size: here the LoRA rank is the input dimension.
        shape_cfg = _AttentionShape(config.num_attention_heads, spec.num_kv_heads, spec.head_dim, rank)
        q = torch.randn(config.num_attention_heads * spec.head_dim, rank)
        k = torch.randn(spec.num_kv_heads * spec.head_dim, rank)
        v = k if spec.k_eq_v else torch.randn_like(k)
        packed = merge_qkv_weights(shape_cfg, q, k, v)
        split = Gemma4VLBridge()._split_qkv_linear_out_weight(model, packed)
        assert torch.equal(split["q_proj"], q) and torch.equal(split["k_proj"], k)
        if spec.k_eq_v:
            assert split["v_proj"] is ABSENT_PROJECTION
        else:
            assert torch.equal(split["v_proj"], v)
    with pytest.raises(ValueError, match="matches 0 attention layer types"):
        Gemma4VLBridge()._split_qkv_linear_out_weight(model, torch.randn(100, rank))
