"""Parameter mappings the stock Megatron-Bridge set lacks.

- :class:`KEqualsVQKVMapping`: q/k projections of a K=V attention layer (no ``v_proj``) <-> Megatron-Core's
  grouped ``linear_qkv``. Import synthesises the value rows as a copy of the key rows; export writes q and k
  only (the value rows are never read by the model, see :mod:`gemma4vl.models.attention`).
- :class:`ExpertGateUpMapping`: one expert's slice of the grouped ``experts.gate_up_proj`` [E, 2I, H] (gate rows
  first) <-> the expert's ``linear_fc1`` [2I, H] (the same layout without expert tensor parallelism, so the
  slice is handed over as a view, no copy; with expert tensor parallelism the stock interleaving is used).
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
    FusedGatedExpertMapping,
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


class ExpertGateUpMapping(FusedGatedExpertMapping):
    """Grouped gate/up expert weights; zero-copy when experts are not tensor-parallel (see module docstring)."""

    def hf_to_megatron(self, hf_weights: torch.Tensor, megatron_module: torch.nn.Module) -> torch.Tensor:
        if self.tp_size != 1:  # for expert mappings this is the expert-tensor-parallel group
            return super().hf_to_megatron(hf_weights, megatron_module)
        from megatron.bridge.utils.common_utils import extract_expert_number_from_param

        return hf_weights[extract_expert_number_from_param(self.megatron_param)]
