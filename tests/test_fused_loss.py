"""The chunked loss (gemma4vl.models.loss) against the plain output projection + soft-cap + cross-entropy.

- one chunk covering the batch: loss, hidden-state and weight gradients are bit-identical to the plain path
  (Megatron-Core's linear + ``cap * tanh(x / cap)`` + ``vocab_parallel_cross_entropy``), ignored labels included;
- several chunks: equal within fp32 rounding, and to a float64 ``F.cross_entropy`` reference;
- the model: ``Gemma4VLModel``'s per-token loss and every parameter gradient equal the plain computation on its
  own logits, bit for bit;
- memory: what the chunked loss keeps for backward is O(tokens), not O(tokens x vocab);
- bf16 weights under Megatron DDP: chunk gradients land in ``main_grad`` (``grad_added_to_main_grad``);
- tensor parallel 2 (vocab-parallel, with and without sequence parallel; 2 gloo processes): equal to one process;
- CUDA (``gpu``): bf16 forward and backward against the plain path, and a lower memory peak.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from gemma4vl.models.loss import softcapped_cross_entropy
from gemma4vl.testing.distributed import run_distributed

CAP = 30.0
IGNORE = -100


def _data(s=13, b=3, h=16, v=50, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(s, b, h, generator=g) * 2).to(device=device, dtype=dtype)
    weight = (torch.randn(v, h, generator=g) * 0.5).to(device=device, dtype=dtype)
    labels = torch.randint(0, v, (b, s), generator=g).to(device)
    labels[0, :4] = IGNORE
    labels[-1, -3:] = IGNORE
    grad = torch.rand(b, s, generator=g).to(device)
    return hidden, weight, labels, grad


def _plain(hidden, weight, labels, tp_group=None):
    """The computation the model did before (and still does for logits): Megatron's linear, soft-cap,
    vocab_parallel_cross_entropy on [s, b] labels, zero at ignored positions."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel.layers import linear_with_grad_accumulation_and_async_allreduce

    tp_group = tp_group or ps.get_tensor_model_parallel_group()
    logits = linear_with_grad_accumulation_and_async_allreduce(hidden, weight, None, False, False, False,
                                                               tp_group=tp_group)
    logits = CAP * torch.tanh(logits / CAP)
    ignored = labels == IGNORE
    loss = tensor_parallel.vocab_parallel_cross_entropy(logits, labels.masked_fill(ignored, 0).t().contiguous(),
                                                        tp_group=tp_group)
    return loss.transpose(0, 1).contiguous().masked_fill(ignored, 0.0)


def _chunked(hidden, weight, labels, chunk_tokens, **kwargs):
    ignored = labels == IGNORE
    loss = softcapped_cross_entropy(hidden, weight, labels.masked_fill(ignored, 0), CAP,
                                    chunk_tokens=chunk_tokens, **kwargs)
    return loss.masked_fill(ignored, 0.0)


def _loss_and_grads(fn, hidden, weight, labels, grad, **kwargs):
    hidden = hidden.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    loss = fn(hidden, weight, labels, **kwargs)
    loss.backward(grad)
    return loss.detach(), hidden.grad, weight.grad


def test_one_chunk_is_the_plain_computation_bit_for_bit(megatron_cpu):
    hidden, weight, labels, grad = _data()
    ref = _loss_and_grads(_plain, hidden, weight, labels, grad)
    got = _loss_and_grads(_chunked, hidden, weight, labels, grad, chunk_tokens=hidden.shape[0] * hidden.shape[1])
    for name, a, b in zip(("loss", "hidden grad", "weight grad"), ref, got):
        assert torch.equal(a, b), f"{name}: max |diff| {(a - b).abs().max().item()}"
    assert torch.count_nonzero(got[0][labels == IGNORE]) == 0
    # Ignored positions contribute no gradient to their hidden states.
    assert torch.count_nonzero(got[1].transpose(0, 1)[labels == IGNORE]) == 0


@pytest.mark.parametrize("chunk_tokens", [1, 7, 16])
def test_chunks_equal_the_plain_computation_and_float64(megatron_cpu, chunk_tokens):
    hidden, weight, labels, grad = _data(seed=chunk_tokens)
    ref = _loss_and_grads(_plain, hidden, weight, labels, grad)
    got = _loss_and_grads(_chunked, hidden, weight, labels, grad, chunk_tokens=chunk_tokens)
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)

    def float64(h, w, y):  # the definition: softcapped logits, mean-free per-token cross-entropy
        logits = CAP * torch.tanh((h @ w.t()) / CAP)
        loss = F.cross_entropy(logits.transpose(0, 1).reshape(-1, w.shape[0]), y.reshape(-1),
                               ignore_index=IGNORE, reduction="none")
        return loss.view_as(y)

    exact = _loss_and_grads(float64, hidden.double(), weight.double(), labels, grad.double())
    for a, b in zip(exact, got):
        torch.testing.assert_close(b.double(), a, rtol=1e-5, atol=1e-5)


def test_saved_for_backward_is_per_token_not_per_logit(megatron_cpu):
    """The plain path keeps [tokens, vocab] fp32 softmax (and more) for backward; the chunked loss keeps the
    hidden states, the weight and three fp32 numbers per token."""
    hidden, weight, labels, _ = _data(s=64, b=2, h=16, v=4096)
    tokens, vocab = 128, 4096

    def saved_bytes(fn, **kwargs):
        seen = {}

        def pack(t):
            seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
            return t

        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(h, w, labels, **kwargs)
        return sum(seen.values())

    plain = saved_bytes(_plain)
    chunked = saved_bytes(_chunked, chunk_tokens=16)
    assert plain >= tokens * vocab * 4
    inputs = hidden.numel() * 4 + weight.numel() * 4
    assert chunked <= inputs + tokens * 64, (chunked, inputs)


def test_bf16_weight_gradient_goes_to_main_grad(megatron_cpu):
    """Megatron DDP's protocol: chunk products are added into main_grad (fp32 here), the returned gradient is
    zeros (DDP skips it: grad_added_to_main_grad), or nothing for a tied embedding (zero_out_wgrad)."""
    hidden, weight, labels, grad = _data(s=32, b=2, h=16, v=64)
    ref = _loss_and_grads(_plain, hidden, weight, labels, grad)
    for tied in (False, True):
        w = weight.to(torch.bfloat16).requires_grad_()
        w.main_grad = torch.zeros(w.shape, dtype=torch.float32)
        w.grad_added_to_main_grad = False
        if tied:
            w.zero_out_wgrad = True
        h = hidden.to(torch.bfloat16).requires_grad_()
        _chunked(h, w, labels, chunk_tokens=10).backward(grad)
        assert w.grad_added_to_main_grad
        assert (w.grad is None) if tied else (torch.count_nonzero(w.grad) == 0)
        scale = ref[2].abs().max().item()
        assert (w.main_grad - ref[2]).abs().max().item() <= 2e-2 * scale


def _tensor_parallel_run(sequence_parallel: bool):
    """Every rank: TP 2; the vocab-parallel chunked loss of the full data (hidden states split along the
    sequence with sequence parallel), its gradients gathered."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from gemma4vl.runtime.distributed import initialize_model_parallel

    initialize_model_parallel("cpu", tensor_model_parallel_size=2)
    rank, group = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_group()
    hidden, weight, labels, grad = _data(s=14, v=50)
    w = weight.chunk(2)[rank].clone().requires_grad_()
    h_full = hidden.clone().requires_grad_()
    h = h_full.chunk(2)[rank] if sequence_parallel else h_full
    loss = _chunked(h, w, labels, chunk_tokens=9, tp_group=group, sequence_parallel=sequence_parallel)
    loss.backward(grad)
    parts = [torch.empty_like(w.grad) for _ in range(2)]
    dist.all_gather(parts, w.grad.contiguous(), group=group)
    hidden_grad = h_full.grad
    if sequence_parallel:  # each rank holds the gradient of its own sequence half
        halves = [torch.empty_like(hidden_grad.chunk(2)[0]) for _ in range(2)]
        dist.all_gather(halves, hidden_grad.chunk(2)[rank].contiguous(), group=group)
        hidden_grad = torch.cat(halves)
    return loss.detach(), hidden_grad, torch.cat(parts)


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2_sp"])
def test_tensor_parallel_equals_one_process(megatron_cpu, sequence_parallel):
    hidden, weight, labels, grad = _data(s=14, v=50)
    ref = _loss_and_grads(_chunked, hidden, weight, labels, grad, chunk_tokens=9)
    results = run_distributed(_tensor_parallel_run, 2, sequence_parallel, timeout=300)
    for got in results:
        for a, b in zip(ref, got):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_model_loss_and_gradients_equal_the_plain_path(megatron_cpu, tmp_path_factory):
    """Gemma4VLModel with labels (chunked loss) vs its own logits path + Megatron's cross-entropy: the per-token
    loss and every parameter gradient, bit for bit (fp32, the batch in one chunk)."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from transformers import AutoConfig

    from gemma4vl.testing.megatron_harness import load_megatron, synthetic_batch
    from gemma4vl.testing.pytest_fixtures import tiny_checkpoint

    info = tiny_checkpoint(tmp_path_factory, layout="released", dtype="float32")
    _, model = load_megatron(info.path)
    model = model[0]
    model.train()
    batch = synthetic_batch(AutoConfig.from_pretrained(info.path), seed=3, seq=40)
    labels = torch.roll(batch.input_ids, -1, 1)
    labels[:, ::3] = IGNORE
    weights = torch.rand(labels.shape, generator=torch.Generator().manual_seed(0))

    def grads(loss):
        model.zero_grad(set_to_none=True)
        (loss * weights).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    fused = model(**replace(batch, labels=labels).model_kwargs())
    fused_grads = grads(fused)
    logits = model(**batch.model_kwargs())  # [b, s, V], soft-capped
    ignored = labels == IGNORE
    plain = tensor_parallel.vocab_parallel_cross_entropy(
        logits.transpose(0, 1).contiguous(), labels.masked_fill(ignored, 0).t().contiguous(),
        tp_group=ps.get_tensor_model_parallel_group()).t().masked_fill(ignored, 0.0)
    plain_grads = grads(plain)
    assert torch.equal(fused, plain)
    assert sorted(fused_grads) == sorted(plain_grads)
    assert [n for n in plain_grads if not torch.equal(fused_grads[n], plain_grads[n])] == []


@pytest.mark.gpu
def test_bf16_chunked_loss_on_cuda(megatron_cpu):
    """CUDA, bf16, Gemma-4-like vocabulary slice: loss and gradients agree with the plain path, and the peak
    memory of forward + backward is a fraction of the plain path's."""
    hidden, weight, labels, grad = _data(s=1024, b=2, h=512, v=65536, dtype=torch.bfloat16, device="cuda")

    def peak(fn, **kwargs):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = _loss_and_grads(fn, hidden, weight, labels, grad, **kwargs)
        torch.cuda.synchronize()
        return out, torch.cuda.max_memory_allocated() - base

    ref, plain_peak = peak(_plain)
    got, chunked_peak = peak(_chunked, chunk_tokens=256)
    torch.testing.assert_close(got[0], ref[0], rtol=2e-2, atol=2e-2)  # fp32 losses from bf16 logits
    for name, a, b in zip(("hidden grad", "weight grad"), ref[1:], got[1:]):
        scale = a.float().abs().max().item()
        diff = (a.float() - b.float()).abs().max().item()
        assert diff <= 3e-2 * scale, f"{name}: max |diff| {diff} vs max |ref| {scale}"
    logits_fp32 = 2048 * 65536 * 4
    assert plain_peak >= logits_fp32
    assert chunked_peak < plain_peak / 3, (chunked_peak, plain_peak)
