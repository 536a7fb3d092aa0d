"""LoRA adapters through the bridge: merged into the export, or written as a Hugging Face PEFT adapter.

Megatron-Bridge's :class:`~megatron.bridge.models.conversion.peft_bridge.MegatronPeftBridge` does most of the
work (gathering adapters over tensor / pipeline ranks, splitting a ``linear_qkv`` adapter's B matrix into q/k/v
and a ``linear_fc1`` adapter's into gate/up, HF names). What Gemma 4 adds, and this mixin handles:

- **The shared-expert fusion** (:mod:`gemma4vl.bridge.fusion`). Our ``shared_experts.linear_fc1`` holds
  ``W_mg = W_hf * f`` per input column, ``f = w1 / w2`` (``pre_feedforward_layernorm`` over
  ``pre_feedforward_layernorm_2``), because its input is ``x * w2`` where HF's is ``x * w1``. A LoRA adapter on
  it computes ``s * B @ A @ (x * w2)``; the same function of HF's input is ``s * B @ (A / f) @ (x * w1)``, so
  the HF adapter's A matrix is ``A / f`` (the norms as trained, read from the model), B is unchanged (split
  into gate / up rows). For the merged export the adapter is merged into the *fused* weight first and the sum
  is un-fused, ``(W_mg + s B A) / f = W_hf + s B (A / f)``: Megatron-Bridge's own order (un-fuse in
  ``maybe_modify_converted_hf_weight``, merge afterwards) would add the adapter un-divided, or not at all when
  the un-fusion waits for its norms.
- **K=V layers**: the ``linear_qkv`` adapter's value rows have no HF counterpart (no ``v_proj``); the model
  reads its values from the key rows, adapter included, as HF's ``v = k_proj(x)`` does with the k adapter
  (see :meth:`Gemma4VLBridge._split_qkv_linear_out_weight`).
- **What has no PEFT equivalent is refused**: the adapter format supports adapters on ``linear_qkv``,
  ``linear_proj`` and the shared expert's ``linear_fc1`` / ``linear_fc2`` (plain ``nn.Linear`` modules in
  transformers). Routed experts are one grouped 3-D parameter per layer in transformers (``experts.gate_up_proj``
  [E, 2I, H]), not a module per expert; adapters there (and on any other module) are exported merged only
  (:class:`AdapterFormatError` for the adapter format). PEFT's ``target_parameters`` (3-D ``ParamWrapper``)
  could carry per-expert adapters; writing that layout is not implemented.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set

import torch
import torch.distributed as dist
from megatron.bridge.models.conversion.model_bridge import HFWeightTuple, _megatron_local_name_to_global
from megatron.bridge.models.conversion.peft_bridge import MegatronPeftBridge
from megatron.bridge.models.conversion.utils import persistent_buffers
from megatron.core import parallel_state
from megatron.core.utils import unwrap_model

from gemma4vl.bridge import fusion
from gemma4vl.bridge.layout import MG_LAYER, SHARED_GATE, SHARED_UP, layer_and_name


class AdapterFormatError(ValueError):
    """An adapter that the Hugging Face PEFT format cannot express (export it merged instead)."""


PEFT_ADAPTER_TARGETS = ("self_attention.linear_qkv", "self_attention.linear_proj",
                        "mlp.shared_experts.linear_fc1", "mlp.shared_experts.linear_fc2")
"""Megatron modules (within a decoder layer) whose adapters have a PEFT equivalent on an HF ``nn.Linear``."""

_SHARED_FC1 = "mlp.shared_experts.linear_fc1"
_LORA_A = ".lora_A.weight"
# HF names of the shared expert's gate / up LoRA A matrices (within a layer): un-fused on export.
_SHARED_LORA_A = {SHARED_GATE.removesuffix(".weight") + _LORA_A, SHARED_UP.removesuffix(".weight") + _LORA_A}
_W2 = "pre_mlp_layernorm.weight"
_W1 = "mlp.shared_experts_norm_anchor"


def adapter_target(global_base_prefix: str) -> str:
    """The module of an adapter within its decoder layer (``mlp.shared_experts.linear_fc1``; routed experts as
    ``mlp.experts.local_experts.*.linear_fc1``), or the whole name when the adapter is outside the layers."""
    parts = global_base_prefix.split(".")
    if len(parts) > 4 and parts[:3] == ["language_model", "decoder", "layers"]:
        parts = parts[4:]
        return ".".join("*" if p.isdigit() and i and parts[i - 1] == "local_experts" else p
                        for i, p in enumerate(parts))
    return global_base_prefix


def unsupported_adapter_targets(global_base_prefixes) -> list[str]:
    """The adapter modules (within a layer) that have no HF PEFT equivalent, sorted."""
    return sorted({t for t in map(adapter_target, global_base_prefixes) if t not in PEFT_ADAPTER_TARGETS})


# The adaptable Linear modules of a decoder layer (one routed expert stands for all) and outside the layers.
_LAYER_LINEARS = (*PEFT_ADAPTER_TARGETS, "mlp.router", "mlp.experts.local_experts.0.linear_fc1",
                  "mlp.experts.local_experts.0.linear_fc2")
_OTHER_LINEARS = ("embed_vision.embedding_projection",)


def peft_format_problems(target_modules) -> list[str]:
    """Why LoRA with ``target_modules`` (Megatron-Bridge's matching: the module's own name, or a ``*`` pattern on
    its full name) cannot be exported as a PEFT adapter; empty when it can."""
    from megatron.bridge.peft.utils import wildcard_match

    candidates = [MG_LAYER.format(0) + name for name in _LAYER_LINEARS] + list(_OTHER_LINEARS)
    problems = []
    for pattern in target_modules:
        hits = [c for c in candidates if c.rsplit(".", 1)[-1] == pattern or wildcard_match(pattern, c)]
        outside = sorted({adapter_target(c) for c in hits} - set(PEFT_ADAPTER_TARGETS))
        if outside:
            problems.append(f"peft.target_modules entry {pattern!r} adapts {outside}, which a PEFT adapter of Linear "
                            "modules cannot address (transformers stores Gemma 4's routed experts as one grouped "
                            f"3-D parameter per layer); adapter targets: {list(PEFT_ADAPTER_TARGETS)} (e.g. "
                            "'*.shared_experts.linear_fc1'), or export.format=merged")
        elif not hits:
            problems.append(f"peft.target_modules entry {pattern!r} matches none of the decoder layers' "
                            f"{list(PEFT_ADAPTER_TARGETS)}")
    return problems


_ROUTED = ("mlp.experts.local_experts.0.linear_fc1", "mlp.experts.local_experts.0.linear_fc2")


def routed_lora_problems(target_modules) -> list[str]:
    """Targets that would put LoRA on the routed experts. Our routed experts are grouped parameters (one
    ``fc1_weight`` / ``fc2_weight`` per layer, :mod:`gemma4vl.models.experts`), not Linear modules, so
    Megatron-Bridge's LoRA would silently leave them without adapters: such a target is refused by name."""
    from megatron.bridge.peft.utils import wildcard_match

    problems = []
    for pattern in target_modules:
        hits = [c for c in (MG_LAYER.format(0) + name for name in _ROUTED)
                if c.rsplit(".", 1)[-1] == pattern or wildcard_match(pattern, c)]
        if hits:
            problems.append(f"peft.target_modules entry {pattern!r} would adapt the routed experts, which are grouped "
                            "parameters (one fc1_weight / fc2_weight per layer) that LoRA of Linear modules cannot "
                            "wrap; for the MoE blocks use '*.shared_experts.linear_fc1' / "
                            "'*.shared_experts.linear_fc2' (peft=lora_shared_expert)")
    return problems


def lora_parameter_counts(hf, rank: int) -> Dict[str, int]:
    """LoRA parameters per adaptable target of the decoder layers, summed over the layers, from the architecture
    (``hf``: :class:`~gemma4vl.bridge.hf_config.Gemma4HFConfig`): ``rank x (in + out)`` per Megatron module. q/k/v
    are one ``linear_qkv`` (K=V layers keep their unused value rows, see docs/bridge.md), gate/up one
    ``linear_fc1``; routed experts (``mlp.experts.local_experts.*``) have one adapter per expert."""
    h, heads = hf.hidden_size, hf.num_attention_heads
    counts = dict.fromkeys((*PEFT_ADAPTER_TARGETS, "mlp.experts.local_experts.*.linear_fc1",
                            "mlp.experts.local_experts.*.linear_fc2"), 0)
    for layer_type in hf.arch.layer_types:
        spec = hf.arch.attention(layer_type)
        counts["self_attention.linear_qkv"] += rank * (h + (heads + 2 * spec.num_kv_heads) * spec.head_dim)
        counts["self_attention.linear_proj"] += rank * (heads * spec.head_dim + h)
        counts["mlp.shared_experts.linear_fc1"] += rank * (h + 2 * hf.intermediate_size)
        counts["mlp.shared_experts.linear_fc2"] += rank * (hf.intermediate_size + h)
        if hf.num_experts:
            experts, inter = hf.num_experts, hf.moe_intermediate_size
            counts["mlp.experts.local_experts.*.linear_fc1"] += experts * rank * (h + 2 * inter)
            counts["mlp.experts.local_experts.*.linear_fc2"] += experts * rank * (inter + h)
    return counts


@dataclass
class AdapterMergeState:
    """Export-side state of adapters merged into fused tensors (see the module docstring)."""

    model: list
    """The model chunks being exported."""

    tasks_by_base: Dict[str, list]
    """Megatron-Bridge's adapter tasks by base module prefix."""

    merged: Set[str] = field(default_factory=set)
    """HF names whose adapter is already merged (into the fused tensor, before un-fusion)."""


class Gemma4AdapterBridge(MegatronPeftBridge):
    """The adapter half of :class:`~gemma4vl.bridge.Gemma4VLBridge` (see the module docstring)."""

    _adapter_merge: Optional[AdapterMergeState] = None

    # ------------------------------------------------------------------ merged export
    def _start_adapter_merge(self, megatron_model, merge_adapter_weights: bool) -> None:
        models = megatron_model if isinstance(megatron_model, list) else [megatron_model]
        unwrapped = unwrap_model(models)
        tasks = self.build_adapter_conversion_tasks(unwrapped) if merge_adapter_weights else {}
        self._adapter_merge = AdapterMergeState(models, dict(tasks))

    def _merge_into_fused(self, task, fused: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Merge the adapter of ``task``'s module into its *fused* HF tensors (before they are un-fused)."""
        state = self._adapter_merge
        if state is None or not fused or ".to_wrap." not in task.global_param_name:
            return fused
        adapter_tasks = state.tasks_by_base.get(task.global_param_name.partition(".to_wrap.")[0])
        if not adapter_tasks:
            return fused
        weights = self.materialize_adapter_weights(adapter_tasks)
        merged = MegatronPeftBridge._merge_lora_adapter_weights(self, state.model, dict(fused), weights)
        state.merged.update(merged)
        return merged

    def _merge_lora_adapter_weights(self, megatron_model, converted_weights_dict, adapter_weights):
        """Megatron-Bridge's merge, restricted to the adapter's own HF tensors that are not merged yet (a task's
        dict can also carry un-fused tensors of other modules, released when their norms arrived)."""
        state = self._adapter_merge
        if not converted_weights_dict or state is None:
            return super()._merge_lora_adapter_weights(megatron_model, converted_weights_dict, adapter_weights)
        own = set(self._get_base_hf_param_names_for_adapter(
            self.mapping_registry(), adapter_weights[0].global_base_prefix, adapter_weights[0].adapter_key, ".weight"))
        todo = {n: t for n, t in converted_weights_dict.items() if n in own and n not in state.merged}
        if not todo:
            return converted_weights_dict
        merged = super()._merge_lora_adapter_weights(megatron_model, todo, adapter_weights)
        state.merged.update(merged)
        return {n: merged.get(n, t) for n, t in converted_weights_dict.items()}

    # ------------------------------------------------------------------ adapter export
    def stream_adapter_weights_megatron_to_hf(self, megatron_model, cpu: bool = True, show_progress: bool = True,
                                              exclude_adapter_base_prefixes=None):
        """HF PEFT adapter tensors (``<hf module>.lora_A.weight`` / ``.lora_B.weight``), the shared expert's A
        matrices un-fused with the model's current norms. Refuses adapters without a PEFT equivalent."""
        models = megatron_model if isinstance(megatron_model, list) else [megatron_model]
        info = self._megatron_global_adapters_info_all_pp_ranks(models)
        unsupported = unsupported_adapter_targets(entry[0].partition(".adapter")[0] for entry in info)
        if unsupported:
            raise AdapterFormatError(
                f"adapters on {unsupported} cannot be written as a PEFT adapter of Linear modules: transformers "
                "keeps Gemma 4's routed experts as one grouped 3-D parameter per layer (experts.gate_up_proj "
                "[E, 2I, H], experts.down_proj [E, H, I]), not a Linear module per expert. The adapter format "
                f"covers {list(PEFT_ADAPTER_TARGETS)}; export this model merged (export.format=merged).")
        factors = self._shared_expert_factors(models) if any(
            adapter_target(entry[0].partition(".adapter")[0]) == _SHARED_FC1 for entry in info) else {}
        for name, tensor in super().stream_adapter_weights_megatron_to_hf(
                models, cpu=cpu, show_progress=show_progress,
                exclude_adapter_base_prefixes=exclude_adapter_base_prefixes):
            located = layer_and_name(name)
            if located is not None and located[1] in _SHARED_LORA_A:
                tensor = fusion.unfuse(tensor, factors[located[0]].to(tensor.device),
                                       where=f"layer {located[0]}").to(tensor.dtype)
            yield HFWeightTuple(name, tensor)

    def _shared_expert_factors(self, models: List) -> Dict[int, torch.Tensor]:
        """{layer: ``w1 / w2``} (float64 [H]) from the model's current norms, on every rank (each pipeline stage
        contributes its layers)."""
        config = unwrap_model(models)[0].config
        norms: Dict[int, Dict[str, torch.Tensor]] = {}
        for vp_stage, chunk in enumerate(models):
            for local, value in itertools.chain(chunk.named_parameters(), persistent_buffers(chunk)):
                local = self._unwrap_name(local)
                name = _megatron_local_name_to_global(models, config, local, vp_stage)
                for key in (_W1, _W2):
                    layer = _layer_of(name, key)
                    if layer is not None:
                        norms.setdefault(layer, {})[key] = value.detach().to("cpu", torch.float64)
        if dist.is_initialized() and parallel_state.get_pipeline_model_parallel_world_size() > 1:
            gathered = [None] * parallel_state.get_pipeline_model_parallel_world_size()
            dist.all_gather_object(gathered, norms, group=parallel_state.get_pipeline_model_parallel_group())
            norms = {k: v for part in gathered for k, v in part.items()}
        return {layer: fusion.shared_factor(v[_W1], v[_W2], where=f"layer {layer}") for layer, v in norms.items()}


def _layer_of(global_name: str, suffix: str) -> int | None:
    prefix = MG_LAYER.partition("{}")[0]  # "language_model.decoder.layers."
    if not (global_name.startswith(prefix) and global_name.endswith("." + suffix)):
        return None
    index = global_name[len(prefix):-len(suffix) - 1]
    return int(index) if index.isdigit() else None
