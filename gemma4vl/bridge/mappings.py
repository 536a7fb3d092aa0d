"""Parameter mappings the stock Megatron-Bridge set lacks.

- :class:`KEqualsVQKVMapping`: q/k projections of a K=V attention layer (no ``v_proj``) <-> Megatron-Core's
  grouped ``linear_qkv``. Import synthesises the value rows as a copy of the key rows; export writes q and k
  only (the value rows are never read by the model, see :mod:`gemma4vl.models.attention`).
- :class:`GroupedExpertMapping`: a grouped expert weight of :class:`~gemma4vl.models.experts.Gemma4GroupedExperts`
  (this rank's experts, its expert-tensor-parallel slice) <-> the checkpoint's all-experts tensor
  (``experts.gate_up_proj`` [E, 2I, H], gate rows first, seen as [E, 2, I, H]; ``experts.down_proj`` [E, H, I]).
  Import copies the rank's slice straight into the parameter (a view of the checkpoint tensor, no
  temporary); export gathers the slices over expert-tensor-parallel and expert-parallel ranks.
- :class:`ReplicatedOnDeviceMapping`: a replicated tensor broadcast over tensor-parallel ranks on the
  parameter's own device (the stock ``ReplicatedMapping`` moves it to ``torch.cuda.current_device()``, which
  does not exist on a CPU run).
- :class:`DirectQKVMapping`, :class:`DirectGatedMLPMapping` (and :class:`KEqualsVQKVMapping`): the stock q/k/v
  and gate/up mappings, plus a :meth:`copy_plan` the importer uses without tensor parallelism: the checkpoint
  tensors are copied straight into their rows of the parameter, instead of first being concatenated into a
  temporary as large as the parameter (fresh memory that costs more than the copy on this platform, see
  docs/bridge.md). Export and tensor-parallel import are the stock code.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from megatron.bridge.models.conversion.param_mapping import (
    AutoMapping,
    GatedMLPMapping,
    MegatronParamMapping,
    QKVMapping,
    ReplicatedMapping,
    merge_qkv_weights,
    split_qkv_weights,
)
from megatron.bridge.models.conversion.utils import remove_non_pickleables


CopyPlan = List[Tuple[torch.Tensor, torch.Tensor]]
"""(destination view of the parameter, checkpoint tensor of the same shape) pairs that together fill it."""


def qkv_copy_plan(config, param: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> CopyPlan:
    """Where q, k and v go in Megatron-Core's interleaved ``linear_qkv`` [G * (Q/G + 2) * D, H] (per query group
    g: its Q/G query heads, then its key head, then its value head; the layout of ``merge_qkv_weights``)."""
    if config.attention_output_gate:
        raise NotImplementedError("copy_plan: gated attention output is not supported")
    heads, groups, dim = config.num_attention_heads, config.num_query_groups, config.kv_channels
    per_group = heads // groups * dim
    if param.ndim != 2 or param.shape[0] != groups * (per_group + 2 * dim):
        raise ValueError(f"linear_qkv of shape {list(param.shape)} does not hold {heads} query heads and "
                         f"{groups} key/value heads of size {dim}")
    hidden = param.shape[1]
    rows = param.view(groups, per_group + 2 * dim, hidden)
    plan = []
    for dest, source in ((rows[:, :per_group], q), (rows[:, per_group:per_group + dim], k),
                         (rows[:, per_group + dim:], v)):
        if source.numel() != dest.numel() or source.shape[-1] != hidden:
            raise ValueError(f"linear_qkv of shape {list(param.shape)}: a checkpoint projection of shape "
                             f"{list(source.shape)} does not fit {list(dest.shape)}")
        plan.append((dest, source.view(dest.shape)))
    return plan


class DirectQKVMapping(QKVMapping):
    """:class:`QKVMapping` with a :meth:`copy_plan` (see the module docstring)."""

    def copy_plan(self, hf_weights: Dict[str, torch.Tensor], megatron_module: torch.nn.Module,
                  param: torch.Tensor) -> Optional[CopyPlan]:
        """Where each checkpoint tensor goes in ``param``; None with tensor parallelism (use ``hf_to_megatron``)."""
        if self.tp_size != 1 or hf_weights["q"].ndim != 2:
            return None
        return qkv_copy_plan(self._get_config(megatron_module), param, hf_weights["q"], hf_weights["k"],
                             hf_weights["v"])


class DirectGatedMLPMapping(GatedMLPMapping):
    """:class:`GatedMLPMapping` with a :meth:`copy_plan`: gate rows first, then up rows."""

    def copy_plan(self, hf_weights: Dict[str, torch.Tensor], megatron_module: torch.nn.Module,
                  param: torch.Tensor) -> Optional[CopyPlan]:
        """Where each checkpoint tensor goes in ``param``; None with tensor parallelism (use ``hf_to_megatron``)."""
        if self.tp_size != 1:
            return None
        gate, up = hf_weights["gate"], hf_weights["up"]
        if gate.shape[0] + up.shape[0] != param.shape[0] or not gate.shape[1:] == up.shape[1:] == param.shape[1:]:
            raise ValueError(f"linear_fc1 of shape {list(param.shape)} does not hold gate {list(gate.shape)} and "
                             f"up {list(up.shape)}")
        return [(param[:gate.shape[0]], gate), (param[gate.shape[0]:], up)]


class KEqualsVQKVMapping(MegatronParamMapping[Dict[str, torch.Tensor]]):
    """``linear_qkv`` of a layer whose values are its keys: HF has ``q_proj`` and ``k_proj`` only."""

    def __init__(self, megatron_param: str, q: str, k: str):
        super().__init__(megatron_param, {"q": q, "k": k})
        self._tp_mapping = AutoMapping(megatron_param, megatron_param)

    def hf_to_megatron(self, hf_weights: Dict[str, torch.Tensor], megatron_module: torch.nn.Module) -> torch.Tensor:
        merged = None
        if self.tp_rank == 0:
            config = self._get_config(megatron_module)
            # Synthesise V = K: the value rows are a copy of the key rows.
            merged = merge_qkv_weights(config, hf_weights["q"], hf_weights["k"], hf_weights["k"])
        return self._tp_mapping.hf_to_megatron(merged, megatron_module)

    def copy_plan(self, hf_weights: Dict[str, torch.Tensor], megatron_module: torch.nn.Module,
                  param: torch.Tensor) -> Optional[CopyPlan]:
        """Where q and k (twice: the synthesised values) go in ``param``; None with tensor parallelism."""
        if self.tp_size != 1:
            return None
        return qkv_copy_plan(self._get_config(megatron_module), param, hf_weights["q"], hf_weights["k"],
                             hf_weights["k"])

    def megatron_to_hf(
        self, megatron_weights: Optional[torch.Tensor], megatron_module: Optional[torch.nn.Module]
    ) -> Dict[str, torch.Tensor]:
        if megatron_module is None:
            config = self.broadcast_obj_from_pp_rank(None, "qkv_config")
        else:
            config = remove_non_pickleables(self._get_config(megatron_module), max_depth=3)
            config = self.broadcast_obj_from_pp_rank(config, "qkv_config")
        packed = self._tp_mapping.megatron_to_hf(megatron_weights, megatron_module)
        if not packed:
            return {}
        q, k, _synthesised_v = split_qkv_weights(config, next(iter(packed.values())))
        return {self.hf_param["q"]: q, self.hf_param["k"]: k}

    def resolve(self, captures):
        megatron_param, hf_param = self._resolve_names(captures)
        return type(self)(megatron_param, hf_param["q"], hf_param["k"])


class ReplicatedOnDeviceMapping(ReplicatedMapping):
    """Replicated tensor, broadcast from tensor-parallel rank 0 on the target parameter's device."""

    def hf_to_megatron(self, hf_weights: torch.Tensor, megatron_module: torch.nn.Module) -> torch.Tensor:
        device = next(t.device for t in (*megatron_module.parameters(), *megatron_module.buffers()))
        hf_weights = hf_weights.to(device=device)
        if self.tp_size == 1:
            return hf_weights
        if self.tp_rank > 0:
            hf_weights = torch.empty_like(hf_weights)
        return self.broadcast_tensor_to_tp_ranks(hf_weights, src_rank=0)


class GroupedExpertMapping(MegatronParamMapping[torch.Tensor]):
    """A grouped expert parameter [E_local, ...] <-> the checkpoint's [E, ...] tensor of the layer's experts.

    ``global_shape`` maps the checkpoint tensor's shape to the parameter's global shape (all experts, the whole
    FFN width): a view of the same memory (e.g. [E, 2I, H] -> [E, 2, I, H]). Axis 0 is split over expert-parallel
    ranks (rank r holds experts r*E_local ...), axis ``tp_axis`` over expert-tensor-parallel ranks."""

    def __init__(self, megatron_param: str, hf_param: str, tp_axis: int, split_pairs: bool):
        super().__init__(megatron_param, hf_param)
        self.tp_axis = tp_axis
        self.split_pairs = split_pairs  # [E, 2I, H] in the checkpoint is [E, 2, I, H] here

    @property
    def etp_group(self):
        return self._etp_group

    def resolve(self, captures):
        megatron_param, hf_param = self._resolve_names(captures)
        return type(self)(megatron_param, hf_param, self.tp_axis, self.split_pairs)

    def _global_view(self, hf_weight: torch.Tensor) -> torch.Tensor:
        if not self.split_pairs:
            return hf_weight
        experts, rows, cols = hf_weight.shape
        return hf_weight.view(experts, 2, rows // 2, cols)

    def local_slice(self, hf_weight: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        """This rank's part of the checkpoint tensor, as a view (shape-checked against ``param``)."""
        full = self._global_view(hf_weight)
        expected = list(param.shape)
        expected[0] *= self.ep_size
        expected[self.tp_axis] *= self.etp_size
        if list(full.shape) != expected:
            raise ValueError(f"checkpoint tensor of shape {list(hf_weight.shape)} does not hold "
                             f"{self.ep_size} x {param.shape[0]} experts of {list(param.shape[1:])} "
                             f"(times {self.etp_size} along axis {self.tp_axis})")
        experts, width = param.shape[0], param.shape[self.tp_axis]
        part = full.narrow(0, self.ep_rank * experts, experts)
        return part.narrow(self.tp_axis, self.etp_rank * width, width)

    def copy_plan(self, hf_weights: torch.Tensor, megatron_module: torch.nn.Module,
                  param: torch.Tensor) -> CopyPlan:
        """The rank's slice of the checkpoint tensor, copied straight into ``param``."""
        return [(param, self.local_slice(hf_weights, param))]

    def hf_to_megatron(self, hf_weights: torch.Tensor, megatron_module: torch.nn.Module) -> torch.Tensor:
        param = getattr(megatron_module, self.megatron_param.rsplit(".", 1)[-1])
        return self.local_slice(hf_weights, param).contiguous()

    def megatron_to_hf(self, megatron_weights: Optional[torch.Tensor],
                       megatron_module: Optional[torch.nn.Module]) -> Dict[str, torch.Tensor]:
        weights = self.broadcast_from_pp_rank(megatron_weights, cache_key=str(self.hf_param))
        if weights is None:
            return {}
        weights = weights.detach()
        if self.etp_size > 1:
            parts = [torch.empty_like(weights) for _ in range(self.etp_size)]
            torch.distributed.all_gather(parts, weights.contiguous(), group=self.etp_group)
            weights = torch.cat(parts, dim=self.tp_axis)
        if self.ep_size > 1:
            parts = [torch.empty_like(weights) for _ in range(self.ep_size)]
            torch.distributed.all_gather(parts, weights.contiguous(), group=self.ep_group)
            weights = torch.cat(parts, dim=0)
        if self.split_pairs:
            weights = weights.flatten(1, 2)
        return {str(self.hf_param): weights}
