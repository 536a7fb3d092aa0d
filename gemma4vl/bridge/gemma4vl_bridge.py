"""``Gemma4VLBridge``: Hugging Face ``Gemma4ForConditionalGeneration`` <-> :class:`~gemma4vl.models.Gemma4VLModel`.

Registered with Megatron-Bridge for the transformers class, so ``AutoBridge.from_hf_pretrained(path)`` on a Gemma
4 VL checkpoint returns it (ahead of Megatron-Bridge's own Gemma 4 bridge, whose model does not run without
Transformer Engine). Megatron-Bridge's machinery does the tensor/pipeline/expert-parallel distribution; this
class adds, on top of the declarative table in :mod:`gemma4vl.bridge.layout`:

- strictness: before any weight is read, the checkpoint's safetensors headers are checked against the config
  (missing / extra tensors, shapes, truncated or corrupt shards, dangling symlinks: :func:`precheck_hf_checkpoint`),
  every Megatron parameter must have a checkpoint tensor and vice versa, every local Megatron parameter must
  have been written when the import ends, and every written parameter must be finite (naming the HF tensor);
- the MoE fusions (:mod:`gemma4vl.bridge.fusion`) on import, and their inverses on export using the model's
  current norm weights; K=V synthesis (:class:`~gemma4vl.bridge.mappings.KEqualsVQKVMapping`);
- streaming import: each tensor is read when its task runs and its pages are released after the copy; a
  grouped expert tensor (all experts of a layer) is read by the one task of its grouped parameter, which
  copies only this rank's experts (:class:`~gemma4vl.bridge.mappings.GroupedExpertMapping`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, List, Mapping

import torch
from megatron.bridge.models.conversion.model_bridge import MegatronModelBridge, WeightConversionTask
from megatron.bridge.models.conversion.peft_bridge import ABSENT_PROJECTION
from megatron.bridge.models.conversion.param_mapping import split_qkv_weights
from megatron.bridge.models.conversion.utils import get_module_and_param_from_name
from megatron.core.utils import unwrap_model
from transformers import Gemma4ForConditionalGeneration

from gemma4vl.bridge import fusion, host_pages
from gemma4vl.bridge.adapters import Gemma4AdapterBridge
from gemma4vl.bridge.checkpoint import (
    CheckpointError,
    all_finite,
    check_tensors,
    megatron_bridge_name_error,
    scan_checkpoint,
)
from gemma4vl.bridge.hf_config import Gemma4HFConfig, check_against_transformers, read_hf_config
from gemma4vl.bridge.mappings import GroupedExpertMapping
from gemma4vl.bridge.layout import (
    HF_LAYER,
    LM_HEAD,
    PRE_FFN_NORM,
    PRE_FFN_NORM_2,
    ROUTER_PROJ,
    ROUTER_SCALE,
    SHARED_GATE,
    SHARED_UP,
    expected_hf_shapes,
    layer_and_name,
    mapping_registry,
)
from gemma4vl.bridge.provider import Gemma4VLModelProvider, provider_from_hf_config
from gemma4vl.bridge.reader import MmapCheckpoint
from gemma4vl.models import Gemma4VLModel

logger = logging.getLogger(__name__)

_FUSED = (ROUTER_PROJ, SHARED_GATE, SHARED_UP)

EXPERT_SLICE = "#"
"""Export names ``<hf name>#<expert>`` are one expert's slice of a grouped ``[E, ...]`` HF tensor."""


def split_expert_slice(name: str) -> tuple[str, int | None]:
    """(HF tensor name, expert index or None) of an exported name."""
    base, sep, index = name.rpartition(EXPERT_SLICE)
    return (base, int(index)) if sep and index.isdigit() else (name, None)
_EXPORT_DEPENDENCIES = (PRE_FFN_NORM_2, ROUTER_SCALE, PRE_FFN_NORM)


def precheck_hf_checkpoint(cfg: Gemma4HFConfig, *, megatron_bridge_names: bool = False) -> None:
    """Everything about the checkpoint whose config.json ``cfg`` was read from (:func:`read_hf_config`, strict)
    that can be checked without reading a weight or building the model: the config against transformers', the
    weight files found (:func:`~gemma4vl.bridge.checkpoint.weight_files`, symlinks resolved), every shard header
    complete, and the tensor names and shapes exactly those the config implies. ``megatron_bridge_names``: also
    require the file names that Megatron-Bridge's own import recognises (PEFT loads the base weights through it).
    Raises :class:`CheckpointError` (or ``HFConfigError``) naming the file / tensor."""
    check_against_transformers(cfg)
    expected, optional = expected_hf_shapes(cfg)
    check_tensors(scan_checkpoint(cfg.path.parent), expected, optional, where=str(cfg.path.parent))
    if megatron_bridge_names:
        problem = megatron_bridge_name_error(cfg.path.parent)
        if problem is not None:
            raise CheckpointError(problem)


def _is_fused(hf_name: str) -> bool:
    located = layer_and_name(hf_name)
    return located is not None and located[1] in _FUSED


@dataclass
class _ExportUnfusion:
    """Export-side state: fused tensors wait here until their layer's norm values have streamed past."""

    norms: Dict[str, torch.Tensor] = field(default_factory=dict)
    pending: Dict[str, torch.Tensor] = field(default_factory=dict)
    exact_originals: int = 0
    recomputed: int = 0


@MegatronModelBridge.register_bridge(
    source=Gemma4ForConditionalGeneration, target=Gemma4VLModel, provider=Gemma4VLModelProvider, model_type="gemma4"
)
class Gemma4VLBridge(Gemma4AdapterBridge, MegatronModelBridge):
    """Bridge of Gemma 4 vision-language MoE checkpoints (e.g. google/gemma-4-26B-A4B); LoRA adapters merged or
    as a PEFT adapter: :mod:`gemma4vl.bridge.adapters`."""

    # ---------------------------------------------------------------- config
    def gemma4_config(self) -> Gemma4HFConfig:
        """The strictly-read config.json of the checkpoint this bridge was created for."""
        cached = getattr(self, "_gemma4_config", None)
        if cached is None:
            path = getattr(self.hf_pretrained, "model_name_or_path", None)
            if path is None:
                raise ValueError("Gemma4VLBridge needs a checkpoint directory (AutoBridge.from_hf_pretrained(path))")
            cached = read_hf_config(path)
            check_against_transformers(cached)
            self._gemma4_config = cached
        return cached

    def provider_bridge(self, hf_pretrained) -> Gemma4VLModelProvider:
        self.hf_pretrained = hf_pretrained
        return provider_from_hf_config(self.gemma4_config())

    def mapping_registry(self):
        return mapping_registry(self.gemma4_config())

    # ---------------------------------------------------------------- strictness
    def validate_checkpoint(self) -> None:
        """Check the checkpoint's safetensors headers against its config (no tensor data is read)."""
        precheck_hf_checkpoint(self.gemma4_config())

    def build_conversion_tasks(self, hf_pretrained, megatron_model, weight_dtype=None):
        self.hf_pretrained = hf_pretrained
        tasks = super().build_conversion_tasks(hf_pretrained, megatron_model, weight_dtype=weight_dtype)
        self._check_coverage(hf_pretrained, megatron_model, tasks)
        return tasks

    def _check_coverage(self, hf_pretrained, megatron_model, tasks) -> None:
        names = self._megatron_global_param_names_all_pp_ranks(megatron_model)
        if self._share_embeddings_and_output_weights(unwrap_model(megatron_model)[0].config):
            names = [n for n in names if "output_layer" not in n]
        registry = self.mapping_registry()
        unmapped = [n for n in names if registry.megatron_to_hf_lookup(self._get_lora_unwrapped_name(n)) is None]
        if unmapped:
            raise ValueError(f"Megatron parameters without a checkpoint mapping: {unmapped[:8]}")
        if not hasattr(hf_pretrained, "state"):
            return
        keys = set(scan_checkpoint(self.gemma4_config().path.parent))  # our reader, not Megatron-Bridge's
        used: set[str] = set()
        for task in tasks:
            if task is None:
                continue
            hf = task.mapping.hf_param
            used.update([hf] if isinstance(hf, str) else hf.values())
        missing = sorted(used - keys)
        if missing:
            raise CheckpointError(f"{hf_pretrained.model_name_or_path}: missing tensor(s) {missing[:8]}")
        unused = sorted(keys - used - ({LM_HEAD} if self.gemma4_config().tie_word_embeddings else set()))
        if unused:
            raise CheckpointError(f"{hf_pretrained.model_name_or_path}: tensor(s) no Megatron parameter takes: "
                                  f"{unused[:8]}")

    # ---------------------------------------------------------------- import
    def load_weights_hf_to_megatron(self, hf_pretrained, megatron_model, allowed_mismatched_params=None):
        """Load the checkpoint into ``megatron_model`` (a model or list of virtual-pipeline chunks)."""
        if allowed_mismatched_params:
            raise ValueError("Gemma4VLBridge loads strictly; allowed_mismatched_params is not supported")
        self.hf_pretrained = hf_pretrained
        self.validate_checkpoint()
        models = megatron_model if isinstance(megatron_model, list) else [megatron_model]
        unwrapped = unwrap_model(models)
        tasks = [t for t in self.build_conversion_tasks(hf_pretrained, unwrapped) if t is not None]
        state = MmapCheckpoint(self.gemma4_config().path.parent)
        local = [t for t in tasks if t.megatron_module is not None]
        copier = _ParallelCopier(state)
        written: set[int] = set()  # id() of every Megatron parameter a task wrote
        for task in local:
            where, first_expert = _source_name(task), _first_local_expert(task)
            # A fused tensor (router, shared expert) arrives unfused with its per-column factor; the copy
            # thread fuses it into the parameter (see fusion.fuse_into), off this thread.
            hf_weights, factor = self._read(task.mapping.hf_param, state)
            sources = list(hf_weights.values()) if isinstance(hf_weights, dict) else [hf_weights]
            done = sources
            plan = self._copy_plan(task, hf_weights)
            if plan is not None:
                copier.copy(plan, release=done, factor=factor, where=where, first_expert=first_expert)
                written.add(id(task.param_weight))
            else:
                converted = task.mapping.hf_to_megatron(hf_weights, task.megatron_module)
                if converted is not None:
                    if converted.shape != task.param_weight.shape:
                        raise CheckpointError(
                            f"{task.mapping.hf_param} converts to shape {list(converted.shape)} but Megatron "
                            f"parameter {task.global_param_name} has shape {list(task.param_weight.shape)}")
                    copier.copy([(task.param_weight, converted)], release=[converted, *done], factor=factor,
                                where=where, first_expert=first_expert)
                    written.add(id(task.param_weight))
                del converted
            del hf_weights, sources, done, plan
        copier.wait()
        state.close()
        self._broadcast_shared_embeddings(models)
        self._check_all_written(unwrapped, written)
        return models

    def _check_all_written(self, chunks, written: set[int]) -> None:
        """Every local Megatron parameter was written by a task (the output layer of a tied-embedding model is
        the embedding, or a copy of it that ``_broadcast_shared_embeddings`` made): else the model would train
        from its initialisation, or from uninitialised memory."""
        tied = self._share_embeddings_and_output_weights(chunks[0].config)
        unwritten = [name for chunk in chunks for name, param in chunk.named_parameters()
                     if id(param) not in written and not (tied and name.endswith("output_layer.weight"))]
        if unwritten:
            raise CheckpointError(f"{self.gemma4_config().path.parent}: the import wrote no value into "
                                  f"{len(unwritten)} Megatron parameter(s): {unwritten}")

    @staticmethod
    def _copy_plan(task, hf_weights):
        """The mapping's direct copies into the parameter (see :mod:`gemma4vl.bridge.mappings`), or None."""
        planner = getattr(task.mapping, "copy_plan", None)  # only our concatenating mappings have one
        if planner is None:
            return None
        try:
            return planner(hf_weights, task.megatron_module, task.param_weight)
        except ValueError as e:
            raise CheckpointError(f"{task.mapping.hf_param} -> Megatron parameter {task.global_param_name}: "
                                  f"{e}") from e

    def _read(self, hf_param, state):
        """(unfused tensor(s) of one mapping, their fusion factor or None)."""
        try:
            return self._read_unfused(hf_param, state)
        except (fusion.FusionError, CheckpointError):
            raise
        except Exception as e:  # safetensors raises its own error types on damaged data
            raise CheckpointError(f"{self.hf_pretrained.model_name_or_path}: cannot read {hf_param}: {e}") from e

    def maybe_modify_loaded_hf_weight(self, hf_param, hf_state_dict: Mapping[str, torch.Tensor]):
        """Read the tensor(s) of one mapping, applying the MoE fusions to the router and the shared expert."""
        weights, factor = self._read_unfused(hf_param, hf_state_dict)
        if factor is None:
            return weights
        if isinstance(weights, dict):
            return {k: fusion.fuse(w, factor) for k, w in weights.items()}
        return fusion.fuse(weights, factor)

    def _read_unfused(self, hf_param, hf_state_dict: Mapping[str, torch.Tensor]):
        """The tensor(s) of one mapping as stored, and the per-input-column factor (float64 [H]) that fuses them:
        the router's and the shared expert's gate/up have one (see :mod:`gemma4vl.bridge.fusion`), others None.
        The factor applies per input column, so it commutes with the mappings' row concatenation and
        tensor-parallel row split."""
        if isinstance(hf_param, dict):
            weights = {k: hf_state_dict[v] for k, v in hf_param.items()}
            gate = layer_and_name(hf_param.get("gate", ""))
            if gate is not None and gate[1] == SHARED_GATE:
                prefix = HF_LAYER.format(gate[0])
                return weights, fusion.shared_factor(hf_state_dict[prefix + PRE_FFN_NORM],
                                                     hf_state_dict[prefix + PRE_FFN_NORM_2], where=f"layer {gate[0]}")
            return weights, None
        weight = hf_state_dict[hf_param]
        located = layer_and_name(hf_param)
        if located is not None and located[1] == ROUTER_PROJ:
            prefix = HF_LAYER.format(located[0])
            return weight, fusion.router_factor(hf_state_dict[prefix + ROUTER_SCALE],
                                                hf_state_dict[prefix + PRE_FFN_NORM_2], hidden_size=weight.shape[1],
                                                where=f"layer {located[0]}")
        return weight, None

    # ---------------------------------------------------------------- export
    def stream_weights_megatron_to_hf(self, megatron_model, hf_pretrained, cpu: bool = True,
                                      show_progress: bool = True, conversion_tasks=None,
                                      merge_adapter_weights: bool = True, weight_dtype=None):
        self._unfusion = _ExportUnfusion()
        self.hf_pretrained = hf_pretrained
        self._start_adapter_merge(megatron_model, merge_adapter_weights)
        try:
            yield from super().stream_weights_megatron_to_hf(
                megatron_model, hf_pretrained, cpu=cpu, show_progress=show_progress,
                conversion_tasks=conversion_tasks, merge_adapter_weights=merge_adapter_weights,
                weight_dtype=weight_dtype)
        finally:
            self._adapter_merge = None
        if self._unfusion.pending:
            raise RuntimeError(f"export ended with fused tensors whose norms never arrived: "
                               f"{sorted(self._unfusion.pending)[:5]}")
        logger.info("export un-fusion: %d tensor(s) written as the checkpoint's exact originals, %d recomputed",
                    self._unfusion.exact_originals, self._unfusion.recomputed)

    def maybe_modify_converted_hf_weight(self, task: WeightConversionTask, converted_weights_dict, hf_state_dict):
        """Invert the MoE fusions with the model's current norm weights (see :mod:`gemma4vl.bridge.fusion`); a
        LoRA adapter on a fused tensor is merged into it first (see :mod:`gemma4vl.bridge.adapters`)."""
        state = self._unfusion
        fused = {n: t for n, t in converted_weights_dict.items() if _is_fused(n)}
        if fused:
            converted_weights_dict = {**converted_weights_dict, **self._merge_into_fused(task, fused)}
        out: Dict[str, torch.Tensor] = {}
        for name, tensor in converted_weights_dict.items():
            located = layer_and_name(name)
            if located is not None and located[1] in _FUSED:
                state.pending[name] = tensor
                continue
            if located is not None and located[1] in _EXPORT_DEPENDENCIES:
                state.norms[name] = tensor
            out[name] = tensor
        for name in list(state.pending):
            result = self._unfuse(name, hf_state_dict)
            if result is not None:
                out[name] = result
                del state.pending[name]
        return out

    def _unfuse(self, name: str, hf_state_dict) -> torch.Tensor | None:
        state = self._unfusion
        layer, local = layer_and_name(name)
        prefix = HF_LAYER.format(layer)
        anchor = prefix + (ROUTER_SCALE if local == ROUTER_PROJ else PRE_FFN_NORM)
        if prefix + PRE_FFN_NORM_2 not in state.norms or anchor not in state.norms:
            return None
        current = state.pending[name]
        w2 = state.norms[prefix + PRE_FFN_NORM_2]
        where = f"layer {layer}"
        if local == ROUTER_PROJ:
            factor = fusion.router_factor(state.norms[anchor], w2, hidden_size=current.shape[1], where=where)
        else:
            factor = fusion.shared_factor(state.norms[anchor], w2, where=where)
        original = self._source_tensor(hf_state_dict, name)
        if fusion.exact_preimage(original, factor, current):
            state.exact_originals += 1
            return original
        state.recomputed += 1
        return fusion.unfuse(current, factor, where=where)

    @staticmethod
    def _source_tensor(hf_state_dict, name: str) -> torch.Tensor | None:
        try:
            return hf_state_dict[name]
        except (KeyError, FileNotFoundError, OSError):
            return None

    # ---------------------------------------------------------------- LoRA
    def _is_fused_qkv(self, hf_weight_names) -> bool:
        """A ``linear_qkv`` export: q, k and v, or q and k alone on K=V layers (so a LoRA merge splits the adapter's
        output rows by projection there too)."""
        names = list(hf_weight_names)
        found = {t for name in names for t in ("q_proj", "k_proj", "v_proj") if t in name}
        return (len(names), found) in ((3, {"q_proj", "k_proj", "v_proj"}), (2, {"q_proj", "k_proj"}))

    def _split_qkv_linear_out_weight(self, megatron_model, linear_out_weight):
        """Split a LoRA ``linear_qkv`` output weight into q/k/v; sliding and full layers are told apart by size,
        and K=V layers report ``v_proj`` as absent."""
        model = megatron_model[0] if isinstance(megatron_model, list) else megatron_model
        config = unwrap_model(model).config
        arch = config.gemma4
        feature_dim = linear_out_weight.shape[-1] if linear_out_weight.ndim == 2 else 1
        matches = []
        for spec in (arch.sliding, arch.full):
            rows = (config.num_attention_heads + 2 * spec.num_kv_heads) * spec.head_dim
            if rows * feature_dim == linear_out_weight.numel():
                matches.append(spec)
        if len(matches) != 1:
            raise ValueError(f"LoRA linear_qkv output of {list(linear_out_weight.shape)} matches "
                             f"{len(matches)} attention layer types (sliding and full must differ in size)")
        spec = matches[0]
        shape_cfg = _AttentionShape(config.num_attention_heads, spec.num_kv_heads, spec.head_dim, config.hidden_size)
        q, k, v = split_qkv_weights(shape_cfg, linear_out_weight,
                                    feature_dim=linear_out_weight.shape[-1] if linear_out_weight.ndim == 2 else None)
        return {"q_proj": q, "k_proj": k, "v_proj": ABSENT_PROJECTION if spec.k_eq_v else v}


def _source_name(task) -> str:
    """The HF tensor(s) a task reads and the Megatron parameter it writes, as named in errors."""
    hf = task.mapping.hf_param
    names = ", ".join(hf.values()) if isinstance(hf, dict) else str(hf)
    return f"{names} -> Megatron parameter {task.global_param_name}"


def _first_local_expert(task) -> int | None:
    """For a grouped expert parameter [E_local, ...]: the global index of its first expert (EP rank r holds
    experts r*E_local ...), so an error can name the expert; else None."""
    if not isinstance(task.mapping, GroupedExpertMapping):
        return None
    return task.mapping.ep_rank * task.param_weight.shape[0]


class _ParallelCopier:
    """Parameter copies on a small thread pool, so that the mappings' conversions and collectives (in order, on
    the calling thread) overlap the copies, which are most of an import's time (the kernel faulting in fresh
    parameter pages; 0, 1 and 3 threads measured alike here, see docs/bridge.md). Each destination's pages are
    populated first (:func:`host_pages.populate`, large ones half on a helper thread). The MoE fusions run here
    (:func:`fusion.fuse_into`). Source pages are released after each copy (see :meth:`MmapCheckpoint.release`)."""

    def __init__(self, reader: MmapCheckpoint, workers: int = 3, max_pending: int = 8):
        from concurrent.futures import ThreadPoolExecutor

        self.reader = reader
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="import-copy")
        self.helper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="import-populate")
        self.pending: list = []
        self.max_pending = max_pending

    def _copy(self, plan: list, release: list, factor: torch.Tensor | None, where: str,
              first_expert: int | None = None) -> None:
        with torch.no_grad():
            for param, source in plan:
                host_pages.populate(param, self.helper)
                if factor is None:
                    param.copy_(source)
                else:
                    fusion.fuse_into(param, source, factor)
                # The destination, while its pages are still warm: catches non-finite values in the checkpoint
                # and any that a fusion or a dtype narrowing (fp32 -> bf16 overflow) produced.
                if param.is_floating_point() and not all_finite(param):
                    if first_expert is not None:  # a grouped expert parameter: name the experts
                        bad = [first_expert + i for i in range(param.shape[0]) if not all_finite(param[i])]
                        raise CheckpointError(f"non-finite values (nan / inf) in {where} "
                                              f"[expert {', '.join(map(str, bad))}]")
                    raise CheckpointError(f"non-finite values (nan / inf) in {where}")
        for tensor in release:
            self.reader.release(tensor)

    def copy(self, plan: list, release: list, factor: torch.Tensor | None = None, where: str = "",
             first_expert: int | None = None) -> None:
        """``dest <- source`` for each ``(dest, source)`` of ``plan`` (``fuse(source, factor)`` when a fusion
        factor is given) on a pool thread, then checked finite (an error names ``where``); then the pages of the
        tensors in ``release`` leave this process."""
        self.pending.append(self.pool.submit(self._copy, plan, release, factor, where, first_expert))
        while len(self.pending) > self.max_pending:
            self.pending.pop(0).result()

    def wait(self) -> None:
        try:
            for future in self.pending:
                future.result()
        finally:
            for future in self.pending:
                future.cancel()
            self.pending.clear()
            self.pool.shutdown()
            self.helper.shutdown()


@dataclass
class _AttentionShape:
    """The attention fields ``split_qkv_weights`` reads, for one layer type."""

    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    hidden_size: int
    attention_output_gate: bool = False
