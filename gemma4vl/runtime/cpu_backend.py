"""The ``device: cpu`` backend: Megatron-Core 0.19.x on a CPU-only machine, with the gloo process-group backend.

Megatron-Core assumes a CUDA device at a finite set of call sites. :func:`activate` redirects exactly those to the
CPU: it never modifies the global ``torch.cuda`` module, never reads an environment variable, and is only called
through :func:`gemma4vl.runtime.setup_runtime` with ``device="cpu"`` (on a GPU machine with ``device="cuda"`` it
stays inactive). It checks that megatron-core is 0.19.x, the version these call sites were found in, and raises
:class:`UnsupportedMegatronVersionError` otherwise; it also fails loudly if a patched attribute no longer exists.

The call sites below were found by running real code on CPU (single process and 2-process gloo): a local-spec
GPTModel, dense and MoE (alltoall and allgather dispatchers, shared expert, aux loss, expert bias), tensor,
sequence, expert, pipeline (Megatron's schedules, tied embeddings) and data parallel, activation recompute, fp32
and bf16, Megatron's DDP (with and without overlapped grad reduce), ``get_megatron_optimizer`` (Adam / SGD, with
and without the distributed optimizer, ``log_num_zeros_in_grad``), and a ``dist_checkpointing`` save / load /
resume of model and optimizer.

A. Modules that get a module-scoped ``torch`` (:class:`_TorchOnCpu`)
-------------------------------------------------------------------
The module's global name ``torch`` is rebound to a stand-in that forwards everything to the real ``torch`` except:

- ``torch.cuda`` is :class:`_CudaOnCpu`, an explicit allow-list: ``current_device()`` is ``torch.device("cpu")``;
  ``Stream``, ``current_stream``, ``stream``, ``synchronize`` and ``empty_cache`` are no-ops (CPU kernels run
  synchronously, so cross-stream ordering holds trivially); ``get_rng_state`` / ``set_rng_state`` /
  ``manual_seed`` act on the CPU default generator, which plays the role of the CUDA default generator;
  ``device_count()`` is 0 and ``memory_stats()`` is ``{}`` (the truth: no device, no CUDA allocator);
  ``OutOfMemoryError`` is ``torch.OutOfMemoryError``. Any other ``torch.cuda.X`` raises ``AttributeError`` naming
  the module, so a call site not listed here fails loudly instead of misbehaving.
- the factories ``tensor``, ``zeros``, ``ones``, ``empty``, ``full``, ``arange`` map a CUDA ``device=``
  (``"cuda"``, ``"cuda:N"``, a CUDA ``torch.device``) to the CPU.

Modules (``megatron/core/...``) and the call sites in them that need it:

- ``tensor_parallel/random.py``: ``model_parallel_cuda_manual_seed`` seeds the default generator with
  ``torch.cuda.manual_seed``; ``CudaRNGStatesTracker.add`` uses ``torch.cuda.get_rng_state`` / ``manual_seed``.
- ``models/common/embeddings/rotary_pos_embedding.py``: ``RotaryEmbedding.get_emb`` moves ``inv_freq`` to
  ``torch.cuda.current_device()``; ``RotaryEmbedding.__init__`` allocates it there without
  ``use_cpu_initialization``.
- ``transformer/moe/token_dispatcher.py``: ``MoEAlltoAllTokenDispatcher.__init__`` creates a
  ``torch.cuda.Stream()`` for device-to-host copies; ``_maybe_dtoh_and_synchronize`` uses ``current_stream``,
  ``stream``, the stream's ``record_event`` and the event's ``synchronize``.
- ``transformer/moe/router.py``: ``TopKRouter.gating`` moves the router weight to ``current_device()``;
  ``TopKRouter.__init__`` puts the expert-bias buffers there (``moe_router_enable_expert_bias``).
- ``transformer/utils.py``: ``get_default_causal_mask`` (no attention mask passed) uses
  ``torch.ones(..., device="cuda")``.
- ``tensor_parallel/mappings.py``: ``_gather_along_first_dim`` / ``_reduce_scatter_along_first_dim`` (sequence
  parallel) and ``_AllToAll.forward`` (uneven all-to-all of the alltoall dispatcher) allocate their outputs on
  ``current_device()``.
- ``tensor_parallel/layers.py``: ``VocabParallelEmbedding`` / ``ColumnParallelLinear`` /
  ``RowParallelLinear.__init__`` without ``use_cpu_initialization`` allocate weights on ``current_device()``;
  ``LinearWithGradAccumulationAndAsyncCommunication.backward`` allocates the sequence-parallel all-gather buffer
  there.
- ``utils.py``: ``GlobalMemoryBuffer.get_tensor`` allocates on ``current_device()``.
- ``distributed/param_and_grad_buffer.py``: ``_ParamAndGradBuffer.__init__`` allocates the param / grad buffers
  on ``current_device()``; ``_ParamAndGradBucketGroup.start_grad_sync`` uses ``current_stream()``.
- ``optimizer/optimizer.py``: ``FP32Optimizer.__init__`` (``_scale``), ``MixedPrecisionOptimizer.__init__``
  (``_dummy_overflow_buf``, ``_scale_one``; bf16) and ``MegatronOptimizer.has_grad_norm_group`` (a flag) create
  tensors with ``device='cuda'``.
- ``optimizer/clip_grads.py``: ``count_zeros_fp32`` (``log_num_zeros_in_grad``) creates its counter with
  ``device='cuda'``.
- ``pipeline_parallel/schedules.py``: ``forward_backward_no_pipelining`` and the pipelined schedules count tokens
  in ``torch.zeros([], device="cuda")``.
- ``pipeline_parallel/p2p_communication.py``: ``P2PCommunicator`` allocates shape and receive buffers on
  ``current_device()`` and calls ``torch.cuda.synchronize()``.
- ``dist_checkpointing/strategies/filesystem_async.py``: ``FileSystemWriterAsync.preload_tensors`` calls
  ``torch.cuda.synchronize()``.
- ``dist_checkpointing/strategies/state_dict_saver.py``: ``save_state_dict_async_finalize`` all-reduces a
  failure flag created on ``current_device()``.
- ``timers.py``: ``Timer.start`` / ``stop`` call ``torch.cuda.synchronize()``; ``Timers._get_elapsed_time_all_ranks``
  all-gathers the timings in a tensor on ``current_device()`` (Megatron-Bridge's loop times and logs through them).
- ``rerun_state_machine.py``: ``RerunStateMachine._reduce_any`` all-reduces flags in ``device='cuda'`` tensors;
  ``validate_result`` names ``current_device()`` in its NaN / Inf / spiky-loss messages; the rerun modes save
  and restore RNG states through ``torch.cuda.get_rng_state`` / ``set_rng_state``.
- ``megatron/training/models/dist_utils.py`` (shipped in the megatron-core wheel): ``_ddp_wrap``, through which
  Megatron-Bridge wraps the model in DDP, creates a ``torch.cuda.Stream()`` for DDP initialisation and uses
  ``current_stream`` / ``stream``.

B. Replaced functions and classes (same signature and contract, CPU implementation)
-----------------------------------------------------------------------------------
- ``tensor_parallel/random.py``: ``_get_cuda_rng_state`` / ``_set_cuda_rng_state`` read / write the CUDA default
  generator (``torch.cuda.default_generators``, ``torch.cuda._lazy_call``); replaced by functions on the CPU
  default generator (``graph_safe=True`` raises: no CUDA graphs on CPU). Activation recompute
  (``CheckpointFunction``) saves and restores RNG states through them. ``CudaRNGStatesTracker``, the class
  ``initialize_rng_tracker`` instantiates, is replaced by a subclass (``CpuRNGStatesTracker``) whose ``fork``
  drops upstream's "CPU RNG state changed within GPU RNG context" warning: on CPU the tracked generator *is* the
  CPU generator, so every random op inside a fork would trigger it. Instances still pass Megatron's
  ``isinstance(..., CudaRNGStatesTracker)`` checks. An empty tracker created before activation is discarded (the
  next one is a CPU tracker); activating after the tracker was seeded raises.
- ``transformer/moe/moe_utils.py``: ``maybe_move_tensor_to_cpu`` copies only CUDA tensors to the host, so on CPU
  the alltoall dispatcher's split sizes stayed torch tensors and ``all_to_all_single`` rejected them (expert
  parallel > 1). Replaced by :func:`maybe_move_tensor_to_cpu` (a host copy, numpy when asked), also rebound in
  ``transformer/moe/token_dispatcher.py``, which imports it by name.
- ``optimizer/clip_grads.py``: ``get_grad_norm_fp32`` allocates its accumulator with ``device='cuda'`` and uses
  the multi-tensor L2 kernel; ``clip_grad_by_total_norm_fp32`` asserts ``grad.type() == 'torch.cuda.FloatTensor'``
  and scales through ``multi_tensor_applier``. Replaced by :func:`get_grad_norm_fp32` (the true p-norm: local
  ``sum |g|^p``, or max for the inf-norm, all-reduced with gloo over the FSDP data-parallel group for DTensor grads
  and then over ``grad_stats_parallel_group``, the model-parallel group) and :func:`clip_grad_by_total_norm_fp32`
  (grads scaled in place by ``max_norm / (total_norm + 1e-6)`` when that is below 1): clipping is real. Both names
  are also rebound where they were imported by name: ``optimizer/optimizer.py`` (``MegatronOptimizer.get_grad_norm``
  / ``clip_grad_norm``) and ``optimizer/layer_wise_optimizer.py`` (``get_grad_norm_fp32``).

C. Wrapped methods (the original runs, with one input or step changed)
---------------------------------------------------------------
- ``optimizer/distrib_optimizer.py``: ``DistributedOptimizer.__init__`` (and ``_build_model_and_main_param_groups``,
  which it calls) and ``optimizer/optimizer.py``: ``Float16OptimizerWithFloat16Params.__init__`` sort parameters by
  ``param.type()`` against ``'torch.cuda.FloatTensor'`` / ``HalfTensor`` / ``BFloat16Tensor`` and raise
  ``TypeError`` on a CPU tensor. While the constructor runs, and only then, the parameters of the wrapped torch
  optimizer report the CUDA type name of their dtype (an instance attribute ``type`` shadowing ``Tensor.type``,
  deleted in a ``finally``).
- ``models/common/language_module/language_module.py``: ``LanguageModule.setup_embeddings_and_output_layer`` ends,
  with pipeline parallelism and tied embeddings, in ``weight.data = weight.data.cuda()`` before the all-reduce
  that copies the first stage's embedding into the last stage's output weight. While the original runs, its
  ``_is_in_embd_group`` (called only there) is shadowed by a stand-in that records the answer and returns False;
  the wrapper then performs the same all-reduce on the CPU tensor.
- ``optimizer/distrib_optimizer.py``: ``DistributedOptimizer.get_parameter_state_dp_zero`` with
  ``use_gloo_comm=False`` (chosen by ``sharded_state_dict`` for some checkpoint formats) moves buffers to the GPU
  with ``tensor.cuda()`` to gather them over NCCL; it always takes its gloo path, which gathers the same CPU
  buffers over the data-parallel gloo group Megatron creates.

D. The distributed optimizer's checkpoint path without Apex / Transformer Engine
-------------------------------------------------------------------------------
Not CUDA calls, but upstream bugs of the torch-Adam fallback that every CPU-only machine takes (found by a
save / load / resume round trip; the tests pin the resumed losses):

- ``optimizer/distrib_optimizer.py``: ``DistributedOptimizer.sharded_state_dict(is_loading=True)`` calls
  ``state_dict()``, which asserts that all Adam states share one ``step`` and so fails on a never-stepped
  optimizer (every resume). Wrapped to allocate the state first with Megatron's own
  ``_init_optimizer_states_with_dummy_values`` (as upstream does for ``fsdp_dtensor``).
- ``optimizer/distrib_optimizer.py``: ``DistributedOptimizer.load_state_dict`` gives every parameter the *same*
  ``step`` tensor; torch's Adam increments it in place once per parameter, so each step after a resume advanced
  it by the number of parameters, silently corrupting the bias correction. And for the ``dp_reshardable``
  format (Megatron-Bridge's default) the parameter-state load then overwrites every ``step`` with the dummy value
  of its loading template (1): a resume at iteration 3 continued with Adam step 1 (found in Megatron-Bridge's
  loop; a resume after one step hides it). Wrapped to give each parameter, after loading, a ``step`` tensor of
  its own holding the checkpoint's param-group ``step``.
- ``optimizer/distrib_optimizer.py``: ``DistributedOptimizer._set_main_param_and_optimizer_states`` copies
  ``tensors[key]`` for every tensor of a parameter's optimizer state, torch Adam's ``step`` included, but the
  ``fully_reshardable`` (and ``fully_sharded_model_space``) loaders leave ``step`` out (``load_state_dict``
  restores it from the param groups): loading those formats failed with ``KeyError: 'step'``. Wrapped to pass
  the keys the loader left out as ``None``, which the method already skips. With it, both distributed-optimizer
  formats Megatron-Bridge writes (``dp_reshardable``, its default, and ``fully_reshardable`` with
  ``dist_ckpt_optim_fully_reshardable=True``, needed to resume with another data-parallel size) resume exactly.

Not covered (they fail loudly if reached): CUDA graphs, Transformer Engine, the fused / DeepEP / HybridEP MoE
dispatchers and ``moe_permute_fusion``, NCCL user buffers, partial distributed optimizer instances, optimizer CPU
offloading, straggler detection and NVTX.

E-G. Megatron-Bridge
--------------------
Megatron-Bridge's training loop (``megatron.bridge.training``: initialisation, ``setup``, ``train``, evaluation,
checkpointing, logging, the SIGTERM handler) and its use of Megatron-Core are covered by
:mod:`gemma4vl.runtime.cpu_backend_bridge` (its docstring has the table), which :func:`activate` activates too:
the Megatron-Bridge modules are patched when first imported, so processes that only use Megatron-Core do not pay
for importing Megatron-Bridge.
"""

from __future__ import annotations

import contextlib
import importlib
import types
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import inf

SUPPORTED_MEGATRON_CORE = (0, 19)

_active = False


class UnsupportedMegatronVersionError(RuntimeError):
    """The installed megatron-core is not the version the CPU backend's patches were written for."""


# ----------------------------------------------------------------------------------------------------------------
# A. Module-scoped torch stand-in
# ----------------------------------------------------------------------------------------------------------------


class _NullStream:
    """A CUDA stream stand-in: on CPU every kernel runs synchronously, so ordering between streams holds."""

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> _NullEvent:
        return _NullEvent()

    def synchronize(self) -> None:
        pass

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _NullStream)

    def __hash__(self) -> int:
        return 0


class _NullEvent:
    """A CUDA event stand-in, as returned by :meth:`_NullStream.record_event`."""

    def record(self, stream: Any = None) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


_NULL_STREAM = _NullStream()


class _CudaOnCpu:
    """What ``torch.cuda`` means inside a patched Megatron-Core module: the CPU, with an explicit allow-list."""

    def __init__(self, module_name: str):
        self._module_name = module_name

    # Device placement.
    @staticmethod
    def current_device() -> torch.device:
        return torch.device("cpu")

    # Streams and synchronisation: no-ops on CPU.
    @staticmethod
    def Stream(*args: Any, **kwargs: Any) -> _NullStream:  # noqa: N802 (mirrors torch.cuda.Stream)
        return _NullStream()

    @staticmethod
    def current_stream(*args: Any, **kwargs: Any) -> _NullStream:
        return _NULL_STREAM

    @staticmethod
    def stream(stream: Any) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    @staticmethod
    def synchronize(*args: Any, **kwargs: Any) -> None:
        pass

    @staticmethod
    def empty_cache() -> None:
        pass

    # Device inventory and allocator statistics: the truth on a CPU-only machine.
    @staticmethod
    def device_count() -> int:
        return 0

    @staticmethod
    def memory_stats(device: Any = None) -> dict:
        # No CUDA caching allocator runs, so there are no statistics (torch itself answers {} when CUDA is not
        # initialised); Megatron-Bridge's memory report is then empty.
        return {}

    # RNG: the CPU default generator stands in for the CUDA default generator.
    @staticmethod
    def get_rng_state(device: Any = "cuda") -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(new_state: torch.Tensor, device: Any = "cuda") -> None:
        torch.set_rng_state(new_state)

    @staticmethod
    def manual_seed(seed: int) -> None:
        # Seed only the CPU generator. (torch.manual_seed would also queue a CUDA seed; harmless, but not needed.)
        torch.default_generator.manual_seed(int(seed))

    # Exception types named in ``except`` clauses.
    OutOfMemoryError = torch.OutOfMemoryError

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(
            f"{self._module_name} uses torch.cuda.{name}, which gemma4vl's CPU backend does not provide. "
            "This call site was not reached when the backend was written; add a reviewed CPU stand-in to "
            "gemma4vl/runtime/cpu_backend.py (_CudaOnCpu) and document it there."
        )


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, str):
        return device == "cuda" or device.startswith("cuda:")
    return isinstance(device, torch.device) and device.type == "cuda"


def _factory_on_cpu(factory: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Wrap a torch tensor factory so that a CUDA ``device=`` keyword means the CPU."""

    def wrapper(*args: Any, **kwargs: Any) -> torch.Tensor:
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return factory(*args, **kwargs)

    wrapper.__name__ = factory.__name__
    wrapper.__doc__ = f"torch.{factory.__name__} with a CUDA device mapped to the CPU (gemma4vl CPU backend)."
    return wrapper


_CPU_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange")


class _TorchOnCpu(types.ModuleType):
    """The ``torch`` a patched Megatron-Core module sees: real torch, except ``cuda`` and the tensor factories."""

    def __init__(self, module_name: str):
        super().__init__(f"torch[cpu backend for {module_name}]")
        self.cuda = _CudaOnCpu(module_name)
        for name in _CPU_FACTORIES:
            setattr(self, name, _factory_on_cpu(getattr(torch, name)))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


# Megatron-Core modules whose global ``torch`` is replaced by a _TorchOnCpu (module docstring, section A).
_MODULES_WITH_CPU_TORCH = (
    "megatron.core.tensor_parallel.random",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.transformer.moe.token_dispatcher",
    "megatron.core.transformer.moe.router",
    "megatron.core.transformer.utils",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.utils",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.timers",
    "megatron.core.rerun_state_machine",
    "megatron.training.models.dist_utils",
)


# ----------------------------------------------------------------------------------------------------------------
# B. Replacements: RNG state and tracker
# ----------------------------------------------------------------------------------------------------------------


def _refuse_graph_safe(graph_safe: bool) -> None:
    if graph_safe:
        raise RuntimeError("gemma4vl's CPU backend: graph-safe RNG states need CUDA graphs, which the CPU lacks.")


def _get_cpu_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    """CPU replacement for ``megatron.core.tensor_parallel.random._get_cuda_rng_state``."""
    _refuse_graph_safe(graph_safe)
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    """CPU replacement for ``megatron.core.tensor_parallel.random._set_cuda_rng_state``."""
    _refuse_graph_safe(graph_safe)
    torch.set_rng_state(new_state)


def _make_cpu_rng_tracker_class(base: type) -> type:
    """Subclass Megatron's ``CudaRNGStatesTracker`` so that it tracks states of the CPU default generator."""

    class CpuRNGStatesTracker(base):  # type: ignore[valid-type, misc]
        """Megatron's RNG state tracker on the CPU default generator (see the cpu_backend module docstring)."""

        def __init__(self, use_cudagraphable_rng: bool = False, is_inference_rng_tracker: bool = False):
            if use_cudagraphable_rng:
                raise RuntimeError("gemma4vl's CPU backend: use_cudagraphable_rng needs CUDA graphs.")
            super().__init__(use_cudagraphable_rng=False, is_inference_rng_tracker=is_inference_rng_tracker)

        @contextlib.contextmanager
        def fork(self, name: str = "model-parallel-rng") -> Iterator[None]:
            """Swap the named state into the CPU generator, run the block, store the advanced state, swap back.

            Same bookkeeping as upstream ``CudaRNGStatesTracker.fork``, minus its "CPU RNG state changed"
            warning, which on CPU would fire on every random op inside the block.
            """
            if name not in self.states_:
                raise Exception(f"cpu rng state {name} is not added")
            orig_state = torch.get_rng_state()
            orig_state_name = self._current_state_name
            if orig_state_name != "default-rng":
                self.states_[orig_state_name] = orig_state
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                if self._current_state_name != name:
                    raise Exception(
                        f"current state name {self._current_state_name} is not the same as the desired "
                        f"state name {name}."
                    )
                self.states_[name] = torch.get_rng_state()
                if orig_state_name != "default-rng":
                    orig_state = self.states_[orig_state_name]
                torch.set_rng_state(orig_state)
                self._current_state_name = orig_state_name

    CpuRNGStatesTracker.__qualname__ = "CpuRNGStatesTracker"
    return CpuRNGStatesTracker


# ----------------------------------------------------------------------------------------------------------------
# B. Replacements: MoE host copies
# ----------------------------------------------------------------------------------------------------------------


def maybe_move_tensor_to_cpu(
    tensor: torch.Tensor | None, as_numpy: bool = False, record_stream: bool = False
) -> torch.Tensor | Any:
    """CPU replacement for ``megatron.core.transformer.moe.moe_utils.maybe_move_tensor_to_cpu``.

    Upstream copies a *CUDA* tensor to the host (optionally as a numpy array) and leaves any other tensor alone,
    so on CPU the alltoall dispatcher's split sizes stayed torch tensors, which ``all_to_all_single`` rejects.
    Here the dispatcher's device tensors live on the CPU, so they get the same host snapshot a CUDA tensor
    gets: a copy, converted to numpy when ``as_numpy``.
    """
    if torch.is_tensor(tensor):
        tensor = tensor.to("cpu", copy=True)
        if as_numpy:
            tensor = tensor.numpy()
    return tensor


# ----------------------------------------------------------------------------------------------------------------
# B. Replacements: gradient norm and clipping
# ----------------------------------------------------------------------------------------------------------------


def get_grad_norm_fp32(
    grads_for_norm: list[torch.Tensor] | torch.Tensor,
    norm_type: int | float = 2,
    grad_stats_parallel_group: torch.distributed.ProcessGroup | None = None,
) -> float:
    """CPU replacement for ``megatron.core.optimizer.clip_grads.get_grad_norm_fp32`` (same contract).

    Computes the p-norm of all ``grads_for_norm`` as one vector, in fp32: the local sum of ``|g|^p`` (or the
    local max for the inf-norm) is all-reduced over the FSDP data-parallel group (DTensor grads only) and then
    over ``grad_stats_parallel_group`` (the model-parallel group, or the world for the distributed optimizer).
    The caller (``MegatronOptimizer.get_grad_norm``) has already removed tensor-parallel duplicates and shared
    parameters, so the result equals the norm of the full, unsharded gradient.
    """
    from megatron.core.utils import get_data_parallel_group_if_dtensor, to_local_if_dtensor

    if isinstance(grads_for_norm, torch.Tensor):
        grads_for_norm = [grads_for_norm]
    data_parallel_group = None
    for grad in grads_for_norm:
        data_parallel_group = get_data_parallel_group_if_dtensor(grad, data_parallel_group)
    grads = [to_local_if_dtensor(grad).detach() for grad in grads_for_norm]

    norm_type = float(norm_type)
    if norm_type == inf:
        op = torch.distributed.ReduceOp.MAX
        local = [grad.abs().max().float() for grad in grads if grad.numel() > 0]
        total = torch.stack(local).max().reshape(1) if local else torch.zeros(1, dtype=torch.float32)
    else:
        op = torch.distributed.ReduceOp.SUM
        total = torch.zeros(1, dtype=torch.float32)
        for grad in grads:
            total += torch.linalg.vector_norm(grad, ord=norm_type, dtype=torch.float32) ** norm_type

    if data_parallel_group:
        torch.distributed.all_reduce(total, op=op, group=data_parallel_group)
    torch.distributed.all_reduce(total, op=op, group=grad_stats_parallel_group)
    if norm_type == inf:
        return total.item()
    return total.item() ** (1.0 / norm_type)


def clip_grad_by_total_norm_fp32(
    parameters: list[torch.Tensor] | torch.Tensor,
    max_norm: int | float,
    total_norm: float,
    use_decoupled_grad: bool = False,
) -> None:
    """CPU replacement for ``megatron.core.optimizer.clip_grads.clip_grad_by_total_norm_fp32`` (same contract).

    Scales every fp32 gradient in place by ``max_norm / (total_norm + 1e-6)`` when that coefficient is below 1.
    """
    from megatron.core.utils import to_local_if_dtensor

    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    grad_attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = []
    for param in parameters:
        grad = getattr(param, grad_attr, None)
        if grad is None:
            continue
        allowed = (torch.float32, torch.bfloat16) if use_decoupled_grad else (torch.float32,)
        if grad.dtype not in allowed:
            raise TypeError(f"clip_grad_by_total_norm_fp32 expects {allowed} grads, got {grad.dtype}")
        grads.append(to_local_if_dtensor(grad).detach())

    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if isinstance(clip_coeff, torch.Tensor):
        clip_coeff = clip_coeff.clamp_max(1.0)
        torch._foreach_mul_(grads, clip_coeff)
    elif clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)


# ----------------------------------------------------------------------------------------------------------------
# C. Constructors that sort parameters by their CUDA type name
# ----------------------------------------------------------------------------------------------------------------

_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
}


@contextlib.contextmanager
def _params_report_cuda_type(param_groups: Iterable[dict]) -> Iterator[None]:
    """Within the block, ``param.type()`` of every CPU parameter in ``param_groups`` answers its CUDA type name."""
    patched = []
    try:
        for group in param_groups:
            for param in group["params"]:
                if param.device.type != "cpu" or param.dtype not in _CUDA_TYPE_NAMES:
                    continue
                if "type" in param.__dict__:
                    raise RuntimeError("cpu_backend: a parameter already has an instance attribute 'type'")
                cuda_name = _CUDA_TYPE_NAMES[param.dtype]
                param.type = lambda *args, _name=cuda_name, **kwargs: _name
                patched.append(param)
        yield
    finally:
        for param in patched:
            del param.type


def _with_cuda_type_names(init: Callable[..., None]) -> Callable[..., None]:
    """Wrap an optimizer ``__init__(self, optimizer, ...)`` in :func:`_params_report_cuda_type`."""

    def wrapped_init(self, optimizer, *args, **kwargs):
        param_groups = optimizer.param_groups if optimizer is not None else []
        with _params_report_cuda_type(param_groups):
            init(self, optimizer, *args, **kwargs)

    wrapped_init.__name__ = "__init__"
    wrapped_init.__wrapped__ = init
    wrapped_init.__doc__ = init.__doc__
    return wrapped_init


def _gather_state_over_gloo(get_parameter_state_dp_zero: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``DistributedOptimizer.get_parameter_state_dp_zero`` so that it always takes its gloo path.

    Its other path (``use_gloo_comm=False``, chosen by ``sharded_state_dict`` for the ``fully_reshardable`` and
    ``fully_sharded_bucket_space`` formats) moves the buffers to the GPU with ``tensor.cuda()`` to gather them
    over NCCL. On the CPU backend the gloo path, which gathers the same CPU buffers over the data-parallel gloo
    group Megatron always creates, produces the same state.
    """

    def wrapper(self, use_gloo_comm: bool = True, empty_data: bool = False, return_on_all_ranks: bool = False):
        return get_parameter_state_dp_zero(
            self, use_gloo_comm=True, empty_data=empty_data, return_on_all_ranks=return_on_all_ranks
        )

    wrapper.__wrapped__ = get_parameter_state_dp_zero
    wrapper.__doc__ = get_parameter_state_dp_zero.__doc__
    return wrapper


def _sync_tied_embedding_without_cuda(setup: Callable[[Any], None]) -> Callable[[Any], None]:
    """Wrap ``LanguageModule.setup_embeddings_and_output_layer`` so its final all-reduce runs without ``.cuda()``.

    With pipeline parallelism and tied embeddings, the method ends with ``if self._is_in_embd_group() and not
    config.init_model_with_meta_device: weight.data = weight.data.cuda(); all_reduce(weight.data, embd_group)``,
    which copies the first stage's embedding into the last stage's output weight. ``_is_in_embd_group`` is called
    nowhere else in the method, so while the original runs it is shadowed by a stand-in that records that the
    all-reduce was reached (and the real answer) and returns False; the wrapper then performs the same all-reduce
    on the CPU tensor.
    """

    def wrapper(self) -> None:
        reached: list[bool] = []
        is_in_embd_group = self._is_in_embd_group

        def record_and_skip() -> bool:
            reached.append(is_in_embd_group())
            return False

        self._is_in_embd_group = record_and_skip
        try:
            setup(self)
        finally:
            del self._is_in_embd_group
        if reached and reached[0] and not self.config.init_model_with_meta_device:
            torch.distributed.all_reduce(self.shared_embedding_or_output_weight().data, group=self.embd_group)

    wrapper.__name__ = setup.__name__
    wrapper.__wrapped__ = setup
    wrapper.__doc__ = setup.__doc__
    return wrapper


# ----------------------------------------------------------------------------------------------------------------
# D. The distributed optimizer's checkpoint path without Apex / Transformer Engine
# ----------------------------------------------------------------------------------------------------------------


def _allocate_state_before_loading(sharded_state_dict: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``DistributedOptimizer.sharded_state_dict`` so that a never-stepped optimizer can be loaded into.

    Without Apex / TE, ``state_dict()`` (which ``sharded_state_dict`` calls) asserts that all Adam states share
    one ``step``, which fails when there is no state yet, i.e. on every resume into a fresh optimizer. When
    loading into an optimizer without state, this first allocates it with Megatron's own
    ``_init_optimizer_states_with_dummy_values`` (upstream does the same for its ``fsdp_dtensor`` format); the
    dummy values are overwritten by the load.
    """

    def wrapper(self, model_sharded_state_dict=None, is_loading=False, sharding_type=None, metadata=None):
        if is_loading and len(self.optimizer.state) == 0:
            self._init_optimizer_states_with_dummy_values()
        if model_sharded_state_dict is None:
            model_sharded_state_dict = {}
        return sharded_state_dict(self, model_sharded_state_dict, is_loading, sharding_type, metadata)

    wrapper.__wrapped__ = sharded_state_dict
    wrapper.__doc__ = sharded_state_dict.__doc__
    return wrapper


def _untie_adam_steps(load_state_dict: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``DistributedOptimizer.load_state_dict``: every parameter gets its own Adam ``step``, the checkpoint's.

    Without Apex / TE, upstream restores ``step`` from the param groups by assigning *one* tensor to every
    parameter's state; torch's Adam increments ``state["step"]`` in place per parameter, so after a resume each
    optimizer step advanced the shared counter once per parameter (seen: step 39 instead of 2 after one step).
    Then the ``dp_reshardable`` parameter-state load copies the per-parameter ``step`` of its loading template
    over it: the dummy value the template was allocated with (1), not the checkpoint's (seen: 1 instead of 3 on
    a resume at iteration 3; a resume after one step hid it). Either way Adam's bias correction was silently
    wrong. After loading, each parameter's ``step`` is set to a tensor of its own holding the param groups'
    ``step`` (the value upstream restores, "read from param_groups").
    """

    def wrapper(self, state_dict):
        load_state_dict(self, state_dict)
        groups = state_dict.get("optimizer", {}).get("param_groups", []) if isinstance(state_dict, dict) else []
        steps = {group["step"] for group in groups if "step" in group}
        for state in self.optimizer.state.values():
            if not torch.is_tensor(state.get("step")):
                continue
            if len(steps) == 1:
                state["step"] = torch.tensor(float(next(iter(steps))), dtype=state["step"].dtype)
            else:
                state["step"] = state["step"].clone()

    wrapper.__wrapped__ = load_state_dict
    wrapper.__doc__ = load_state_dict.__doc__
    return wrapper


def _skip_states_not_in_checkpoint(set_states: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``DistributedOptimizer._set_main_param_and_optimizer_states`` to skip states the loader left out.

    It copies ``tensors[key]`` into every tensor of the parameter's optimizer state. Without Apex / TE that state
    includes torch Adam's ``step`` tensor, which the ``fully_reshardable`` / ``fully_sharded_model_space`` loaders
    deliberately leave out of ``tensors`` (``load_state_dict`` restores ``step`` from the param groups), so the
    lookup raised ``KeyError: 'step'``. The missing keys are passed as ``None``, which the method skips.
    """

    def wrapper(self, model_param, tensors):
        if not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            missing = [key for key in self.optimizer.state[main_param] if key not in tensors]
            if missing:
                tensors = {**tensors, **dict.fromkeys(missing)}
        return set_states(self, model_param, tensors)

    wrapper.__wrapped__ = set_states
    wrapper.__doc__ = set_states.__doc__
    return wrapper


# ----------------------------------------------------------------------------------------------------------------
# The patch table and activation
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CallSitePatch:
    """One patched attribute: ``owner`` is a module path, or ``module:Class`` for a class attribute."""

    owner: str
    attribute: str
    replacement: Callable[[Any], Any]  # original value -> replacement
    why: str


def _cpu_torch_for(module_name: str) -> Callable[[Any], Any]:
    return lambda _original: _TorchOnCpu(module_name)


def _same(replacement: Any) -> Callable[[Any], Any]:
    return lambda _original: replacement


_RANDOM = "megatron.core.tensor_parallel.random"
_MOE_UTILS = "megatron.core.transformer.moe.moe_utils"
_DISPATCHER = "megatron.core.transformer.moe.token_dispatcher"
_CLIP = "megatron.core.optimizer.clip_grads"

PATCHES: tuple[CallSitePatch, ...] = (
    *(
        CallSitePatch(
            name, "torch", _cpu_torch_for(name), "torch.cuda / device='cuda' call sites (docstring section A)"
        )
        for name in _MODULES_WITH_CPU_TORCH
    ),
    CallSitePatch(_RANDOM, "_get_cuda_rng_state", _same(_get_cpu_rng_state), "reads the CUDA generator"),
    CallSitePatch(_RANDOM, "_set_cuda_rng_state", _same(_set_cpu_rng_state), "writes the CUDA generator"),
    CallSitePatch(_RANDOM, "CudaRNGStatesTracker", _make_cpu_rng_tracker_class, "fork warns on every CPU random op"),
    CallSitePatch(_MOE_UTILS, "maybe_move_tensor_to_cpu", _same(maybe_move_tensor_to_cpu), "only copies CUDA tensors"),
    CallSitePatch(_DISPATCHER, "maybe_move_tensor_to_cpu", _same(maybe_move_tensor_to_cpu), "imported by name"),
    CallSitePatch(_CLIP, "get_grad_norm_fp32", _same(get_grad_norm_fp32), "device='cuda', multi-tensor L2"),
    CallSitePatch(
        _CLIP, "clip_grad_by_total_norm_fp32", _same(clip_grad_by_total_norm_fp32), "asserts torch.cuda grads"
    ),
    CallSitePatch(
        "megatron.core.optimizer.optimizer", "get_grad_norm_fp32", _same(get_grad_norm_fp32), "imported by name"
    ),
    CallSitePatch(
        "megatron.core.optimizer.optimizer",
        "clip_grad_by_total_norm_fp32",
        _same(clip_grad_by_total_norm_fp32),
        "imported by name",
    ),
    CallSitePatch(
        "megatron.core.optimizer.layer_wise_optimizer",
        "get_grad_norm_fp32",
        _same(get_grad_norm_fp32),
        "imported by name",
    ),
    CallSitePatch(
        "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer",
        "__init__",
        _with_cuda_type_names,
        "sorts params by param.type() == 'torch.cuda.*'",
    ),
    CallSitePatch(
        "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer",
        "get_parameter_state_dp_zero",
        _gather_state_over_gloo,
        "use_gloo_comm=False gathers through tensor.cuda()",
    ),
    CallSitePatch(
        "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer",
        "sharded_state_dict",
        _allocate_state_before_loading,
        "state_dict() asserts on a never-stepped optimizer without Apex / TE",
    ),
    CallSitePatch(
        "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer",
        "load_state_dict",
        _untie_adam_steps,
        "one shared Adam step tensor after loading without Apex / TE",
    ),
    CallSitePatch(
        "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer",
        "_set_main_param_and_optimizer_states",
        _skip_states_not_in_checkpoint,
        "KeyError 'step' loading the fully_reshardable format without Apex / TE",
    ),
    CallSitePatch(
        "megatron.core.models.common.language_module.language_module:LanguageModule",
        "setup_embeddings_and_output_layer",
        _sync_tied_embedding_without_cuda,
        "weight.data.cuda() before the tied-embedding all-reduce (pipeline parallel)",
    ),
    CallSitePatch(
        "megatron.core.optimizer.optimizer:Float16OptimizerWithFloat16Params",
        "__init__",
        _with_cuda_type_names,
        "sorts params by param.type() == 'torch.cuda.*'",
    ),
)


def _check_megatron_core_version() -> None:
    import megatron.core
    from packaging.version import Version

    version = Version(megatron.core.__version__)
    if version.release[:2] != SUPPORTED_MEGATRON_CORE:
        supported = ".".join(map(str, SUPPORTED_MEGATRON_CORE))
        raise UnsupportedMegatronVersionError(
            f"gemma4vl's CPU backend patches megatron-core {supported}.x call sites, but megatron-core "
            f"{megatron.core.__version__} is installed. Re-check every call site listed in "
            "gemma4vl/runtime/cpu_backend.py against that version before changing the pin."
        )


def _check_rng_tracker_unseeded() -> None:
    """Refuse to activate after Megatron's RNG tracker was seeded: it holds CUDA generator states."""
    from megatron.core.tensor_parallel import random as mcore_random

    tracker = mcore_random._CUDA_RNG_STATE_TRACKER
    if tracker is not None and tracker.is_initialized():
        raise RuntimeError(
            "Megatron-Core's RNG tracker was seeded before the CPU backend was activated; call "
            "gemma4vl.runtime.setup_runtime('cpu') before seeding (initialize_model_parallel does it first)."
        )


def _discard_unseeded_rng_tracker() -> None:
    """Drop a tracker created (empty) before activation, so that the next one is a ``CpuRNGStatesTracker``."""
    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._CUDA_RNG_STATE_TRACKER = None
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = False


def _resolve(patch: CallSitePatch) -> tuple[Any, Any]:
    """Return (object to patch, replacement); raise if the attribute is gone (a different Megatron-Core)."""
    module_name, _, class_name = patch.owner.partition(":")
    target = importlib.import_module(module_name)
    if class_name:
        target = getattr(target, class_name)
    if patch.attribute not in vars(target):
        raise UnsupportedMegatronVersionError(
            f"gemma4vl's CPU backend: {patch.owner}.{patch.attribute} does not exist in the installed "
            "megatron-core; the patch table in gemma4vl/runtime/cpu_backend.py is out of date."
        )
    return target, patch.replacement(vars(target)[patch.attribute])


def activate() -> None:
    """Redirect Megatron-Core's CUDA call sites to the CPU (see the module docstring). Idempotent.

    Everything is checked before anything is patched, so a failure leaves Megatron-Core untouched.
    """
    global _active
    if _active:
        return
    from gemma4vl.runtime import cpu_backend_bridge

    _check_megatron_core_version()
    _check_rng_tracker_unseeded()
    resolved = [(patch, *_resolve(patch)) for patch in PATCHES]
    apply_bridge_patches = cpu_backend_bridge.prepare()
    for patch, target, replacement in resolved:
        setattr(target, patch.attribute, replacement)
    apply_bridge_patches()
    _discard_unseeded_rng_tracker()
    _active = True


def is_active() -> bool:
    """True once :func:`activate` has run in this process (there is no deactivation)."""
    return _active
