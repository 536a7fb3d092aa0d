"""Grouped routed experts (gemma4vl.models.experts) against Megatron-Core's SequentialMLP, which they replace.

- CPU: the reference path is SequentialMLP's computation bit for bit: outputs and every gradient (tokens,
  routing weights, weights) are ``torch.equal``, with an expert that gets no tokens, one local expert, and frozen
  weights; the grouped-GEMM path (forward only: torch has no CPU backward for grouped_mm) agrees within fp32
  rounding.
- Conversion: the grouped parameters are the checkpoint's expert tensors (fc1 = gate_up_proj viewed
  [E, 2, I, H]); under expert parallel 2 and expert tensor parallel 2 (2 gloo processes) each rank holds its
  slice, the logits equal the single process's, the export is bit-identical to it, and the single process's
  distributed checkpoint loads onto the layout (resharded) bit for bit.
- CUDA (``gpu``): the grouped-GEMM path's forward and backward against the reference loop in bf16.
"""

from __future__ import annotations

import pytest
import torch

from gemma4vl.testing.distributed import run_distributed
from gemma4vl.testing.fixtures import load_checkpoint_tensors
from gemma4vl.testing.megatron_harness import forward_logits, load_megatron, synthetic_batch

HIDDEN, WIDTH = 32, 24


def _config(num_experts: int, dtype=torch.float32):
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=1, hidden_size=HIDDEN, num_attention_heads=4, ffn_hidden_size=64, num_moe_experts=num_experts,
        moe_ffn_hidden_size=WIDTH, moe_router_topk=2, gated_linear_unit=True, add_bias_linear=False,
        activation_func=lambda x: F.gelu(x, approximate="tanh"), bias_activation_fusion=False,
        use_cpu_initialization=True, perform_initialization=False, params_dtype=dtype,
        moe_token_dispatcher_type="alltoall", gradient_accumulation_fusion=False,
    )


def _pair(num_experts: int, dtype=torch.float32, seed: int = 0):
    """(SequentialMLP, Gemma4GroupedExperts) with the same random weights."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.experts import SequentialMLP

    from gemma4vl.models.experts import Gemma4GroupedExperts

    config = _config(num_experts, dtype)
    groups = ProcessGroupCollection.use_mpu_process_groups()
    sequential = SequentialMLP(num_experts, config, MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                                                  linear_fc2=RowParallelLinear),
                               pg_collection=groups)
    grouped = Gemma4GroupedExperts(num_experts, config, pg_collection=groups)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for e, expert in enumerate(sequential.local_experts):
            fc1 = torch.randn(2 * WIDTH, HIDDEN, generator=g).mul_(0.2).to(dtype)
            fc2 = torch.randn(HIDDEN, WIDTH, generator=g).mul_(0.2).to(dtype)
            expert.linear_fc1.weight.copy_(fc1)
            expert.linear_fc2.weight.copy_(fc2)
            grouped.fc1_weight[e].copy_(fc1.view(2, WIDTH, HIDDEN))
            grouped.fc2_weight[e].copy_(fc2)
    return sequential, grouped


def _inputs(counts: list[int], dtype=torch.float32, seed: int = 1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    tokens = sum(counts)
    x = torch.randn(tokens, HIDDEN, generator=g).to(device=device, dtype=dtype).requires_grad_()
    probs = torch.rand(tokens, generator=g).to(device).requires_grad_()  # fp32, as the router gives them
    grad_out = torch.randn(tokens, HIDDEN, generator=g).to(device=device, dtype=dtype)
    return x, torch.tensor(counts), probs, grad_out


def _run(module, x, counts, probs, grad_out, path=None):
    x = x.detach().clone().requires_grad_()
    probs = probs.detach().clone().requires_grad_()
    out = (path or module)(x, counts, probs)
    out = out[0] if isinstance(out, tuple) else out
    out.backward(grad_out)
    return out.detach(), x.grad, probs.grad


def _sequential_weight_grads(sequential):
    fc1 = torch.stack([e.linear_fc1.weight.grad for e in sequential.local_experts])
    fc2 = torch.stack([e.linear_fc2.weight.grad for e in sequential.local_experts])
    return fc1.view(fc1.shape[0], 2, WIDTH, HIDDEN), fc2


@pytest.mark.parametrize("counts", [[5, 0, 9, 3], [17]], ids=["4_experts_one_empty", "1_expert"])
def test_reference_path_is_sequential_mlp_bit_for_bit(megatron_cpu, counts):
    sequential, grouped = _pair(len(counts))
    x, tokens_per_expert, probs, grad_out = _inputs(counts)
    ref = _run(sequential, x, tokens_per_expert, probs, grad_out)
    got = _run(grouped, x, tokens_per_expert, probs, grad_out)
    for name, a, b in zip(("output", "token grad", "routing-weight grad"), ref, got):
        assert torch.equal(a, b), f"{name}: max |diff| {(a - b).abs().max().item()}"
    fc1, fc2 = _sequential_weight_grads(sequential)
    assert torch.equal(grouped.fc1_weight.grad, fc1)
    assert torch.equal(grouped.fc2_weight.grad, fc2)
    if 0 in counts:  # an expert without tokens gets an exact zero gradient, as in SequentialMLP
        empty = counts.index(0)
        assert torch.count_nonzero(grouped.fc1_weight.grad[empty]) == 0


def test_frozen_experts_give_token_gradients_only(megatron_cpu):
    sequential, grouped = _pair(4)
    for module in (sequential, grouped):
        module.requires_grad_(False)
    x, counts, probs, grad_out = _inputs([3, 4, 0, 6])
    ref = _run(sequential, x, counts, probs, grad_out)
    got = _run(grouped, x, counts, probs, grad_out)
    assert all(torch.equal(a, b) for a, b in zip(ref, got))
    assert grouped.fc1_weight.grad is None and grouped.fc2_weight.grad is None


def test_grouped_gemm_forward_matches_reference_on_cpu(megatron_cpu):
    """The grouped_mm path (CPU forward only) computes the same as the loop, within fp32 rounding."""
    _, grouped = _pair(4)
    x, counts, probs, _ = _inputs([7, 0, 12, 5])
    with torch.no_grad():
        ref = grouped.forward_reference(x, counts, probs)
        got = grouped.forward_grouped(x, counts, probs)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_grouped_parameters_are_the_checkpoint_expert_tensors(single_process_reference):
    """fc1_weight[e] is gate_up_proj[e] (gate rows, then up rows), fc2_weight[e] is down_proj[e], bit for bit."""
    hf_dir, model, _, _ = single_process_reference
    source = load_checkpoint_tensors(hf_dir)
    layers = model[0].language_model.decoder.layers
    for i, layer in enumerate(layers):
        experts = layer.mlp.experts
        gate_up = source[f"model.language_model.layers.{i}.experts.gate_up_proj"]
        down = source[f"model.language_model.layers.{i}.experts.down_proj"]
        assert torch.equal(experts.fc1_weight.detach().flatten(1, 2), gate_up)
        assert torch.equal(experts.fc2_weight.detach(), down)


def _expert_parallel_run(hf_dir, out_dir, ckpt_dir, parallel: dict):
    """Every rank: import with ``parallel``; this rank's expert slices, the logits, the export; then the model
    zeroed and reloaded from the single process's distributed checkpoint (resharded): equal to the import?"""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing, parallel_state as ps
    from transformers import AutoConfig

    from gemma4vl.export import export_hf_checkpoint
    from gemma4vl.runtime.distributed import initialize_model_parallel

    initialize_model_parallel("cpu", **parallel)
    bridge, model = load_megatron(hf_dir)
    experts = model[0].language_model.decoder.layers[0].mlp.experts
    slices = {"ep_rank": ps.get_expert_model_parallel_rank(), "etp_rank": ps.get_expert_tensor_parallel_rank(),
              "fc1": experts.fc1_weight.detach().clone(), "fc2": experts.fc2_weight.detach().clone()}
    logits = forward_logits(model, synthetic_batch(AutoConfig.from_pretrained(hf_dir), seed=11))
    export_hf_checkpoint(bridge, model, out_dir)
    imported = {k: v.detach().clone() for k, v in model[0].named_parameters() if ".experts." in k}
    with torch.no_grad():
        for p in model[0].parameters():
            p.zero_()
    model[0].load_state_dict(dist_checkpointing.load(model[0].sharded_state_dict(), str(ckpt_dir)), strict=False)
    reloaded = dict(model[0].named_parameters())
    slices["checkpoint_mismatches"] = [k for k in imported if not torch.equal(imported[k], reloaded[k])]
    slices["checkpoint_tensors"] = len(imported)
    dist.barrier()
    return slices, (logits if dist.get_rank() == 0 else None)


@pytest.fixture(scope="module")
def reference(single_process_reference, tmp_path_factory):
    """Single-process logits, export (conftest) and distributed checkpoint of the tiny fp32 checkpoint."""
    from megatron.core import dist_checkpointing

    hf_dir, model, logits, export = single_process_reference
    ckpt = tmp_path_factory.mktemp("reference_dist_ckpt")
    dist_checkpointing.save(model[0].sharded_state_dict(), str(ckpt))
    return hf_dir, logits, export, ckpt


@pytest.mark.parametrize("parallel", [{"expert_model_parallel_size": 2}, {"expert_tensor_parallel_size": 2}],
                         ids=["ep2", "etp2"])
def test_expert_parallel_slices_logits_export_and_checkpoint(reference, tmp_path, parallel):
    hf_dir, ref_logits, ref_export, ckpt = reference
    results = run_distributed(_expert_parallel_run, 2, hf_dir, tmp_path / "export", ckpt, parallel, timeout=600)
    gate_up = ref_export["model.language_model.layers.0.experts.gate_up_proj"]
    down = ref_export["model.language_model.layers.0.experts.down_proj"]
    experts, width = gate_up.shape[0], down.shape[2]
    for slices, _ in results:
        fc1, fc2 = slices["fc1"], slices["fc2"]
        e0, w0 = slices["ep_rank"] * fc1.shape[0], slices["etp_rank"] * fc1.shape[2]
        full = gate_up.view(experts, 2, width, -1)
        assert torch.equal(fc1, full[e0:e0 + fc1.shape[0], :, w0:w0 + fc1.shape[2]])
        assert torch.equal(fc2, down[e0:e0 + fc2.shape[0], :, w0:w0 + fc2.shape[2]])
        # The single process's checkpoint, resharded onto this layout, gives back the imported weights.
        assert slices["checkpoint_tensors"] > 0 and slices["checkpoint_mismatches"] == []
    assert len({(s["ep_rank"], s["etp_rank"]) for s, _ in results}) == 2  # the ranks hold different slices
    logits = results[0][1]
    assert (logits - ref_logits).abs().max().item() <= 1e-5
    exported = load_checkpoint_tensors(tmp_path / "export")
    assert sorted(exported) == sorted(ref_export)
    assert [k for k in ref_export if not torch.equal(exported[k], ref_export[k])] == []


@pytest.mark.gpu
@pytest.mark.parametrize("counts", [[96, 0, 160, 40, 8, 1, 300, 51], [64]], ids=["8_experts_one_empty", "1_expert"])
def test_grouped_gemm_forward_backward_on_cuda(megatron_cpu, counts):
    """bf16 on CUDA: the grouped-GEMM path (forward and backward) against the reference loop on the same GPU.
    Both are bf16 GEMMs with fp32 accumulation; they differ in accumulation order and tiling only."""
    _, grouped = _pair(len(counts), dtype=torch.bfloat16)
    grouped = grouped.cuda()
    x, tokens_per_expert, probs, grad_out = _inputs(counts, dtype=torch.bfloat16, device="cuda")

    def run(path):
        grouped.zero_grad(set_to_none=True)
        out, gx, gp = _run(grouped, x, tokens_per_expert, probs, grad_out, path=path)
        return out, gx, gp, grouped.fc1_weight.grad.clone(), grouped.fc2_weight.grad.clone()

    ref = run(grouped.forward_reference)
    got = run(grouped.forward)  # CUDA + bf16 takes the grouped path
    names = ("output", "token grad", "routing-weight grad", "fc1 grad", "fc2 grad")
    for name, a, b in zip(names, ref, got):
        scale = a.float().abs().max().item()
        diff = (a.float() - b.float()).abs().max().item()
        assert diff <= 2e-2 * scale, f"{name}: max |diff| {diff} vs max |ref| {scale}"
    # An expert without tokens gets an exact zero weight gradient on the grouped path too.
    if 0 in counts:
        assert torch.count_nonzero(got[3][counts.index(0)]) == 0
