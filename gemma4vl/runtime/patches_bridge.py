"""The Megatron-Bridge 0.6.x patch tables (data only; the code they install is in ``cpu_standins``).

:data:`CPU`: Megatron-Bridge's training loop on CPU (gloo). Applied by :func:`gemma4vl.runtime.cpu_backend.activate`
(through :func:`gemma4vl.runtime.setup_runtime` with ``device="cpu"``) together with the Megatron-Core table
(:mod:`gemma4vl.runtime.patches_core`, sections A-D), never on its own. Same rules: no environment variable is
read, the global ``torch.cuda`` is never modified, every patch is listed below and in the table, and the installed
megatron-bridge must be 0.6.x (checked from the package metadata, without importing it) or activation raises
:class:`~gemma4vl.runtime.patching.UnsupportedMegatronVersionError`. The functions named below are in
:mod:`gemma4vl.runtime.cpu_standins`.

:data:`WITHOUT_TE`: a Megatron-Bridge patch every machine without Transformer Engine needs, CPU or GPU (section H);
applied by :func:`gemma4vl.runtime.import_megatron_bridge` whenever it installs the TE import shim.

The call sites were found by driving the loop the way ``megatron.bridge.training.pretrain`` does, piece by piece:
``runtime_config_update``, ``setup.setup`` (initialisation, model, DDP with and without the distributed optimizer,
optimizer, scheduler, checkpoint load, dataloaders), ``train.train`` (train step, timers, logging to the console,
TensorBoard and offline Weights & Biases, evaluation, interval checkpoints in the ``torch_dist`` format, the
SIGTERM handler) and the end-of-run cleanup (async-save finalisation, ``destroy_global_state``), on one process
and on two gloo processes (data parallel with the distributed optimizer; tensor + sequence parallel).

When the patches are applied
----------------------------
Importing ``megatron.bridge.training`` costs seconds, which processes that only use Megatron-Core should not pay.
A module below that is already imported at activation is patched at once; the others are patched the moment they
are first imported: activation hands them to the import hook of :mod:`gemma4vl.runtime.patching`
(:class:`~gemma4vl.runtime.patching.PatchOnImport` on ``sys.meta_path``), which recognises exactly the module names
of the table, lets the regular finders locate them, and applies that module's patches right after its code has run
(before any importer can bind its names). A patch whose target attribute is missing raises
``UnsupportedMegatronVersionError`` from that import.

E. Megatron-Bridge modules that get a module-scoped ``torch`` (``TorchOnCpu``)
---------------------------------------------------------------------------
Same stand-in as section A of ``patches_core`` (``torch.cuda`` is the CPU allow-list, CUDA ``device=`` of the
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
  ``data_parallel_random_init``), and the tracker always seeded (the CPU tracker of ``patches_core``, section B).
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
  another data-parallel size) with ``patches_core`` section D. Megatron-Core's ``torch_dist`` writer starts a
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

H. Without Transformer Engine, on any device (table :data:`WITHOUT_TE`)
---------------------------------------------------------------------
- ``peft/utils.py``: ``HAVE_TE`` is ``all(...)`` of six
  ``safe_import_from("megatron.core.extensions.transformer_engine", "TE...Linear")`` results. Without Transformer
  Engine Megatron-Core still defines those names (as ``MagicMock`` placeholders), so every import "succeeds" and
  ``HAVE_TE`` is True; LoRA's ``get_adapter_attributes_from_linear`` then reaches ``isinstance(m, <placeholder>)``
  for any linear that is not Megatron-Core's own ``ColumnParallelLinear`` / ``RowParallelLinear`` and raises
  ``TypeError``. Set to ``False``, the truth on such a machine (CPU, or a GPU without TE): ``HAVE_TE`` only guards
  those TE ``isinstance`` branches, which cannot match without TE. Applied whenever
  :func:`gemma4vl.runtime.import_megatron_bridge` installs the TE import shim, i.e. exactly when Transformer Engine
  is absent; with TE installed nothing is patched.
"""

from __future__ import annotations

from gemma4vl.runtime import cpu_standins as cpu
from gemma4vl.runtime.patching import CallSitePatch, PatchTable, replace_with

_INITIALIZE = "megatron.bridge.training.initialize"
_SETUP = "megatron.bridge.training.setup"
_TRAIN_UTILS = "megatron.bridge.training.utils.train_utils"

# Megatron-Bridge modules whose global ``torch`` is replaced by a TorchOnCpu (section E).
MODULES_WITH_CPU_TORCH = (
    "megatron.bridge.training.initialize",
    "megatron.bridge.training.setup",
    "megatron.bridge.training.train",
    "megatron.bridge.training.checkpointing",
    "megatron.bridge.training.utils.train_utils",
    "megatron.bridge.data.loaders",
    "megatron.bridge.training.optim",
)

CPU = PatchTable(
    name="CPU backend (Megatron-Bridge)",
    distribution="megatron-bridge",
    supported=(0, 6),
    source="gemma4vl/runtime/patches_bridge.py",
    import_now=False,  # importing megatron.bridge.training costs seconds: patched when first imported
    patches=(
        *(
            CallSitePatch(name, "torch", cpu.torch_on_cpu_for(name), "torch.cuda / device='cuda' calls (section E)")
            for name in MODULES_WITH_CPU_TORCH
        ),
        CallSitePatch(
            "megatron.bridge.training.eval",
            "torch",
            cpu.torch_on_cpu_with_host_tensors_for("megatron.bridge.training.eval"),
            "torch.tensor(...).cuda() and torch.cuda call sites (section E)",
        ),
        CallSitePatch(_INITIALIZE, "_set_random_seed", replace_with(cpu.set_random_seed), "skips seeding without CUDA"),
        CallSitePatch(_INITIALIZE, "compile_helpers", replace_with(cpu.check_dataset_helpers), "no Makefile"),
        CallSitePatch(_INITIALIZE, "_warmup_jit_function", replace_with(cpu.skip_jit_warmup), "draws from the CPU RNG"),
        CallSitePatch(_INITIALIZE, "initialize_megatron", cpu.allow_no_cuda, "asserts torch.cuda.is_available()"),
        CallSitePatch(
            _TRAIN_UTILS,
            "multi_tensor_applier",
            replace_with(cpu.multi_tensor_applier),
            "a Transformer Engine stub (TE import shim)",
        ),
        CallSitePatch(
            _TRAIN_UTILS,
            "multi_tensor_l2norm",
            replace_with(cpu.multi_tensor_l2norm),
            "a Transformer Engine stub (TE import shim)",
        ),
        CallSitePatch(_SETUP, "initialize_megatron", cpu.allow_no_cuda, "imported by name"),
        CallSitePatch(
            _SETUP,
            "setup_data_iterators",
            cpu.data_iterators_leave_generator_alone,
            "iter(DataLoader) draws from the generator just restored",
        ),
        CallSitePatch(
            "megatron.bridge.models.model_provider",
            "get_model",
            cpu.honour_cpu_initialization,
            "drops use_cpu_initialization, then .cuda()",
        ),
    ),
)

WITHOUT_TE = PatchTable(
    name="Transformer Engine import shim (Megatron-Bridge)",
    distribution="megatron-bridge",
    supported=(0, 6),
    source="gemma4vl/runtime/patches_bridge.py",
    import_now=False,
    patches=(
        CallSitePatch(
            "megatron.bridge.peft.utils",
            "HAVE_TE",
            replace_with(False),
            "True from Megatron-Core's TE placeholders; LoRA isinstance-checks against them (section H)",
        ),
    ),
)
