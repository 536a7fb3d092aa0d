"""The ``device: cpu`` backend, part 2: Megatron-Bridge 0.6.x's training loop on CPU (gloo).

Activated by :func:`gemma4vl.runtime.cpu_backend.activate` (through :func:`gemma4vl.runtime.setup_runtime` with
``device="cpu"``), never on its own; the Megatron-Core call sites it relies on are in ``cpu_backend``. Same rules:
no environment variable is read, the global ``torch.cuda`` is never modified, every patch is listed below and in
:data:`PATCHES`, and the installed megatron-bridge must be 0.6.x (checked from the package metadata, without
importing it) or activation raises :class:`~gemma4vl.runtime.cpu_backend.UnsupportedMegatronVersionError`.

The call sites were found by driving the loop the way ``megatron.bridge.training.pretrain`` does, piece by piece:
``runtime_config_update``, ``setup.setup`` (initialisation, model, DDP with and without the distributed optimizer,
optimizer, scheduler, checkpoint load, dataloaders), ``train.train`` (train step, timers, logging to the console,
TensorBoard and offline Weights & Biases, evaluation, interval checkpoints in the ``torch_dist`` format, the
SIGTERM handler) and ``train._finish_train``, on one process and on two gloo processes (data parallel with the
distributed optimizer; tensor + sequence parallel).

When the patches are applied
----------------------------
Importing ``megatron.bridge.training`` costs seconds, which processes that only use Megatron-Core should not pay.
A module below that is already imported at activation is patched at once; the others are patched the moment they
are first imported: activation puts a finder (:class:`_PatchOnImport`) on ``sys.meta_path`` that recognises exactly
the module names of :data:`PATCHES`, lets the regular finders locate them, and applies that module's patches right
after its code has run (before any importer can bind its names). A patch whose target attribute is missing raises
``UnsupportedMegatronVersionError`` from that import.

E. Megatron-Bridge modules that get a module-scoped ``torch`` (``cpu_backend._TorchOnCpu``)
------------------------------------------------------------------------------------------
Same stand-in as section A of ``cpu_backend`` (``torch.cuda`` is the CPU allow-list, CUDA ``device=`` of the
tensor factories means the CPU). Modules (``megatron/bridge/...``) and their call sites:

- ``training/initialize.py``: ``torch_dist_init`` sets the MoE aux-loss scale with
  ``torch.ones(1, device=torch.cuda.current_device())``; ``_initialize_distributed`` asks
  ``torch.cuda.device_count()`` (0 here: no ``set_device``; with ``distributed_backend="gloo"`` and
  ``use_decentralized_pg=False`` the Megatron-Core process groups are created as usual).
- ``training/setup.py``: ``setup`` all-reduces the start time in ``torch.tensor(..., device="cuda")``.
- ``training/train.py``: ``train_step`` / ``save_checkpoint_and_time`` call ``torch.cuda.empty_cache()``;
  ``maybe_synchronize_training_step`` calls ``torch.cuda.synchronize()``; ``checkpoint_and_decide_exit``
  all-reduces the ``exit_duration_in_mins`` flag in a ``device="cuda"`` tensor.
- ``training/checkpointing.py``: ``read_metadata`` all-reduces the iteration in a ``device="cuda"`` tensor;
  ``get_rng_state`` saves ``torch.cuda.get_rng_state()`` and ``_load_checkpoint_from_path`` restores it with
  ``torch.cuda.set_rng_state`` (both the CPU default generator here, which also plays the CUDA generator's
  role, so the saved ``cuda_rng_state`` equals ``torch_rng_state``); ``torch.cuda.empty_cache()``.
- ``training/eval.py``: ``evaluate`` creates its loss accumulators with ``torch.tensor([0.0, 0.0]).cuda()``:
  in this module's stand-in, the tensors ``torch.tensor`` returns carry an instance attribute ``cuda`` that
  returns the tensor itself (the same device it would reach on CPU). Also ``torch.cuda.synchronize`` /
  ``empty_cache`` and a ``device="cuda"`` flag for ``exit_duration_in_mins``.
- ``training/utils/train_utils.py``: ``training_log`` accumulates losses in ``device="cuda"`` tensors;
  ``reduce_max_stat_across_model_parallel_group``, ``logical_and_across_model_parallel_group`` and
  ``reduce_max_memory_across_pp_group`` all-reduce on ``current_device()``; ``report_memory`` reads
  ``torch.cuda.memory_stats()``, which is ``{}`` on CPU (no CUDA allocator), so the memory report is empty.
- ``data/loaders.py``: ``build_train_valid_test_data_loaders`` broadcasts the do-train/valid/test flags in a
  ``device="cuda"`` tensor.
- ``training/optim.py``: ``torch.cuda.empty_cache()``.

F. Replaced functions (same signature and contract, CPU implementation)
-----------------------------------------------------------------------
- ``training/initialize.py``: ``_set_random_seed`` seeds ``random``, numpy and torch, then calls Megatron-Core's
  ``model_parallel_cuda_manual_seed`` only ``if torch.cuda.device_count() > 0``: on CPU the tensor-parallel and
  expert RNG tracker would stay unseeded (any dropout or GPU-path initialisation inside a tracker fork then
  fails). Replaced by :func:`set_random_seed`: the same seeds (``seed + 100 * pp_rank``, ``+ 10 * dp_rank`` with
  ``data_parallel_random_init``), and the tracker always seeded (the CPU tracker of ``cpu_backend``).
  ``te_rng_tracker`` and CUDA-graphable RNG raise (no Transformer Engine, no CUDA graphs).
- ``training/initialize.py``: ``compile_helpers`` (Megatron-Core's, imported by name) runs ``make`` in
  ``megatron/core/datasets``, which the megatron-core wheel ships without its Makefile, so ``make`` fails and
  it calls ``sys.exit(1)``. The wheel ships the compiled module, ``helpers_cpp``. Replaced by
  :func:`check_dataset_helpers`, which imports ``megatron.core.datasets.helpers_cpp`` and raises a clear error
  if it is missing.
- ``training/initialize.py``: ``_warmup_jit_function`` pre-compiles Megatron-Core's fused bias-activation and
  bias-dropout-add kernels on random inputs. Its inputs come from the CUDA generator on a GPU; on CPU they would
  come from the CPU generator that ``use_cpu_initialization`` draws the weights from, so the warm-up would shift
  every weight; and ``torch.compile``-ing the kernels for the CPU costs compile time for a warm-up whose only
  purpose is GPU start-up. Replaced by :func:`skip_jit_warmup` (does nothing). The fused kernels still compile
  on first use if the model config selects them.
- ``training/utils/train_utils.py``: ``multi_tensor_applier`` / ``multi_tensor_l2norm`` (``calc_params_l2_norm``,
  i.e. ``logger.log_params_norm``) come from ``try: from transformer_engine.pytorch.optimizers import ...``,
  falling back to Apex, then to Megatron-Core's local implementations. gemma4vl's TE import shim answers
  Megatron-Bridge's TE imports with stubs, so the ``try`` succeeds and the names are uncallable stubs
  (``TypeError: '_StubModule' object is not callable``; a GPU machine without TE has the same problem). Replaced
  by :func:`multi_tensor_applier` / :func:`multi_tensor_l2norm`, which call Megatron-Core's
  ``local_multi_tensor_applier`` / ``local_multi_tensor_l2_norm``, the fallback Megatron-Bridge itself picks
  without TE and Apex.

G. Wrapped functions (the original runs, with one input changed)
----------------------------------------------------------------
- ``training/initialize.py``: ``initialize_megatron`` asserts ``torch.cuda.is_available()`` unless called with
  ``allow_no_cuda=True``, and ``setup.setup`` calls it without. Wrapped to pass ``allow_no_cuda=True``; also
  rebound in ``training/setup.py``, which imports it by name.
- ``training/setup.py``: ``setup_data_iterators`` (imported by name from ``data/loaders.py``) runs after the
  checkpoint was loaded, and every ``iter(DataLoader)`` draws a base seed from the CPU default generator, which
  on CPU also plays the CUDA default generator that the load has just restored (on a GPU the draw hits the CPU
  generator only). A resumed run's random stream (dropout outside tensor-parallel regions) was therefore shifted
  by the number of loaders built (seen: 2 draws). Wrapped in ``torch.random.fork_rng(devices=[])``: the loaders
  still draw their seeds, and the generator is then put back as it was.
- ``models/model_provider.py``: ``get_model`` (called by ``ModelProviderMixin.provide_distributed_model``, which
  ``setup`` uses) overwrites the provider's ``use_cpu_initialization`` with its own argument, and
  ``provide_distributed_model`` passes ``False``: the config's ``use_cpu_initialization=True`` is silently
  dropped, the weights are allocated through the GPU initialisation path and every module is then moved with
  ``.cuda(torch.cuda.current_device())``. Wrapped so that the provider's own ``use_cpu_initialization=True``
  is honoured; a provider with ``use_cpu_initialization=False`` is refused with a clear error. **On CPU the
  model config must set** ``use_cpu_initialization=True`` (it is what makes tensor-parallel layouts draw
  identical master weights, too).

Not covered (they fail loudly if reached, through the allow-list or an ``AttributeError``): Megatron-Bridge's own
forward steps (``gpt_step`` / ``vlm_step`` / ``utils/batch_utils.py`` move batches with ``Tensor.cuda()``: the
forward step must keep the batch on the CPU), ``use_decentralized_pg`` (HyperCommGrid groups are NCCL-only),
CUDA graphs, NVTX / nsys / memory-history profiling, in-process restart, fault tolerance and NVRx straggler
detection, async checkpoint saving, Megatron FSDP / torch FSDP2.

What the run's config must say on CPU (checked by ``tests/test_cpu_training_loop.py``)
-------------------------------------------------------------------------------------
- ``dist.distributed_backend="gloo"`` (and ``use_decentralized_pg=False``, the default).
- model: ``use_cpu_initialization=True`` (section G); ``gradient_accumulation_fusion=False`` (Megatron-Bridge's
  default needs Apex's CUDA extension and says so); ``cross_entropy_loss_fusion=False`` is advisable: the fused
  cross entropy is ``torch.compile``'d, and inductor compiles it for the CPU (about 30 s before the first
  iteration, and again for evaluation). Sequence parallelism with the local spec needs norms that mark their
  weight ``sequence_parallel`` (Megatron-Core's ``WrappedTorchNorm`` refuses it; a model-spec matter).
- checkpoints: ``ckpt_format="torch_dist"``; both distributed-optimizer formats resume exactly (``dp_reshardable``,
  the default, and ``fully_reshardable`` via ``dist_ckpt_optim_fully_reshardable=True``, which also resumes with
  another data-parallel size) with ``cpu_backend`` section D. Megatron-Core's ``torch_dist`` writer starts a
  ``multiprocessing`` manager process on the first save: the training process must not be daemonic.

SIGTERM (``train.exit_signal_handler=True``)
--------------------------------------------
``GlobalState.cfg = cfg`` installs ``DistributedSignalHandler`` (``train.exit_signal``, default SIGTERM), which
only records the signal. At the end of each iteration ``checkpoint_and_decide_exit`` all-gathers the flags
(``utils/sig_utils.py`` picks the CPU for gloo, so this works unpatched), saves a checkpoint if ``checkpoint.save``
is set, and stops the loop; ``train.train`` then finalises async saves, finishes W&B and calls
``sys.exit(exit_code)`` itself, without ``_finish_train``. ``exit_code`` is the rerun state machine's, which is 0
unless a rerun mode asked for 16 / 17: a SIGTERM'd run exits with status 0, and Megatron-Bridge has no setting for
another. A caller that wants a distinct status (Slurm requeue) catches ``SystemExit`` around ``train.train`` and
checks ``any(state.signal_handler.signals_received())`` (a collective: every rank gets there together).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.metadata
import sys
from collections.abc import Callable
from typing import Any

import torch

from gemma4vl.runtime.cpu_backend import CallSitePatch, UnsupportedMegatronVersionError, _TorchOnCpu

SUPPORTED_MEGATRON_BRIDGE = (0, 6)
_DISTRIBUTION = "megatron-bridge"

# Set on every replacement / wrapper this module installs, so that applying a table entry twice (a function
# patched where it is defined and where it was imported by name) never wraps a wrapper.
_MARK = "__gemma4vl_cpu_backend__"


def _marked(function: Callable) -> Callable:
    setattr(function, _MARK, True)
    return function


def _once(factory: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A table ``replacement`` that leaves an attribute alone when it already holds one of ours."""

    def make(original: Any) -> Any:
        if getattr(original, _MARK, False):
            return original
        return _marked(factory(original))

    return make


# ----------------------------------------------------------------------------------------------------------------
# E. Module-scoped torch; eval.py's Tensor.cuda()
# ----------------------------------------------------------------------------------------------------------------


def _host_cuda(tensor: torch.Tensor) -> Callable[..., torch.Tensor]:
    def cuda(*args: Any, **kwargs: Any) -> torch.Tensor:
        return tensor

    return cuda


class _TorchOnCpuWithHostTensors(_TorchOnCpu):
    """``_TorchOnCpu`` whose ``tensor(...)`` results answer ``.cuda()`` with themselves (``training/eval.py``)."""

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


def _cpu_torch(module_name: str) -> Callable[[Any], Any]:
    return lambda _original: _TorchOnCpu(module_name)


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
    the weights come from (see the module docstring, section F).
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


def _allow_no_cuda(initialize_megatron: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``initialize_megatron`` so that it runs without CUDA (``allow_no_cuda=True``)."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        kwargs["allow_no_cuda"] = True
        return initialize_megatron(*args, **kwargs)

    wrapper.__name__ = initialize_megatron.__name__
    wrapper.__wrapped__ = initialize_megatron
    wrapper.__doc__ = initialize_megatron.__doc__
    return wrapper


def _data_iterators_leave_generator_alone(setup_data_iterators: Callable[..., Any]) -> Callable[..., Any]:
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


def _honour_cpu_initialization(get_model: Callable[..., Any]) -> Callable[..., Any]:
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


# ----------------------------------------------------------------------------------------------------------------
# The patch table, and activation (patch on import)
# ----------------------------------------------------------------------------------------------------------------

_INITIALIZE = "megatron.bridge.training.initialize"

_MODULES_WITH_CPU_TORCH = (
    "megatron.bridge.training.initialize",
    "megatron.bridge.training.setup",
    "megatron.bridge.training.train",
    "megatron.bridge.training.checkpointing",
    "megatron.bridge.training.utils.train_utils",
    "megatron.bridge.data.loaders",
    "megatron.bridge.training.optim",
)

PATCHES: tuple[CallSitePatch, ...] = (
    *(
        CallSitePatch(name, "torch", _once(_cpu_torch(name)), "torch.cuda / device='cuda' call sites (section E)")
        for name in _MODULES_WITH_CPU_TORCH
    ),
    CallSitePatch(
        "megatron.bridge.training.eval",
        "torch",
        _once(lambda _original: _TorchOnCpuWithHostTensors("megatron.bridge.training.eval")),
        "torch.tensor(...).cuda() and torch.cuda call sites (section E)",
    ),
    CallSitePatch(_INITIALIZE, "_set_random_seed", _once(lambda _o: set_random_seed), "skips seeding without CUDA"),
    CallSitePatch(_INITIALIZE, "compile_helpers", _once(lambda _o: check_dataset_helpers), "runs make, no Makefile"),
    CallSitePatch(_INITIALIZE, "_warmup_jit_function", _once(lambda _o: skip_jit_warmup), "draws from the CPU RNG"),
    CallSitePatch(_INITIALIZE, "initialize_megatron", _once(_allow_no_cuda), "asserts torch.cuda.is_available()"),
    CallSitePatch(
        "megatron.bridge.training.utils.train_utils",
        "multi_tensor_applier",
        _once(lambda _o: multi_tensor_applier),
        "a Transformer Engine stub (TE import shim)",
    ),
    CallSitePatch(
        "megatron.bridge.training.utils.train_utils",
        "multi_tensor_l2norm",
        _once(lambda _o: multi_tensor_l2norm),
        "a Transformer Engine stub (TE import shim)",
    ),
    CallSitePatch(
        "megatron.bridge.training.setup", "initialize_megatron", _once(_allow_no_cuda), "imported by name"
    ),
    CallSitePatch(
        "megatron.bridge.training.setup",
        "setup_data_iterators",
        _once(_data_iterators_leave_generator_alone),
        "iter(DataLoader) draws from the generator just restored",
    ),
    CallSitePatch(
        "megatron.bridge.models.model_provider",
        "get_model",
        _once(_honour_cpu_initialization),
        "drops use_cpu_initialization, then .cuda()",
    ),
)


def installed_version() -> str | None:
    """The installed megatron-bridge version, from its metadata (no import), or None when it is not installed."""
    try:
        return importlib.metadata.version(_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_version() -> bool:
    """Raise if an unsupported megatron-bridge is installed; return whether one is installed at all."""
    from packaging.version import Version

    version = installed_version()
    if version is None:
        return False
    if Version(version).release[:2] != SUPPORTED_MEGATRON_BRIDGE:
        supported = ".".join(map(str, SUPPORTED_MEGATRON_BRIDGE))
        raise UnsupportedMegatronVersionError(
            f"gemma4vl's CPU backend patches megatron-bridge {supported}.x call sites, but megatron-bridge {version} "
            "is installed. Re-check every call site listed in gemma4vl/runtime/cpu_backend_bridge.py first."
        )
    return True


def _patches_by_module() -> dict[str, list[CallSitePatch]]:
    by_module: dict[str, list[CallSitePatch]] = {}
    for patch in PATCHES:
        by_module.setdefault(patch.owner.partition(":")[0], []).append(patch)
    return by_module


def _resolve_in(module: Any, patch: CallSitePatch) -> tuple[Any, Any]:
    module_name, _, class_name = patch.owner.partition(":")
    target = getattr(module, class_name) if class_name else module
    if patch.attribute not in vars(target):
        raise UnsupportedMegatronVersionError(
            f"gemma4vl's CPU backend: {patch.owner}.{patch.attribute} does not exist in the installed "
            "megatron-bridge; the patch table in gemma4vl/runtime/cpu_backend_bridge.py is out of date."
        )
    return target, patch.replacement(vars(target)[patch.attribute])


def _apply(module: Any, patches: list[CallSitePatch]) -> None:
    """Resolve all of a module's patches, then apply them (a failure leaves the module untouched)."""
    resolved = [(patch, *_resolve_in(module, patch)) for patch in patches]
    for patch, target, replacement in resolved:
        setattr(target, patch.attribute, replacement)


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Applies the patches of a listed Megatron-Bridge module right after the module's code has run.

    It only answers for the module names in its table; it lets the other finders on ``sys.meta_path`` locate the
    module, then wraps that spec's loader's ``exec_module`` for this one execution (an instance attribute,
    removed again, so the module's ``__loader__`` is the regular loader). It removes itself from
    ``sys.meta_path`` once every listed module has been patched.
    """

    def __init__(self, pending: dict[str, list[CallSitePatch]]):
        self.pending = pending

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in self.pending:
            return None
        spec = None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        if spec is None:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            raise ImportError(
                f"gemma4vl's CPU backend cannot patch {fullname} on import: its loader ({spec.loader!r}) has no "
                "exec_module. Import Megatron-Bridge before setup_runtime('cpu') to have it patched at activation."
            )
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_then_patch(module: Any) -> None:
            try:
                exec_module(module)
            finally:
                vars(loader).pop("exec_module", None)
            self._patch(fullname, module)

        loader.exec_module = exec_then_patch
        return spec

    def _patch(self, fullname: str, module: Any) -> None:
        patches = self.pending.pop(fullname, None)
        if patches:
            _apply(module, patches)
        if not self.pending and self in sys.meta_path:
            sys.meta_path.remove(self)


def prepare() -> Callable[[], None]:
    """Check everything, patch nothing; return the function that applies the patches. Used by ``cpu_backend``.

    The returned function patches the listed modules that are already imported, and arranges for the others to
    be patched when first imported. It does nothing when megatron-bridge is not installed. For another
    megatron-bridge than 0.6.x, or a missing attribute of an imported module, this raises
    ``UnsupportedMegatronVersionError`` before anything is patched.
    """
    if not check_version():
        return lambda: None
    already, pending = [], {}
    for module_name, patches in _patches_by_module().items():
        module = sys.modules.get(module_name)
        if module is not None:
            already.append((module, patches))
        else:
            pending[module_name] = patches
    resolved = [(patch, *_resolve_in(module, patch)) for module, patches in already for patch in patches]

    def apply() -> None:
        for patch, target, replacement in resolved:
            setattr(target, patch.attribute, replacement)
        if pending:
            sys.meta_path.insert(0, _PatchOnImport(pending))

    return apply
