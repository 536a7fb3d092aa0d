"""The code the CPU backend installs: torch / CUDA stand-ins, replacement functions and wrappers.

Nothing here patches anything: the tables :mod:`gemma4vl.runtime.patches_core` (Megatron-Core, sections A-D) and
:mod:`gemma4vl.runtime.patches_bridge` (Megatron-Bridge, sections E-G) say where each of these goes and why, and
:func:`gemma4vl.runtime.cpu_backend.activate` applies them through :mod:`gemma4vl.runtime.patching`. The section
letters below are those of the tables' docstrings.
"""

from __future__ import annotations

import contextlib
import importlib
import types
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import inf

# ----------------------------------------------------------------------------------------------------------------
# A. Module-scoped torch stand-in
# ----------------------------------------------------------------------------------------------------------------


class NullStream:
    """A CUDA stream stand-in: on CPU every kernel runs synchronously, so ordering between streams holds."""

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> NullEvent:
        return NullEvent()

    def synchronize(self) -> None:
        pass

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NullStream)

    def __hash__(self) -> int:
        return 0


class NullEvent:
    """A CUDA event stand-in, as returned by :meth:`NullStream.record_event`."""

    def record(self, stream: Any = None) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


_NULL_STREAM = NullStream()


class CudaOnCpu:
    """What ``torch.cuda`` means inside a patched Megatron-Core module: the CPU, with an explicit allow-list."""

    def __init__(self, module_name: str):
        self._module_name = module_name

    # Device placement.
    @staticmethod
    def current_device() -> torch.device:
        return torch.device("cpu")

    # Streams and synchronisation: no-ops on CPU.
    @staticmethod
    def Stream(*args: Any, **kwargs: Any) -> NullStream:  # noqa: N802 (mirrors torch.cuda.Stream)
        return NullStream()

    @staticmethod
    def current_stream(*args: Any, **kwargs: Any) -> NullStream:
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
            "gemma4vl/runtime/cpu_standins.py (CudaOnCpu) and document it in gemma4vl/runtime/patches_core.py."
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


class TorchOnCpu(types.ModuleType):
    """The ``torch`` a patched Megatron-Core module sees: real torch, except ``cuda`` and the tensor factories."""

    def __init__(self, module_name: str):
        super().__init__(f"torch[cpu backend for {module_name}]")
        self.cuda = CudaOnCpu(module_name)
        for name in _CPU_FACTORIES:
            setattr(self, name, _factory_on_cpu(getattr(torch, name)))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


def torch_on_cpu_for(module_name: str) -> Callable[[Any], Any]:
    """A table ``replacement`` for a module's global ``torch``: a :class:`TorchOnCpu` naming that module."""
    return lambda _original: TorchOnCpu(module_name)


# ----------------------------------------------------------------------------------------------------------------
# B. Replacements: RNG state and tracker
# ----------------------------------------------------------------------------------------------------------------


def _refuse_graph_safe(graph_safe: bool) -> None:
    if graph_safe:
        raise RuntimeError("gemma4vl's CPU backend: graph-safe RNG states need CUDA graphs, which the CPU lacks.")


def get_cpu_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    """CPU replacement for ``megatron.core.tensor_parallel.random._get_cuda_rng_state``."""
    _refuse_graph_safe(graph_safe)
    return torch.get_rng_state()


def set_cpu_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    """CPU replacement for ``megatron.core.tensor_parallel.random._set_cuda_rng_state``."""
    _refuse_graph_safe(graph_safe)
    torch.set_rng_state(new_state)


def cpu_rng_tracker_class(base: type) -> type:
    """Subclass Megatron's ``CudaRNGStatesTracker`` so that it tracks states of the CPU default generator."""

    class CpuRNGStatesTracker(base):  # type: ignore[valid-type, misc]
        """Megatron's RNG state tracker on the CPU default generator (see gemma4vl.runtime.patches_core, section B)."""

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


def with_cuda_type_names(init: Callable[..., None]) -> Callable[..., None]:
    """Wrap an optimizer ``__init__(self, optimizer, ...)`` in :func:`_params_report_cuda_type`."""

    def wrapped_init(self, optimizer, *args, **kwargs):
        param_groups = optimizer.param_groups if optimizer is not None else []
        with _params_report_cuda_type(param_groups):
            init(self, optimizer, *args, **kwargs)

    wrapped_init.__name__ = "__init__"
    wrapped_init.__wrapped__ = init
    wrapped_init.__doc__ = init.__doc__
    return wrapped_init


def gather_state_over_gloo(get_parameter_state_dp_zero: Callable[..., Any]) -> Callable[..., Any]:
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


def sync_tied_embedding_without_cuda(setup: Callable[[Any], None]) -> Callable[[Any], None]:
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


def allocate_state_before_loading(sharded_state_dict: Callable[..., Any]) -> Callable[..., Any]:
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


def untie_adam_steps(load_state_dict: Callable[..., Any]) -> Callable[..., Any]:
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


def skip_states_not_in_checkpoint(set_states: Callable[..., Any]) -> Callable[..., Any]:
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
# E. Module-scoped torch; eval.py's Tensor.cuda()
# ----------------------------------------------------------------------------------------------------------------


def _host_cuda(tensor: torch.Tensor) -> Callable[..., torch.Tensor]:
    def cuda(*args: Any, **kwargs: Any) -> torch.Tensor:
        return tensor

    return cuda


class TorchOnCpuWithHostTensors(TorchOnCpu):
    """``TorchOnCpu`` whose ``tensor(...)`` results answer ``.cuda()`` with themselves (``training/eval.py``)."""

    def __init__(self, module_name: str):
        super().__init__(module_name)
        tensor_on_cpu = self.tensor

        def tensor(*args: Any, **kwargs: Any) -> torch.Tensor:
            result = tensor_on_cpu(*args, **kwargs)
            result.cuda = _host_cuda(result)
            return result

        tensor.__name__ = "tensor"
        tensor.__doc__ = "torch.tensor on the CPU whose result's .cuda() returns it (gemma4vl CPU backend)."
        self.tensor = tensor


def torch_on_cpu_with_host_tensors_for(module_name: str) -> Callable[[Any], Any]:
    """A table ``replacement`` for a module's global ``torch``: a :class:`TorchOnCpuWithHostTensors`."""
    return lambda _original: TorchOnCpuWithHostTensors(module_name)


# ----------------------------------------------------------------------------------------------------------------
# F. Replacements
# ----------------------------------------------------------------------------------------------------------------


def set_random_seed(
    seed_: int,
    data_parallel_random_init: bool = False,
    te_rng_tracker: bool = False,
    inference_rng_tracker: bool = False,
    use_cudagraphable_rng: bool = False,
    *,
    pg_collection: Any,
) -> None:
    """CPU replacement for ``megatron.bridge.training.initialize._set_random_seed`` (same seeds and contract).

    Seeds ``random``, numpy and torch with ``seed_ + 100 * pp_rank`` (``+ 10 * dp_rank`` with
    ``data_parallel_random_init``), then *always* seeds Megatron-Core's RNG tracker with
    ``model_parallel_cuda_manual_seed`` (upstream skips it when ``torch.cuda.device_count() == 0``).
    """
    import random

    import numpy as np
    from megatron.core import tensor_parallel
    from megatron.core.utils import get_pg_rank

    if seed_ is None or seed_ <= 0:
        raise ValueError(f"Seed ({seed_}) should be a positive integer.")
    if te_rng_tracker:
        raise RuntimeError("gemma4vl's CPU backend: rng.te_rng_tracker needs Transformer Engine; set it to False.")
    if use_cudagraphable_rng:
        raise RuntimeError("gemma4vl's CPU backend: CUDA-graphable RNG needs CUDA graphs; set cuda_graph_impl='none'.")
    current_rank = torch.distributed.get_rank()
    seed = seed_ + 100 * torch.distributed.get_group_rank(pg_collection.pp, current_rank)
    if data_parallel_random_init:
        seed += 10 * torch.distributed.get_group_rank(pg_collection.dp, current_rank)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(
        seed,
        te_rng_tracker,
        inference_rng_tracker,
        use_cudagraphable_rng,
        tp_rank=get_pg_rank(pg_collection.tp),
        ep_rank=get_pg_rank(pg_collection.ep),
        etp_rank=get_pg_rank(pg_collection.expt_tp),
    )


def check_dataset_helpers() -> None:
    """CPU-backend replacement for ``compile_helpers`` as used by ``initialize_megatron``: the helpers ship compiled.

    Imports ``megatron.core.datasets.helpers_cpp`` (the compiled module the wheel ships) instead of running
    ``make`` on a Makefile the wheel does not ship.
    """
    try:
        importlib.import_module("megatron.core.datasets.helpers_cpp")
    except ImportError as error:
        raise RuntimeError(
            "megatron.core.datasets.helpers_cpp (Megatron-Core's compiled dataset helpers) cannot be imported, and "
            "the installed megatron-core has no Makefile to build it: reinstall megatron-core."
        ) from error


def skip_jit_warmup(model_config: Any, micro_batch_size: int) -> None:
    """CPU replacement for ``megatron.bridge.training.initialize._warmup_jit_function``: no warm-up.

    The warm-up only pre-compiles fused GPU kernels; on CPU it would draw its random inputs from the generator
    the weights come from (see gemma4vl.runtime.patches_bridge, section F).
    """


def multi_tensor_applier(op: Callable[..., Any], noop_flag_buffer: Any, tensor_lists: Any, *args: Any) -> Any:
    """CPU replacement for ``train_utils.multi_tensor_applier``: Megatron-Core's local implementation."""
    from megatron.core.utils import local_multi_tensor_applier

    return local_multi_tensor_applier(op, noop_flag_buffer, tensor_lists, *args)


def multi_tensor_l2norm(chunk_size: int, noop_flag: Any, tensor_lists: Any, per_tensor: bool, *args: Any) -> Any:
    """CPU replacement for ``train_utils.multi_tensor_l2norm``: Megatron-Core's local implementation."""
    from megatron.core.utils import local_multi_tensor_l2_norm

    return local_multi_tensor_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args)


# ----------------------------------------------------------------------------------------------------------------
# G. Wrappers
# ----------------------------------------------------------------------------------------------------------------


def allow_no_cuda(initialize_megatron: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``initialize_megatron`` so that it runs without CUDA (``allow_no_cuda=True``)."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        kwargs["allow_no_cuda"] = True
        return initialize_megatron(*args, **kwargs)

    wrapper.__name__ = initialize_megatron.__name__
    wrapper.__wrapped__ = initialize_megatron
    wrapper.__doc__ = initialize_megatron.__doc__
    return wrapper


def data_iterators_leave_generator_alone(setup_data_iterators: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``setup_data_iterators`` so that building the data iterators leaves the CPU default generator as it was.

    ``iter(DataLoader)`` draws a base seed from the CPU default generator. On CPU that generator also plays the
    CUDA default generator, which ``setup`` has just restored from the checkpoint: without this, a resumed run's
    random stream (dropout) is shifted by the number of loaders built, unlike on a GPU.
    """

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with torch.random.fork_rng(devices=[]):
            return setup_data_iterators(*args, **kwargs)

    wrapper.__name__ = setup_data_iterators.__name__
    wrapper.__wrapped__ = setup_data_iterators
    wrapper.__doc__ = setup_data_iterators.__doc__
    return wrapper


def honour_cpu_initialization(get_model: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``get_model(model_provider, ...)`` so that the provider's ``use_cpu_initialization=True`` is kept.

    Upstream assigns its ``use_cpu_initialization`` argument (``False`` from ``provide_distributed_model``) to the
    provider, then moves every module to ``torch.cuda.current_device()`` unless that flag is set.
    """

    def wrapper(model_provider: Any, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("use_cpu_initialization") or getattr(model_provider, "use_cpu_initialization", False):
            kwargs["use_cpu_initialization"] = True
        elif not kwargs.get("use_torch_fsdp2") and not kwargs.get("init_model_with_meta_device"):
            raise ValueError(
                "gemma4vl's CPU backend: the model config has use_cpu_initialization=False. On device 'cpu' set "
                "use_cpu_initialization=True in the model config: Megatron-Bridge's get_model otherwise moves the "
                "model to a CUDA device."
            )
        return get_model(model_provider, *args, **kwargs)

    wrapper.__name__ = get_model.__name__
    wrapper.__wrapped__ = get_model
    wrapper.__doc__ = get_model.__doc__
    return wrapper


