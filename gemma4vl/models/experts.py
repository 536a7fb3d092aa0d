"""Gemma 4's routed experts with grouped weights: one parameter per projection for all local experts.

Parameters (``E`` local experts, ``I`` the expert FFN width on this expert-tensor-parallel rank, ``H`` hidden):

- ``fc1_weight`` [E, 2, I, H]: per expert, the gate rows (``[:, 0]``) then the up rows (``[:, 1]``). As a matrix
  per expert (``[E, 2I, H]`` view) it is exactly what Megatron-Core's ``linear_fc1`` of one expert holds;
  keeping gate and up on their own axis makes an expert-tensor-parallel shard a plain slice of axis 2.
- ``fc2_weight`` [E, H, I]: per expert the down projection (``linear_fc2``).

Per token routed to local expert ``e`` with routing weight ``p``:
``out = fc2[e] @ (p * act(fc1[e, 0] @ x) * (fc1[e, 1] @ x))``.

Two implementations of that one computation:

- CUDA, bf16: one grouped GEMM per projection (``torch.nn.functional.grouped_mm``, CUTLASS on Hopper) over all
  local experts, with the group ends computed on the device; no per-expert Python loop and no host sync of its
  own (the token counts Megatron-Core's dispatcher already holds on the host are copied in asynchronously).
- everything else (CPU, fp32): the reference, an exact replay of Megatron-Core's ``SequentialMLP``: a loop over
  the experts, each running ``MLP.forward`` with ``LinearWithGradAccumulationAndAsyncCommunication``'s matmuls
  (forward ``x @ W.T``, backward ``g @ W`` and ``g.T @ x``), so CPU results are bit-identical to the sequential
  experts these weights replace (tests/test_grouped_experts.py compares them bit for bit). ``grouped_mm`` has
  a CPU forward but no CPU backward in torch 2.13.

Expert communication (all-to-all, expert-tensor-parallel reduce-scatter) is the token dispatcher's, as for
Megatron-Core's experts: this module only computes on the tokens it is given.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, get_expert_parallel_rng_tracker_name
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

FC1_TP_AXIS = 2
"""Axis of ``fc1_weight`` split over expert-tensor-parallel ranks (the expert FFN width)."""

FC2_TP_AXIS = 2
"""Axis of ``fc2_weight`` split over expert-tensor-parallel ranks (the expert FFN width)."""


class _PerExpertLinear(torch.autograd.Function):
    """``out_e = x_e @ weight[e].T`` for every local expert ``e``, with exactly the matmuls of Megatron-Core's
    ``LinearWithGradAccumulationAndAsyncCommunication`` (and ``linear_with_frozen_weight`` when the weight is
    frozen), one gradient tensor for the grouped weight."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, *inputs: torch.Tensor):
        ctx.save_for_backward(weight, *inputs)
        return tuple(torch.matmul(x, weight[e].view(-1, weight.shape[-1]).t()) for e, x in enumerate(inputs))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        weight, *inputs = ctx.saved_tensors
        grad_inputs = []
        grad_weight = torch.empty_like(weight) if ctx.needs_input_grad[0] else None
        for e, (g, x) in enumerate(zip(grads, inputs)):
            w = weight[e].view(-1, weight.shape[-1])
            grad_inputs.append(g.matmul(w))
            if grad_weight is not None:
                grad_weight[e].view_as(w).copy_(g.contiguous().t().matmul(x.contiguous()))
        return (grad_weight, *grad_inputs)


class _ZeroGradOfEmptyExperts(torch.autograd.Function):
    """Identity on the grouped weight; its gradient is zeroed for experts that got no tokens. On Hopper
    ``grouped_mm``'s backward already writes zeros there; on Blackwell it has been seen to write garbage
    (pytorch/pytorch#172439), which DDP would add to the gradient."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, has_tokens: torch.Tensor):
        ctx.save_for_backward(has_tokens)
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (has_tokens,) = ctx.saved_tensors
        return grad * has_tokens.view(-1, *([1] * (grad.dim() - 1))).to(grad.dtype), None


class Gemma4GroupedExperts(MegatronModule):
    """Routed experts of one MoE layer (``ExpertsInterface`` of Megatron-Core's ``MoELayer``)."""

    def __init__(self, num_local_experts: int, config: TransformerConfig, pg_collection: ProcessGroupCollection,
                 name: str | None = None):
        super().__init__(config=config)
        unsupported = {
            "gated_linear_unit=False": not config.gated_linear_unit,
            "add_bias_linear": config.add_bias_linear,
            "moe_apply_probs_on_input": config.moe_apply_probs_on_input,
            "activation_func_clamp_value": config.activation_func_clamp_value is not None,
            "fp8 / fp4": bool(config.fp8 or config.fp4),
            "moe_latent_size": config.moe_latent_size is not None,
            "use_te_activation_func": config.use_te_activation_func,
        }
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise ValueError(f"Gemma4GroupedExperts does not support {', '.join(bad)}")
        self.num_local_experts = num_local_experts
        self.ep_group = pg_collection.ep
        self.tp_group = pg_collection.expt_tp
        self.dp_group = pg_collection.expt_dp
        tp_size = self.tp_group.size()
        if config.moe_ffn_hidden_size % tp_size:
            raise ValueError(f"the expert FFN width {config.moe_ffn_hidden_size} does not split over "
                             f"{tp_size} expert-tensor-parallel ranks")
        width = config.moe_ffn_hidden_size // tp_size
        hidden = config.hidden_size
        device = None if config.use_cpu_initialization else torch.cuda.current_device()
        self.fc1_weight = torch.nn.Parameter(
            torch.empty(num_local_experts, 2, width, hidden, dtype=config.params_dtype, device=device))
        self.fc2_weight = torch.nn.Parameter(
            torch.empty(num_local_experts, hidden, width, dtype=config.params_dtype, device=device))
        # The attributes Megatron-Core's expert ColumnParallelLinear / RowParallelLinear give their weights: DDP
        # reduces expert gradients over the expert-data-parallel group when experts use their own process groups.
        use_expert_groups = (config.expert_model_parallel_size > 1
                             or config.expert_tensor_parallel_size != config.tensor_model_parallel_size)
        for param, axis in ((self.fc1_weight, FC1_TP_AXIS), (self.fc2_weight, FC2_TP_AXIS)):
            set_tensor_model_parallel_attributes(param, is_parallel=True, dim=axis, stride=1)
            param.allreduce = not use_expert_groups
        if config.perform_initialization:
            with get_cuda_rng_tracker().fork(get_expert_parallel_rng_tracker_name()):
                for e in range(num_local_experts):
                    config.init_method(self.fc1_weight.data[e].view(2 * width, hidden))
                    config.output_layer_init_method(self.fc2_weight.data[e])

    # ------------------------------------------------------------------ forward
    def forward(self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert: torch.Tensor,
                permuted_probs: torch.Tensor):
        """Tokens sorted by local expert [T, H], their count per local expert [E], routing weights [T] ->
        (outputs [T, H], None)."""
        x = permuted_local_hidden_states
        if x.is_cuda and x.dtype == torch.bfloat16 and x.shape[0] > 0:
            return self.forward_grouped(x, tokens_per_expert, permuted_probs), None
        return self.forward_reference(x, tokens_per_expert, permuted_probs), None

    def _activate(self, fc1_out: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """``MLP.forward``'s gated activation and routing-weight scaling, op for op."""
        x_glu, x_linear = torch.chunk(fc1_out, 2, dim=-1)
        hidden = self.config.activation_func(x_glu) * (x_linear + self.config.glu_linear_offset)
        original_dtype = hidden.dtype
        return (hidden * probs.unsqueeze(-1)).to(original_dtype)

    def forward_reference(self, x: torch.Tensor, tokens_per_expert: torch.Tensor,
                          probs: torch.Tensor) -> torch.Tensor:
        """Megatron-Core's ``SequentialMLP`` computation, bit for bit (any device and dtype)."""
        counts = tokens_per_expert.tolist() if self.num_local_experts > 1 else [x.shape[0]]
        inputs = torch.split(x, counts)
        probs_per_expert = torch.split(probs, counts)
        fc1_out = _PerExpertLinear.apply(self.fc1_weight, *inputs)
        hidden = [self._activate(h, p) for h, p in zip(fc1_out, probs_per_expert)]
        fc2_out = _PerExpertLinear.apply(self.fc2_weight, *hidden)
        if self.num_local_experts == 1:
            return fc2_out[0]
        return torch.cat(fc2_out, dim=0)

    def forward_grouped(self, x: torch.Tensor, tokens_per_expert: torch.Tensor,
                        probs: torch.Tensor) -> torch.Tensor:
        """One grouped GEMM per projection (CUDA, bf16)."""
        counts = tokens_per_expert
        if counts.device != x.device:  # the dispatcher's host copy: asynchronous upload, no sync
            counts = counts.pin_memory().to(x.device, non_blocking=True)
        ends = torch.cumsum(counts, dim=0).to(torch.int32)
        has_tokens = counts > 0
        experts, _, width, hidden = self.fc1_weight.shape
        fc1 = _ZeroGradOfEmptyExperts.apply(self.fc1_weight, has_tokens).view(experts, 2 * width, hidden)
        fc2 = _ZeroGradOfEmptyExperts.apply(self.fc2_weight, has_tokens)
        fc1_out = F.grouped_mm(x, fc1.transpose(1, 2), offs=ends)
        activated = self._activate(fc1_out, probs)
        return F.grouped_mm(activated, fc2.transpose(1, 2), offs=ends)

    def backward_dw(self) -> None:
        """Deferred weight gradients are not used (``delay_wgrad_compute`` is off)."""

    # ------------------------------------------------------------------ checkpoints
    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """The grouped weights as slices of global [num_experts, ...] tensors: axis 0 over expert-parallel ranks,
        the expert FFN axis over expert-tensor-parallel ranks, replicated over expert-data-parallel ranks."""
        ep_rank, ep_size = self.ep_group.rank(), self.ep_group.size()
        tp_rank, tp_size = self.tp_group.rank(), self.tp_group.size()
        prepend = len(sharded_offsets)
        replica_id = (0, 0, self.dp_group.rank())
        state = {}
        for name, param, axis in (("fc1_weight", self.fc1_weight, FC1_TP_AXIS),
                                  ("fc2_weight", self.fc2_weight, FC2_TP_AXIS)):
            key = f"{prefix}{name}"
            state[key] = ShardedTensor.from_rank_offsets(
                key, param, *sharded_offsets, (prepend, ep_rank, ep_size), (prepend + axis, tp_rank, tp_size),
                replica_id=replica_id, prepend_axis_num=prepend)
        return state
