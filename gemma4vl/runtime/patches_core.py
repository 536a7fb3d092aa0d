"""The CPU backend's Megatron-Core 0.19.x patch table (data only; the code it installs is in ``cpu_standins``).

Megatron-Core assumes a CUDA device at a finite set of call sites. :data:`CPU` lists exactly those, and
:func:`gemma4vl.runtime.cpu_backend.activate` redirects them to the CPU (through
:mod:`gemma4vl.runtime.patching`: megatron-core must be 0.19.x, every module is imported and every target
resolved before anything is patched). It never modifies the global ``torch.cuda`` module. The classes and
functions named below are in :mod:`gemma4vl.runtime.cpu_standins`.

The call sites below were found by running real code on CPU (single process and 2-process gloo): a local-spec
GPTModel, dense and MoE (alltoall and allgather dispatchers, shared expert, aux loss, expert bias), tensor,
sequence, expert, pipeline (Megatron's schedules, tied embeddings) and data parallel, activation recompute, fp32
and bf16, Megatron's DDP (with and without overlapped grad reduce), ``get_megatron_optimizer`` (Adam / SGD, with
and without the distributed optimizer, ``log_num_zeros_in_grad``), and a ``dist_checkpointing`` save / load /
resume of model and optimizer.

A. Modules that get a module-scoped ``torch`` (:class:`TorchOnCpu`)
-------------------------------------------------------------------
The module's global name ``torch`` is rebound to a stand-in that forwards everything to the real ``torch`` except:

- ``torch.cuda`` is :class:`CudaOnCpu`, an explicit allow-list: ``current_device()`` is ``torch.device("cpu")``;
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
"""

from __future__ import annotations

from gemma4vl.runtime import cpu_standins as cpu
from gemma4vl.runtime.patching import CallSitePatch, PatchTable, replace_with

# Megatron-Core modules whose global ``torch`` is replaced by a TorchOnCpu (section A).
MODULES_WITH_CPU_TORCH = (
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



_RANDOM = "megatron.core.tensor_parallel.random"
_MOE_UTILS = "megatron.core.transformer.moe.moe_utils"
_DISPATCHER = "megatron.core.transformer.moe.token_dispatcher"
_CLIP = "megatron.core.optimizer.clip_grads"
_OPTIMIZER = "megatron.core.optimizer.optimizer"
_DISTRIB_OPTIMIZER = "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer"

CPU = PatchTable(
    name="CPU backend (Megatron-Core)",
    distribution="megatron-core",
    supported=(0, 19),
    source="gemma4vl/runtime/patches_core.py",
    import_now=True,
    patches=(
        *(
            CallSitePatch(
                name, "torch", cpu.torch_on_cpu_for(name), "torch.cuda / device='cuda' call sites (section A)"
            )
            for name in MODULES_WITH_CPU_TORCH
        ),
        CallSitePatch(_RANDOM, "_get_cuda_rng_state", replace_with(cpu.get_cpu_rng_state), "reads CUDA's generator"),
        CallSitePatch(_RANDOM, "_set_cuda_rng_state", replace_with(cpu.set_cpu_rng_state), "writes CUDA's generator"),
        CallSitePatch(_RANDOM, "CudaRNGStatesTracker", cpu.cpu_rng_tracker_class, "fork warns on every CPU random op"),
        CallSitePatch(
            _MOE_UTILS,
            "maybe_move_tensor_to_cpu",
            replace_with(cpu.maybe_move_tensor_to_cpu),
            "only copies CUDA tensors",
        ),
        CallSitePatch(
            _DISPATCHER, "maybe_move_tensor_to_cpu", replace_with(cpu.maybe_move_tensor_to_cpu), "imported by name"
        ),
        CallSitePatch(
            _CLIP, "get_grad_norm_fp32", replace_with(cpu.get_grad_norm_fp32), "device='cuda', multi-tensor L2"
        ),
        CallSitePatch(
            _CLIP,
            "clip_grad_by_total_norm_fp32",
            replace_with(cpu.clip_grad_by_total_norm_fp32),
            "asserts torch.cuda grads",
        ),
        CallSitePatch(_OPTIMIZER, "get_grad_norm_fp32", replace_with(cpu.get_grad_norm_fp32), "imported by name"),
        CallSitePatch(
            _OPTIMIZER,
            "clip_grad_by_total_norm_fp32",
            replace_with(cpu.clip_grad_by_total_norm_fp32),
            "imported by name",
        ),
        CallSitePatch(
            "megatron.core.optimizer.layer_wise_optimizer",
            "get_grad_norm_fp32",
            replace_with(cpu.get_grad_norm_fp32),
            "imported by name",
        ),
        CallSitePatch(
            _DISTRIB_OPTIMIZER, "__init__", cpu.with_cuda_type_names, "sorts params by param.type() == 'torch.cuda.*'"
        ),
        CallSitePatch(
            _DISTRIB_OPTIMIZER,
            "get_parameter_state_dp_zero",
            cpu.gather_state_over_gloo,
            "use_gloo_comm=False gathers through tensor.cuda()",
        ),
        CallSitePatch(
            _DISTRIB_OPTIMIZER,
            "sharded_state_dict",
            cpu.allocate_state_before_loading,
            "state_dict() asserts on a never-stepped optimizer without Apex / TE",
        ),
        CallSitePatch(
            _DISTRIB_OPTIMIZER,
            "load_state_dict",
            cpu.untie_adam_steps,
            "one shared Adam step tensor after loading without Apex / TE",
        ),
        CallSitePatch(
            _DISTRIB_OPTIMIZER,
            "_set_main_param_and_optimizer_states",
            cpu.skip_states_not_in_checkpoint,
            "KeyError 'step' loading the fully_reshardable format without Apex / TE",
        ),
        CallSitePatch(
            "megatron.core.models.common.language_module.language_module:LanguageModule",
            "setup_embeddings_and_output_layer",
            cpu.sync_tied_embedding_without_cuda,
            "weight.data.cuda() before the tied-embedding all-reduce (pipeline parallel)",
        ),
        CallSitePatch(
            "megatron.core.optimizer.optimizer:Float16OptimizerWithFloat16Params",
            "__init__",
            cpu.with_cuda_type_names,
            "sorts params by param.type() == 'torch.cuda.*'",
        ),
    ),
)
