"""The language-model loss without [tokens, vocabulary] logits: output projection + final logit soft-cap +
(vocab-parallel) cross-entropy, a chunk of tokens at a time.

Plain computation (what ``Gemma4LanguageModel`` did before, and still does when no labels are given):

    logits = hidden @ W.T                       [tokens, V/tp], in the weight dtype
    capped = cap * tanh(logits / cap)
    loss   = vocab_parallel_cross_entropy(capped, labels)   (fp32 internally)

which holds the logits in the weight dtype, again in fp32, and the fp32 softmax until backward: about
3 x 4 bytes x tokens x V/tp (24 GiB at 8k tokens and Gemma 4's 262,144-token vocabulary).

Here the forward pass runs ``chunk_tokens`` tokens at a time and keeps only three fp32 numbers per token (the
logit maximum, the sum of exponentials, the loss); the backward pass recomputes each chunk's logits and turns
them into the chunk's gradients at once. Peak: one chunk's logits (see :func:`loss_chunk_tokens`), for one
extra projection GEMM in backward. Every per-chunk step is the plain path's operation, in the same order:
Megatron-Core's ``LinearWithGradAccumulationAndAsyncCommunication`` matmuls, autograd's soft-cap derivative
(``tanh_backward``), and ``VocabParallelCrossEntropy``'s forward and backward steps, with the same
tensor-parallel all-reduces. So when one chunk covers the micro batch the result is bit-identical to the plain
path (fp32); with several chunks only the summation of the weight gradient over chunks differs
(tests/test_fused_loss.py).

Weight gradient precision: fp32 weights get the fp32 sum of the chunks' products; bf16 weights under
Megatron's DDP get each chunk's product added straight into ``main_grad`` (as Megatron's
``gradient_accumulation_fusion`` does, with the ``grad_added_to_main_grad`` protocol), else an fp32 sum cast
once to bf16.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)
from megatron.core.tensor_parallel.utils import VocabUtility

LOSS_CHUNK_BYTES = 1 << 30
"""Budget of one chunk's fp32 logits (1 GiB): 1,024 tokens of a 262,144-token vocabulary per chunk (TP 1)."""


def loss_chunk_tokens(vocab_per_rank: int, chunk_bytes: int = LOSS_CHUNK_BYTES) -> int:
    """Tokens per loss chunk: as many as fit ``chunk_bytes`` of fp32 logits (at least 1)."""
    return max(1, chunk_bytes // (4 * vocab_per_rank))


def _all_reduce(tensor: torch.Tensor, op, group) -> None:
    if group is not None and group.size() > 1:
        torch.distributed.all_reduce(tensor, op=op, group=group)


class _ChunkedSoftcapCrossEntropy(torch.autograd.Function):
    """Per-token loss [N] of hidden [N, H] against the vocab-parallel weight [V/tp, H] (see module docstring)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, cap, chunk, tp_group):
        rank = tp_group.rank() if tp_group is not None else 0
        world = tp_group.size() if tp_group is not None else 1
        vocab = weight.shape[0]
        start, end = VocabUtility.vocab_range_from_per_partition_vocab_size(vocab, rank, world)
        n = hidden.shape[0]
        loss = torch.empty(n, dtype=torch.float32, device=hidden.device)
        maxima = torch.empty_like(loss)
        sums = torch.empty_like(loss)
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            logits, _ = _capped_logits(hidden[lo:hi], weight, cap)
            logits, chunk_max = VocabParallelCrossEntropy.calculate_logits_max(logits)
            _all_reduce(chunk_max, torch.distributed.ReduceOp.MAX, tp_group)
            target_mask, _, predicted, sum_exp, _ = VocabParallelCrossEntropy.calculate_predicted_logits(
                logits, labels[lo:hi], chunk_max, start, end)
            _all_reduce(predicted, torch.distributed.ReduceOp.SUM, tp_group)
            _all_reduce(sum_exp, torch.distributed.ReduceOp.SUM, tp_group)
            loss[lo:hi] = torch.log(sum_exp) - predicted
            maxima[lo:hi] = chunk_max
            sums[lo:hi] = sum_exp
            del logits
        ctx.save_for_backward(hidden, weight, labels, maxima, sums)
        ctx.cap, ctx.chunk, ctx.vocab_range = cap, chunk, (start, end)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, labels, maxima, sums = ctx.saved_tensors
        cap, chunk, (start, end) = ctx.cap, ctx.chunk, ctx.vocab_range
        n = hidden.shape[0]
        grad_hidden = torch.empty_like(hidden)
        weight_grad = _WeightGrad(weight, single_chunk=n <= chunk) if ctx.needs_input_grad[1] else None
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            h = hidden[lo:hi]
            capped, tanh = _capped_logits(h, weight, cap)
            # VocabParallelCrossEntropy's forward steps with the saved statistics: its softmax, bit for bit.
            logits = capped.float()
            logits -= maxima[lo:hi].unsqueeze(dim=-1)
            target_mask, masked_target, _ = _masked_targets(labels[lo:hi], start, end)
            torch.exp(logits, out=logits)
            softmax = logits.div_(sums[lo:hi].unsqueeze(dim=-1))
            grad_2d, arange_1d, softmax_update, grad_input = (
                VocabParallelCrossEntropy.prepare_gradient_calculation_operands(softmax, target_mask))
            grad = VocabParallelCrossEntropy.calculate_gradients(
                grad_2d, arange_1d, masked_target, softmax_update, grad_input, grad_loss[lo:hi])
            grad = grad.to(capped.dtype)  # autograd casts a Function's gradient to its input's dtype
            if cap is not None:  # autograd's derivative of cap * tanh(logits / cap)
                grad = torch.ops.aten.tanh_backward(grad * cap, tanh) / cap
            grad_hidden[lo:hi] = grad.matmul(weight)
            if weight_grad is not None:
                weight_grad.add(grad, h)
            del capped, tanh, logits, softmax, grad
        return grad_hidden, (weight_grad.result() if weight_grad is not None else None), None, None, None, None


def _capped_logits(hidden: torch.Tensor, weight: torch.Tensor, cap: float | None):
    """(cap * tanh(logits / cap), tanh(...)) with the plain path's operations; (logits, None) without a cap."""
    logits = torch.matmul(hidden, weight.t())
    if cap is None:
        return logits, None
    tanh = torch.tanh(logits / cap)
    return cap * tanh, tanh


def _masked_targets(target: torch.Tensor, start: int, end: int):
    """``VocabParallelCrossEntropy.calculate_predicted_logits``' target bookkeeping."""
    target_mask = (target < start) | (target >= end)
    masked_target = target.clone() - start
    masked_target[target_mask] = 0
    return target_mask, masked_target.view(-1), None


class _WeightGrad:
    """The weight gradient summed over chunks (see the module docstring for its precision)."""

    def __init__(self, weight: torch.Tensor, single_chunk: bool):
        self.weight = weight
        self.single_chunk = single_chunk
        self.into_main_grad = weight.dtype != torch.float32 and hasattr(weight, "main_grad") and hasattr(
            weight, "grad_added_to_main_grad")
        self.total: torch.Tensor | None = None

    def add(self, grad: torch.Tensor, hidden: torch.Tensor) -> None:
        # LinearWithGradAccumulationAndAsyncCommunication's weight gradient: grad_output.t() @ input.
        grad, hidden = grad.contiguous(), hidden.contiguous()
        if self.into_main_grad:
            main_grad = self.weight.main_grad
            if main_grad.dtype == grad.dtype:
                main_grad.addmm_(grad.t(), hidden)
            else:
                main_grad.add_(grad.t().matmul(hidden))
            return
        product = grad.t().matmul(hidden)
        if self.single_chunk:
            self.total = product
        elif self.total is None:
            self.total = product.float()
        else:
            self.total += product

    def result(self) -> torch.Tensor | None:
        if self.into_main_grad:
            # Megatron's convention for gradients added to main_grad in backward: DDP then skips param.grad. A
            # tied embedding on this stage (zero_out_wgrad) still receives the lookup's gradient, which DDP adds;
            # any other weight gets zeros so that its gradient hook fires.
            self.weight.grad_added_to_main_grad = True
            return None if getattr(self.weight, "zero_out_wgrad", False) else torch.zeros_like(self.weight)
        if self.total is None:  # no tokens
            return torch.zeros_like(self.weight)
        return self.total.to(self.weight.dtype)


def softcapped_cross_entropy(hidden_states: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                             cap: float | None, *, tp_group=None, sequence_parallel: bool = False,
                             chunk_tokens: int | None = None) -> torch.Tensor:
    """Per-token loss [b, s] (fp32) of ``hidden_states`` [s(/tp), b, H] against the vocab-parallel output
    weight [V/tp, H] and ``labels`` [b, s] (every label a valid token id; mask ignored positions afterwards).

    Tensor parallel as Megatron-Core's output layer: with sequence parallel the hidden states are gathered
    (their gradient reduce-scattered), otherwise their gradient is all-reduced over ``tp_group``."""
    tp_size = tp_group.size() if tp_group is not None else 1
    if tp_size > 1:
        if sequence_parallel:
            hidden_states = gather_from_sequence_parallel_region(hidden_states, tensor_parallel_output_grad=True,
                                                                 group=tp_group)
        else:
            hidden_states = copy_to_tensor_model_parallel_region(hidden_states, group=tp_group)
    s, b, h = hidden_states.shape
    if labels.shape != (b, s):
        raise ValueError(f"labels of shape {list(labels.shape)} do not match hidden states [s={s}, b={b}]")
    chunk = chunk_tokens if chunk_tokens is not None else loss_chunk_tokens(weight.shape[0])
    targets = labels.transpose(0, 1).contiguous().view(-1)
    loss = _ChunkedSoftcapCrossEntropy.apply(hidden_states.reshape(s * b, h), weight, targets, cap, chunk,
                                             tp_group)
    return loss.view(s, b).transpose(0, 1).contiguous()
