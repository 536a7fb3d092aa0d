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
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from megatron.bridge.models.conversion.param_mapping import (
    AutoMapping,
    FusedGatedExpertMapping,
    MegatronParamMapping,
    ReplicatedMapping,
    merge_qkv_weights,
    split_qkv_weights,
)
from megatron.bridge.models.conversion.utils import remove_non_pickleables


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
