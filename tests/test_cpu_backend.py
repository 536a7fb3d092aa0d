"""The CPU backend (gemma4vl.runtime.cpu_backend, its Megatron-Core table patches_core), the model-parallel setup
and the multi-process test launcher.

The training tests use a tiny Megatron-Core GPTModel (2 layers, hidden 64, vocab 128) built with the local
(non-Transformer-Engine) layer spec, wrapped in Megatron's DistributedDataParallel, with an optimizer from
``get_megatron_optimizer``, as the training loop does. Loss values are pinned (observed on this CPU machine)
with a tolerance, so that any change in numerics shows up.

Megatron-Core is imported inside the tests and helpers only, so that merely collecting this module stays cheap.
Tests that need a process of their own (a fresh runtime, or several ranks) use ``run_distributed``.
"""

from __future__ import annotations

import ast
import dataclasses
import math
import os
import re
import time
import zlib
from pathlib import Path

import pytest
import torch

from gemma4vl.testing.distributed import DistributedTimeoutError, RankFailedError, run_distributed

SEED = 1234
STEPS = 5
VOCAB, SEQ, BATCH = 128, 16, 2
NUM_EXPERTS = 4

# Per-step losses of the single-process MoE run (_train_gpt(moe=True), Adam lr 1e-2, clip_grad 1.0), observed
# on CPU. The distributed optimizer gives the same numbers (DP = 1: same math, different bookkeeping).
EXPECTED_MOE_LOSSES = [4.875123023986816, 4.202075958251953, 3.84541392326355, 3.87253999710083, 3.5614023208618164]

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------------------
# Model and training helpers (used in-process and in run_distributed ranks)
# --------------------------------------------------------------------------------------------------------------


class SequenceParallelRMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm with its weight marked for sequence parallelism, as Transformer Engine's norm does.

    Megatron's local-spec norm without Apex (``WrappedTorchNorm``) refuses ``sequence_parallel=True`` because it
    does not set the ``sequence_parallel`` attribute that makes ``finalize_model_grads`` all-reduce the norm's
    gradient over the tensor-parallel group. This is a model-spec matter, not a CPU one; the tensor-parallel
    MoE test needs it because Megatron's MoE layer refuses TP > 1 without sequence parallelism in training.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_ignored):
        super().__init__(hidden_size, eps=eps)
        self.weight.sequence_parallel = config.sequence_parallel


def _gpt_config(*, moe: bool, tp: int = 1, ep: int = 1, sp: bool = False, dispatcher: str = "alltoall"):
    from megatron.core.transformer import TransformerConfig

    moe_kwargs = {}
    if moe:
        moe_kwargs = dict(
            num_moe_experts=NUM_EXPERTS,
            moe_router_topk=2,
            moe_ffn_hidden_size=32,
            moe_shared_expert_intermediate_size=64,
            moe_token_dispatcher_type=dispatcher,
            moe_router_load_balancing_type="aux_loss",
            moe_aux_loss_coeff=1e-2,
        )
    return TransformerConfig(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        ffn_hidden_size=128,
        add_bias_linear=False,  # the shared expert supports no bias
        hidden_dropout=0.0,  # no RNG in the forward pass: runs compare exactly across TP layouts and devices
        attention_dropout=0.0,
        use_cpu_initialization=True,  # full master weights drawn on the CPU: identical for every TP layout
        params_dtype=torch.float32,
        tensor_model_parallel_size=tp,
        expert_model_parallel_size=ep,
        sequence_parallel=sp,
        **moe_kwargs,
    )


def _layer_spec(*, moe: bool, sequence_parallel_norms: bool):
    """The local spec; optionally with its norms replaced by :class:`SequenceParallelRMSNorm`."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    spec = get_gpt_layer_local_spec(num_experts=NUM_EXPERTS if moe else None, moe_grouped_gemm=False)
    if not sequence_parallel_norms:
        return spec
    submodules = dataclasses.replace(
        spec.submodules, input_layernorm=SequenceParallelRMSNorm, pre_mlp_layernorm=SequenceParallelRMSNorm
    )
    layer = dataclasses.replace(spec, submodules=submodules)
    return TransformerBlockSubmodules(layer_specs=[layer, layer], layer_norm=SequenceParallelRMSNorm)


def _batch(device: str):
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    positions = torch.arange(SEQ).unsqueeze(0).expand(BATCH, -1)
    return tokens.to(device), positions.to(device), labels.to(device)


def _build(
    config, spec, device: str, *, optimizer: str = "adam", lr: float = 1e-2, distributed_optimizer=False, seed=SEED
):
    """GPTModel -> Megatron DDP -> get_megatron_optimizer, as the training loop builds them."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    torch.manual_seed(seed)  # use_cpu_initialization draws the master weights from the CPU generator
    model = GPTModel(config, spec, vocab_size=VOCAB, max_sequence_length=SEQ, position_embedding_type="rope").to(device)
    ddp = DistributedDataParallel(
        config, DistributedDataParallelConfig(use_distributed_optimizer=distributed_optimizer), model
    )
    optimizer_config = OptimizerConfig(
        optimizer=optimizer,
        lr=lr,
        weight_decay=0.0,
        sgd_momentum=0.0,
        clip_grad=1.0,
        use_distributed_optimizer=distributed_optimizer,
    )
    return ddp, get_megatron_optimizer(optimizer_config, [ddp])


def _forward_backward(ddp, batch, loss_scale: float = 1.0) -> float:
    from megatron.core.distributed import finalize_model_grads

    tokens, positions, labels = batch
    ddp.zero_grad_buffer()
    loss = ddp(tokens, positions, None, labels=labels).mean()
    (loss * loss_scale).backward()
    finalize_model_grads([ddp])
    return loss.item()


def _train_gpt(
    device: str = "cpu",
    *,
    moe: bool = True,
    tp: int = 1,
    ep: int = 1,
    sp: bool = False,
    sequence_parallel_norms: bool = False,
    distributed_optimizer: bool = False,
) -> tuple[list[float], list[float]]:
    """Train STEPS Adam steps on one fixed batch; return (losses, grad norms). Needs model parallel initialised."""
    config = _gpt_config(moe=moe, tp=tp, ep=ep, sp=sp)
    spec = _layer_spec(moe=moe, sequence_parallel_norms=sequence_parallel_norms)
    ddp, optimizer = _build(config, spec, device, distributed_optimizer=distributed_optimizer)
    batch = _batch(device)
    losses, grad_norms = [], []
    for _ in range(STEPS):
        optimizer.zero_grad()
        losses.append(_forward_backward(ddp, batch))
        update_successful, grad_norm, _ = optimizer.step()
        assert update_successful
        grad_norms.append(float(grad_norm))
    return losses, grad_norms


def _in_world(device: str, fn, *, seed: int = SEED, **parallel_sizes):
    """Run ``fn()`` between initialize_model_parallel and destroy_model_parallel (in run_distributed ranks; the
    pytest process itself uses the session-wide ``megatron_cpu`` fixture of conftest.py)."""
    from gemma4vl.runtime.distributed import destroy_model_parallel, initialize_model_parallel

    initialize_model_parallel(device, seed=seed, **parallel_sizes)
    try:
        return fn()
    finally:
        destroy_model_parallel()


# --------------------------------------------------------------------------------------------------------------
# setup_runtime and the backend's contract
# --------------------------------------------------------------------------------------------------------------


def test_setup_runtime_cpu_activates_once_and_is_idempotent():
    from gemma4vl.runtime import cpu_backend, cpu_standins, setup_runtime

    setup_runtime("cpu")
    setup_runtime("cpu")
    assert cpu_backend.is_active()
    import megatron.core.tensor_parallel.random as mcore_random

    assert isinstance(mcore_random.torch, cpu_standins.TorchOnCpu)
    assert mcore_random._get_cuda_rng_state is cpu_standins.get_cpu_rng_state


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_setup_runtime_cuda_without_gpu_raises_clearly():
    from gemma4vl.runtime import setup_runtime

    with pytest.raises(RuntimeError, match=r"device='cuda' was requested, but torch.cuda.is_available\(\) is False"):
        setup_runtime("cuda")


@pytest.mark.parametrize(
    "device", ["gpu", "CPU", "", None, "cuda:0"], ids=["other-name", "upper-case", "empty", "none", "indexed"]
)
def test_setup_runtime_rejects_unknown_devices(device):
    from gemma4vl.runtime import setup_runtime

    with pytest.raises(ValueError, match=r"device must be one of 'cpu', 'cuda'"):
        setup_runtime(device)


def _runtime_under_switch_like_environment() -> tuple:
    """In a fresh process whose environment holds plausible switches: does the backend behave as without them?"""
    from gemma4vl.runtime import cpu_backend, cpu_standins, setup_runtime

    inactive_before = not cpu_backend.is_active()
    setup_runtime("cpu")
    import megatron.core.tensor_parallel.random as mcore_random

    return inactive_before, cpu_backend.is_active(), isinstance(mcore_random.torch, cpu_standins.TorchOnCpu)


def test_no_environment_variable_switches_the_backend(monkeypatch):
    # Statically: neither the backend nor setup_runtime reads the environment.
    backend = ("cpu_backend", "cpu_standins", "patching", "patches_core", "patches_bridge", "__init__")
    for path in [REPO / f"gemma4vl/runtime/{name}.py" for name in backend]:
        tree = ast.parse(path.read_text())
        names = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
        names |= {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
        assert not names & {"environ", "getenv", "environb"}, f"{path} reads the environment"
    # Behaviourally, in a fresh process (it inherits this environment): plausible switches change nothing.
    for name in ("GEMMA4VL_DEVICE", "GEMMA4VL_CPU_BACKEND", "CPU_BACKEND", "DEVICE"):
        monkeypatch.setenv(name, "0" if "BACKEND" in name else "cuda")
    assert run_distributed(_runtime_under_switch_like_environment, 1, timeout=120) == [(True, True, True)]


def _fake_module(monkeypatch, name: str, **attributes):
    import sys
    import types

    module = types.ModuleType(name)
    for key, value in attributes.items():
        setattr(module, key, value)
    monkeypatch.setitem(sys.modules, name, module)
    return module


def test_patch_tables_apply_all_or_nothing(monkeypatch):
    """One unresolvable patch: the error names it (and only it), and no target of any table was patched."""
    import sys

    from gemma4vl.runtime import patching
    from gemma4vl.runtime.patching import CallSitePatch, PatchTable, replace_with

    def original_f():
        return "f"

    class Holder:
        def method(self):
            return "method"

    original_method = Holder.method
    first = _fake_module(monkeypatch, "fake_core_a", f=original_f, flag=True)
    second = _fake_module(monkeypatch, "fake_core_b", Holder=Holder)
    monkeypatch.setattr(patching, "installed_version", lambda distribution: "0.19.2")
    monkeypatch.setattr(patching, "_applied", set(patching._applied))  # these test tables are forgotten afterwards

    def wrap(original):
        return lambda *args: ("wrapped", original(*args))

    table_1 = PatchTable("test table 1", "megatron-core", (0, 19), "tests/a.py", (
        CallSitePatch("fake_core_a", "f", replace_with(lambda: "replaced"), "test"),
        CallSitePatch("fake_core_a", "flag", replace_with(False), "test"),
    ), import_now=True)
    table_2 = PatchTable("test table 2", "megatron-core", (0, 19), "tests/b.py", (
        CallSitePatch("fake_core_b:Holder", "method", wrap, "test"),
        CallSitePatch("fake_core_b:Holder", "gone", wrap, "test"),
        CallSitePatch("fake_core_b", "not_yet_imported_elsewhere", wrap, "test"),
    ), import_now=False)
    meta_path = list(sys.meta_path)
    expected = (
        r"nothing was patched\. Missing: fake_core_b:Holder\.gone \(megatron-core, listed in tests/b\.py\); "
        r"fake_core_b\.not_yet_imported_elsewhere \(megatron-core, listed in tests/b\.py\)\. The patch table"
    )
    with pytest.raises(patching.UnsupportedMegatronVersionError, match=expected):
        patching.activate(table_1, table_2)
    assert first.f is original_f and first.flag is True and Holder.method is original_method
    assert sys.meta_path == meta_path  # no import hook left behind
    assert not {"test table 1", "test table 2"} & patching._applied

    # Without the missing targets, every patch is applied, and once only.
    table_2 = PatchTable("test table 2", "megatron-core", (0, 19), "tests/b.py", table_2.patches[:1], import_now=False)
    patching.activate(table_1, table_2)
    patching.activate(table_1, table_2)
    assert first.f() == "replaced" and first.flag is False
    assert second.Holder().method() == ("wrapped", "method")


def test_a_wrapper_is_never_wrapped_twice(monkeypatch):
    """A function patched where it is defined and where it was imported by name gets one wrapper."""
    from gemma4vl.runtime import patching
    from gemma4vl.runtime.patching import CallSitePatch, PatchTable

    def original():
        return 1

    defining = _fake_module(monkeypatch, "fake_defining", g=original)
    user = _fake_module(monkeypatch, "fake_user")
    monkeypatch.setattr(patching, "installed_version", lambda distribution: "0.19.2")
    monkeypatch.setattr(patching, "_applied", set(patching._applied))  # these test tables are forgotten afterwards

    def wrap(function):
        return lambda: function() + 10

    table = PatchTable("test table 3", "megatron-core", (0, 19), "tests/c.py", (
        CallSitePatch("fake_defining", "g", wrap, "test"),
    ), import_now=True)
    patching.activate(table)
    user.g = defining.g  # "from fake_defining import g" after the patch
    again = PatchTable("test table 4", "megatron-core", (0, 19), "tests/c.py", (
        CallSitePatch("fake_user", "g", wrap, "imported by name"),
    ), import_now=True)
    patching.activate(again)
    assert user.g is defining.g and user.g() == 11


def test_megatron_core_version_is_checked(monkeypatch):
    from gemma4vl.runtime import patches_core, patching

    assert patching.installed_version("megatron-core").startswith("0.19.")
    monkeypatch.setattr(patching, "installed_version", lambda distribution: "0.20.0")
    with pytest.raises(patching.UnsupportedMegatronVersionError, match=r"megatron-core 0\.19\.x.*0\.20\.0"):
        patching.check_version(patches_core.CPU)


def test_every_patch_is_documented_and_unknown_cuda_calls_fail_loudly():
    import megatron.core.utils

    from gemma4vl.runtime import patches_core, setup_runtime

    setup_runtime("cpu")
    doc = patches_core.__doc__
    for patch in patches_core.CPU.patches:
        module_path = patch.owner.split(":")[0].removeprefix("megatron.core.").replace(".", "/") + ".py"
        assert f"``{module_path}``" in doc, f"{module_path} is patched but not listed in the docstring"
        if patch.attribute != "torch":  # the module's own torch: the module is listed
            # The patched name in double backticks: ``attribute``, or ``Class.attribute`` (maybe with arguments).
            owner_class = patch.owner.partition(":")[2]
            name = f"{owner_class}.{patch.attribute}" if owner_class else patch.attribute
            assert re.search(rf"``{re.escape(name)}(\(.*?\))?``", doc), f"{name} is patched but not documented"
    with pytest.raises(AttributeError, match=r"megatron\.core\.utils uses torch\.cuda\.get_device_capability"):
        megatron.core.utils.torch.cuda.get_device_capability()


# --------------------------------------------------------------------------------------------------------------
# Single-process training on CPU
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("distributed_optimizer", [False, True], ids=["optimizer", "distributed-optimizer"])
def test_moe_gpt_trains_on_cpu(megatron_cpu, distributed_optimizer):
    losses, grad_norms = _train_gpt("cpu", moe=True, distributed_optimizer=distributed_optimizer)
    print(f"losses={losses} grad_norms={grad_norms}")
    torch.testing.assert_close(losses, EXPECTED_MOE_LOSSES, rtol=1e-5, atol=1e-5)
    assert losses[-1] < losses[0] - 0.5
    assert all(math.isfinite(norm) and norm > 1.0 for norm in grad_norms), grad_norms  # clip_grad=1.0 bites


def _sgd_clipping_step():
    """One SGD step with clip_grad=1.0 on a loss scaled up 100x; return what the test compares."""
    lr = 0.1
    config = _gpt_config(moe=True)
    ddp, optimizer = _build(config, _layer_spec(moe=True, sequence_parallel_norms=False), "cpu", optimizer="sgd", lr=lr)
    optimizer.zero_grad()
    _forward_backward(ddp, _batch("cpu"), loss_scale=100.0)
    params = [p for p in ddp.module.parameters() if p.requires_grad]
    grads = [p.main_grad.detach().clone() for p in params]
    before = [p.detach().clone() for p in params]
    independent_norm = torch.linalg.vector_norm(torch.cat([g.flatten().double() for g in grads])).item()
    update_successful, returned_norm, _ = optimizer.step()
    assert update_successful
    deltas = [p.detach() - b for p, b in zip(params, before)]
    return lr, grads, deltas, independent_norm, float(returned_norm)


def test_grad_clipping_really_clips_on_cpu(megatron_cpu):
    lr, grads, deltas, independent_norm, returned_norm = _sgd_clipping_step()
    assert independent_norm > 10.0, "the fixture must produce a gradient norm well above clip_grad=1.0"
    assert returned_norm == pytest.approx(independent_norm, rel=1e-5)
    clip_coeff = 1.0 / (returned_norm + 1e-6)
    for grad, delta in zip(grads, deltas):
        torch.testing.assert_close(delta, -lr * grad * clip_coeff, rtol=0, atol=1e-6)
    # The clipped update has norm lr * 1.0, not lr * |g|.
    update_norm = torch.linalg.vector_norm(torch.cat([d.flatten() for d in deltas])).item()
    assert update_norm == pytest.approx(lr, rel=1e-4)


def test_grad_norm_replacement_matches_torch(megatron_cpu):
    from gemma4vl.runtime.cpu_standins import clip_grad_by_total_norm_fp32, get_grad_norm_fp32

    grads = [torch.tensor([3.0, -4.0]), torch.tensor([[12.0]])]
    assert get_grad_norm_fp32(grads) == pytest.approx(13.0)
    assert get_grad_norm_fp32(grads, norm_type=math.inf) == pytest.approx(12.0)
    assert get_grad_norm_fp32(grads, norm_type=1) == pytest.approx(19.0)
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for param, grad in zip(params, grads):
        param.grad = grad.clone()
    clip_grad_by_total_norm_fp32(params, max_norm=1.0, total_norm=13.0)
    torch.testing.assert_close(params[0].grad, grads[0] / (13.0 + 1e-6))
    clip_grad_by_total_norm_fp32(params, max_norm=100.0, total_norm=1.0)  # coefficient > 1: untouched
    torch.testing.assert_close(params[0].grad, grads[0] / (13.0 + 1e-6))


def _checkpoint_round_trip(directory: str, distributed_optimizer: bool) -> list[float]:
    """Train one step, save model + optimizer with dist_checkpointing, load into a differently initialised copy,
    and return the copy's losses over the next three steps (which need the restored weights, Adam moments and
    Adam step counts)."""
    from megatron.core import dist_checkpointing

    # dp_reshardable: a distributed-optimizer format that round-trips with torch's Adam; the plain optimizer
    # ignores it.
    metadata = {"distrib_optim_sharding_type": "dp_reshardable"}
    config = _gpt_config(moe=True)
    spec = _layer_spec(moe=True, sequence_parallel_norms=False)
    batch = _batch("cpu")

    def one_step(ddp, optimizer) -> float:
        optimizer.zero_grad()
        loss = _forward_backward(ddp, batch)
        optimizer.step()
        return loss

    ddp, optimizer = _build(config, spec, "cpu", distributed_optimizer=distributed_optimizer)
    one_step(ddp, optimizer)
    model_state = ddp.module.sharded_state_dict()
    dist_checkpointing.save(
        {"model": model_state, "optimizer": optimizer.sharded_state_dict(model_state, metadata=metadata)}, directory
    )

    ddp, optimizer = _build(config, spec, "cpu", distributed_optimizer=distributed_optimizer, seed=SEED + 1)
    model_state = ddp.module.sharded_state_dict()
    optimizer_state = optimizer.sharded_state_dict(model_state, is_loading=True, metadata=metadata)
    loaded = dist_checkpointing.load({"model": model_state, "optimizer": optimizer_state}, directory)
    ddp.module.load_state_dict(loaded["model"])
    with torch.no_grad():  # the distributed optimizer copies into views of leaf parameters
        optimizer.load_state_dict(loaded["optimizer"])
    return [one_step(ddp, optimizer) for _ in range(3)]


@pytest.mark.parametrize("distributed_optimizer", [False, True], ids=["optimizer", "distributed-optimizer"])
def test_dist_checkpoint_round_trip_resumes_exactly(megatron_cpu, tmp_path, distributed_optimizer):
    losses = _checkpoint_round_trip(str(tmp_path), distributed_optimizer)
    torch.testing.assert_close(losses, EXPECTED_MOE_LOSSES[1:4], rtol=1e-6, atol=1e-6)


def _initialize_twice_then_check_teardown() -> list:
    """In a fresh process (torchrun variables set, no process group yet): init, destroy, init again, destroy."""
    from megatron.core import parallel_state

    sizes = [_in_world("cpu", parallel_state.get_data_parallel_world_size) for _ in range(2)]
    return [*sizes, parallel_state.model_parallel_is_initialized(), torch.distributed.is_initialized()]


def _activate_after_an_unseeded_tracker() -> float:
    """Megatron's tracker created before activation (empty) is replaced by a CPU one; training still works."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    get_cuda_rng_tracker()
    losses, _ = _in_world("cpu", lambda: _train_gpt(moe=False))
    return losses[0]


def test_initialize_model_parallel_can_run_again_in_the_same_process():
    # In a fresh process: this one shares a session-wide model-parallel state (the megatron_cpu fixture).
    assert run_distributed(_initialize_twice_then_check_teardown, 1, backend=None, timeout=120) == [
        [1, 1, False, False]
    ]


def test_activation_replaces_an_unseeded_rng_tracker():
    [first_loss] = run_distributed(_activate_after_an_unseeded_tracker, 1, backend=None, timeout=120)
    # The dense GPT's first loss with the seeded CPU tracker (observed on CPU, fp32; seed SEED).
    assert first_loss == pytest.approx(4.8590193, rel=1e-5)


# --------------------------------------------------------------------------------------------------------------
# Two processes (gloo): tensor parallel parity, expert parallel
# --------------------------------------------------------------------------------------------------------------


def _init_by_global_name(model, layer_offset: int) -> None:
    """Give every parameter values that depend only on its name in the full model (layer index made global), so
    that a pipeline stage holds exactly the weights of the same layers of the single-process model. The tied
    output weight of the last stage gets the embedding's values."""
    for name, param in model.named_parameters():
        parts = name.split(".")
        if parts[:2] == ["decoder", "layers"]:
            parts[2] = str(int(parts[2]) + layer_offset)
        global_name = "embedding.word_embeddings.weight" if name == "output_layer.weight" else ".".join(parts)
        generator = torch.Generator().manual_seed(zlib.crc32(global_name.encode()))
        with torch.no_grad():
            if param.dim() == 1:  # norm weights
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))


def _train_gpt_pipelined(pp: int) -> tuple[list[float | None], list[float]]:
    """A dense GPT with tied embeddings trained through Megatron's schedule (2 micro-batches) with ``pp`` stages.

    Returns (losses, grad norms); losses are None on all but the last stage.
    """
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.models.gpt import GPTModel
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    config = dataclasses.replace(_gpt_config(moe=False), pipeline_model_parallel_size=pp, pipeline_dtype=torch.float32)
    config.finalize_model_grads_func = finalize_model_grads
    model = GPTModel(
        config,
        _layer_spec(moe=False, sequence_parallel_norms=False),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        position_embedding_type="rope",
        share_embeddings_and_output_weights=True,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )
    _init_by_global_name(model, layer_offset=parallel_state.get_pipeline_model_parallel_rank() * (2 // pp))
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(), model)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-2, clip_grad=1.0, weight_decay=0.0), [ddp]
    )
    tokens, positions, labels = _batch("cpu")

    def forward_step(data_iterator, model):
        per_token = model(tokens, positions, None, labels=labels)
        return per_token, lambda output: (output.mean(), {"loss": output.mean().detach()})

    losses, grad_norms = [], []
    for _ in range(STEPS):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        reports = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter([None] * 2),
            model=[ddp],
            num_microbatches=2,
            seq_length=SEQ,
            micro_batch_size=BATCH,
            forward_only=False,
        )
        update_successful, grad_norm, _ = optimizer.step()
        assert update_successful
        losses.append(reports[0]["loss"].item() if reports else None)
        grad_norms.append(float(grad_norm))
    return losses, grad_norms


def _two_rank_runs() -> dict[str, tuple[list, list[float]]]:
    """On each of 2 ranks: dense TP2, MoE TP2 + sequence parallel, dense PP2, MoE EP2 (alltoall)."""
    return {
        "dense_tp2": _in_world("cpu", lambda: _train_gpt(moe=False, tp=2), tensor_model_parallel_size=2),
        "moe_tp2_sp": _in_world(
            "cpu",
            lambda: _train_gpt(moe=True, tp=2, sp=True, sequence_parallel_norms=True),
            tensor_model_parallel_size=2,
        ),
        "dense_pp2": _in_world("cpu", lambda: _train_gpt_pipelined(pp=2), pipeline_model_parallel_size=2),
        "moe_ep2": _in_world("cpu", lambda: _train_gpt(moe=True, ep=2), expert_model_parallel_size=2),
    }


def test_two_process_tensor_and_pipeline_parallel_match_one_process(megatron_cpu):
    started = time.monotonic()
    per_rank = run_distributed(_two_rank_runs, 2, timeout=240)
    print(f"2-rank runs took {time.monotonic() - started:.1f} s")
    reference = {
        "dense_tp2": _train_gpt(moe=False),
        "moe_tp2_sp": _train_gpt(moe=True, sequence_parallel_norms=True),
    }
    for rank, runs in enumerate(per_rank):
        for name, (expected_losses, expected_norms) in reference.items():
            losses, norms = runs[name]
            print(f"rank {rank} {name}: losses={losses} grad_norms={norms}")
            torch.testing.assert_close(losses, expected_losses, rtol=1e-5, atol=1e-5, msg=f"{name} rank {rank}")
            # The norm is all-reduced over the TP group with TP duplicates counted once: the full-model norm. On
            # the identical first step it matches tightly; afterwards Adam's normalised update amplifies the
            # rounding differences of split matmuls (seen: up to 2e-5 relative by step 5).
            assert norms[0] == pytest.approx(expected_norms[0], rel=1e-6), f"{name} rank {rank}"
            torch.testing.assert_close(norms, expected_norms, rtol=1e-4, atol=0, msg=f"{name} rank {rank}")
    # Pipeline parallel (p2p over gloo, the tied embedding kept in sync across the two stages): the last stage's
    # losses and both stages' grad norms match the single-process schedule run.
    pp_losses, pp_norms = _train_gpt_pipelined(pp=1)
    print(f"dense_pp2: losses={per_rank[1]['dense_pp2'][0]} grad_norms={per_rank[1]['dense_pp2'][1]}")
    assert per_rank[0]["dense_pp2"][0] == [None] * STEPS
    torch.testing.assert_close(per_rank[1]["dense_pp2"][0], pp_losses, rtol=1e-5, atol=1e-5)
    for rank in range(2):
        torch.testing.assert_close(per_rank[rank]["dense_pp2"][1], pp_norms, rtol=1e-4, atol=0)
    assert pp_losses[-1] < pp_losses[0] - 0.5
    # Expert parallel draws each rank's experts from its own RNG stream, so it is not compared with EP1 here;
    # it must train, and both ranks must agree on the (globally all-reduced) loss and gradient norm.
    ep_losses, ep_norms = per_rank[0]["moe_ep2"]
    assert ep_losses[-1] < ep_losses[0] - 0.5
    assert all(math.isfinite(n) and n > 1.0 for n in ep_norms)
    torch.testing.assert_close(per_rank[1]["moe_ep2"][1], ep_norms, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------
# The launcher itself
# --------------------------------------------------------------------------------------------------------------


def _rank_and_env(tag: str) -> tuple:
    rank = torch.distributed.get_rank()
    value = torch.tensor([float(rank + 1)])
    torch.distributed.all_reduce(value)
    return (
        tag,
        rank,
        int(os.environ["RANK"]),
        int(os.environ["WORLD_SIZE"]),
        int(os.environ["LOCAL_RANK"]),
        value.item(),
    )


def _rank1_raises() -> None:
    if torch.distributed.get_rank() == 1:
        raise ValueError("deliberate failure on rank 1")
    torch.distributed.barrier()  # rank 0 would wait here forever: the launcher must kill it


def _sleep_forever() -> None:
    time.sleep(3600)


def test_run_distributed_returns_per_rank_results_in_order():
    assert run_distributed(_rank_and_env, 2, "x", timeout=60) == [("x", 0, 0, 2, 0, 3.0), ("x", 1, 1, 2, 1, 3.0)]


def test_run_distributed_reraises_a_rank_failure_with_its_traceback():
    started = time.monotonic()
    with pytest.raises(RankFailedError, match="rank 1 failed") as info:
        run_distributed(_rank1_raises, 2, timeout=60)
    assert info.value.rank == 1
    assert "deliberate failure on rank 1" in info.value.remote_traceback
    assert "_rank1_raises" in info.value.remote_traceback
    assert isinstance(info.value.__cause__, ValueError)
    assert time.monotonic() - started < 30, "the blocked rank 0 was not killed promptly"


def test_run_distributed_times_out_and_kills_the_ranks():
    with pytest.raises(DistributedTimeoutError, match=r"ranks \[0\] did not finish within 2 s"):
        run_distributed(_sleep_forever, 1, timeout=2)


def test_run_distributed_refuses_unpicklable_functions():
    with pytest.raises(TypeError, match="picklable"):
        run_distributed(lambda: None, 1)


# --------------------------------------------------------------------------------------------------------------
# Megatron-Bridge imports with the Transformer Engine shim; Megatron-Core still sees no TE
# --------------------------------------------------------------------------------------------------------------


def test_megatron_bridge_conversion_imports_and_core_sees_no_te():
    from gemma4vl.runtime import import_megatron_bridge

    import_megatron_bridge()
    from megatron.bridge import AutoBridge  # noqa: F401
    from megatron.bridge.models.conversion import model_bridge, param_mapping  # noqa: F401
    from megatron.core.extensions import transformer_engine as mcore_te

    assert mcore_te.HAVE_TE is False
    # ... and Megatron-Bridge's PEFT code knows it too (patches_bridge.WITHOUT_TE, applied by import_megatron_bridge
    # on any device): otherwise LoRA isinstance-checks against Megatron-Core's MagicMock TE placeholders.
    import megatron.bridge.peft.utils as peft_utils

    assert peft_utils.HAVE_TE is False and peft_utils.HAVE_TE_COL_LINEAR is True


# --------------------------------------------------------------------------------------------------------------
# GPU: the same training on CUDA leaves the backend inactive and matches the CPU numbers
# --------------------------------------------------------------------------------------------------------------


def _train_on_cuda() -> tuple[bool, list[float]]:
    from gemma4vl.runtime import cpu_backend

    losses, _ = _in_world("cuda", lambda: _train_gpt("cuda", moe=True))
    return cpu_backend.is_active(), losses


@pytest.mark.gpu
def test_same_training_on_cuda_matches_cpu_and_keeps_backend_inactive():
    # A fresh process: this pytest process has activated the CPU backend, which is for good (one device per process).
    [(backend_active, losses)] = run_distributed(_train_on_cuda, 1, backend=None, uses_cuda=True, timeout=300)
    assert backend_active is False
    torch.testing.assert_close(losses, EXPECTED_MOE_LOSSES, rtol=1e-4, atol=1e-4)


def test_process_group_rules():
    """runtime.distributed owns the default process group: one process without the torchrun variables gets an
    in-memory store (no TCP port), some but not all of them is an error, an existing group's backend is checked,
    and only a group it created is destroyed."""
    import subprocess
    import sys

    code = (
        "import os, torch.distributed as dist\n"
        "from gemma4vl.runtime import distributed\n"
        "os.environ['MASTER_ADDR'] = '127.0.0.1'\n"
        "try:\n    distributed.init_process_group('cpu')\nexcept RuntimeError as e:\n    print('partial:', e)\n"
        "del os.environ['MASTER_ADDR']\n"
        "distributed.init_process_group('cpu', 3)\n"
        "store = dist.distributed_c10d._get_default_store().underlying_store  # under the PrefixStore\n"
        "print('world:', dist.get_world_size(), dist.get_rank(), type(store).__name__)\n"
        "try:\n    distributed.init_process_group('cuda')\nexcept RuntimeError as e:\n    print('backend:', e)\n"
        "distributed.destroy_process_group()\n"
        "print('after destroy:', dist.is_initialized())\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == [
        "partial: incomplete torchrun environment: only MASTER_ADDR set",
        "world: 1 0 HashStore",
        "backend: torch.distributed is already initialised with backend 'gloo', but device='cuda' needs 'nccl'",
        "after destroy: False",
    ]
