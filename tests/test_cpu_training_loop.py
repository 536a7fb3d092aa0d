"""Megatron-Bridge's training loop on the CPU backend (gemma4vl.runtime.cpu_backend / patches_bridge).

The loop is driven as the project's recipe drives it (and as ``megatron.bridge.training.pretrain`` does, minus its
nvidia-resiliency-ext import): ``runtime_config_update``, ``GlobalState``, ``setup.setup``, ``train.train``,
``train._finish_train``. The model is a tiny Megatron-Bridge ``GPTModelProvider`` with the local (non-TE) layer
spec: 2 layers, hidden 64, MoE with 4 experts top-2 plus a shared expert, RMSNorm, fp32, vocab 128. The data is a
small synthetic map-style dataset (dicts of tensors, a ``collate_fn``) served through a ``DatasetProvider``
subclass; each sequence counts up by one modulo the vocabulary, so the next token is learnable and the loss
falls. The forward step is ours and follows Megatron-Bridge's convention: it returns the model output and a loss
function giving ``(masked loss sum, number of tokens, {"lm loss": [sum, tokens]})``.

Every job runs in fresh processes forked from the ``run_distributed`` fork server (Megatron-Core imported
already): jobs that write checkpoints, or whose exit status matters, in a plain (non-daemonic) child process that
lets Megatron-Bridge create the process group; one- and two-rank jobs that only load checkpoints through
``run_distributed``. Runs that several tests inspect are module-scoped fixtures. Every job uses one intra-op thread.

Losses were observed on this CPU machine and are pinned with a tolerance (torchtune style). The default run takes
about 90 s on the 2-core machine (the jobs: ~20 s for the reference with W&B and TensorBoard, ~10-25 s for each
other one); the ``slow`` test (resume with another data-parallel size) adds about 40 s.
"""

from __future__ import annotations

import glob
import json
import math
import os
import signal
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from gemma4vl.testing.wandb_offline import wandb_history
import torch
import torch.multiprocessing as mp

from gemma4vl.testing.distributed import FORKSERVER_PRELOAD, free_port, run_distributed

VOCAB, SEQ = 128, 16
MICRO_BATCH, GLOBAL_BATCH = 1, 4
TRAIN_ITERS, SAVE_AT, EVAL_INTERVAL = 6, 3, 2
DATASET_SIZE = 64
RUN_TIMEOUT = 240.0

# Per-iteration "lm loss" (token-weighted masked mean over the global batch) of the reference run, observed on
# CPU: Adam lr 1e-2, clip 1.0, seed 1234, global batch 4 (micro batch 1).
EXPECTED_LOSSES = [
    4.850778102874756,
    4.517919063568115,
    4.503427028656006,
    4.3913187980651855,
    4.457220077514648,
    4.300971984863281,
]
# Validation "lm loss" at iterations 2, 4, 6 (one global batch each).
EXPECTED_EVAL_LOSSES = [4.494146347045898, 4.405272006988525, 4.149313926696777]


# --------------------------------------------------------------------------------------------------------------
# The backend's Megatron-Bridge section itself (in this process; nothing here imports Megatron-Bridge)
# --------------------------------------------------------------------------------------------------------------


def test_every_bridge_patch_is_documented():
    from gemma4vl.runtime import cpu_backend, patches_bridge

    doc = patches_bridge.__doc__
    for patch in patches_bridge.CPU.patches + patches_bridge.WITHOUT_TE.patches:
        module_path = patch.owner.split(":")[0].removeprefix("megatron.bridge.").replace(".", "/") + ".py"
        assert f"``{module_path}``" in doc, f"{module_path} is patched but not listed in the docstring"
        assert patch.attribute == "torch" or f"``{patch.attribute}``" in doc, patch
    assert "patches_bridge" in cpu_backend.__doc__


def test_bridge_section_reads_no_environment_variable():
    import ast

    path = Path(__file__).resolve().parents[1] / "gemma4vl/runtime/patches_bridge.py"
    tree = ast.parse(path.read_text())
    names = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    names |= {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    assert not names & {"environ", "getenv", "environb"}


def test_unsupported_megatron_bridge_version_is_refused(monkeypatch):
    from gemma4vl.runtime import patches_bridge, patching

    assert patching.installed_version("megatron-bridge").startswith("0.6.")
    monkeypatch.setattr(patching, "installed_version", lambda distribution: "0.7.0")
    with pytest.raises(patching.UnsupportedMegatronVersionError, match=r"megatron-bridge 0\.6\.x.*0\.7\.0"):
        patching.check_version(patches_bridge.CPU)
    monkeypatch.setattr(patching, "installed_version", lambda distribution: None)  # not installed: nothing to patch
    assert patching.check_version(patches_bridge.CPU) is False


def test_get_model_keeps_the_configs_cpu_initialization_and_refuses_without_it():
    from types import SimpleNamespace

    from gemma4vl.runtime import cpu_standins

    calls = []
    get_model = cpu_standins.honour_cpu_initialization(lambda provider, **kwargs: calls.append(kwargs))
    get_model(SimpleNamespace(use_cpu_initialization=True), use_cpu_initialization=False)
    assert calls == [{"use_cpu_initialization": True}]
    with pytest.raises(ValueError, match="set use_cpu_initialization=True in the model config"):
        get_model(SimpleNamespace(use_cpu_initialization=False), use_cpu_initialization=False)


def test_modules_imported_later_are_patched_when_imported(tmp_path, monkeypatch):
    import importlib
    import sys

    from gemma4vl.runtime.patching import CallSitePatch, PatchOnImport, PatchTable

    package = tmp_path / "late_package"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "late.py").write_text("def answer():\n    return 1\n")
    (package / "user.py").write_text("from late_package.late import answer\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    replacement = lambda: 2  # noqa: E731
    patch = CallSitePatch("late_package.late", "answer", lambda _: replacement, "test")
    table = PatchTable("test", "late-package", (0, 1), "tests/test_cpu_training_loop.py", (patch,), import_now=False)
    finder = PatchOnImport({"late_package.late": [(table, patch)]})
    monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])
    try:
        user = importlib.import_module("late_package.user")  # imports late_package.late, which gets patched first
        late = sys.modules["late_package.late"]
        assert late.answer is replacement and user.answer is replacement
        assert "exec_module" not in vars(late.__loader__)  # the module keeps its regular loader
        assert finder not in sys.meta_path  # nothing left to patch: the finder removed itself
    finally:
        for name in ("late_package", "late_package.late", "late_package.user"):
            sys.modules.pop(name, None)


# --------------------------------------------------------------------------------------------------------------
# Data: a map-style dataset of dicts, and the DatasetProvider that serves it
# --------------------------------------------------------------------------------------------------------------


class CountingDataset(torch.utils.data.Dataset):
    """Sequences ``s, s+1, s+2, ...`` (mod vocab) from random starts; about 80 % of the positions carry loss."""

    def __init__(self, size: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, VOCAB, (size, 1), generator=generator)
        self.sequences = (starts + torch.arange(SEQ + 1)) % VOCAB
        self.loss_mask = (torch.rand(size, SEQ, generator=generator) > 0.2).float()

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {
            "tokens": self.sequences[index, :-1],
            "labels": self.sequences[index, 1:],
            "loss_mask": self.loss_mask[index],
        }

    def collate_fn(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {key: torch.stack([item[key] for item in items]) for key in items[0]}


def _make_dataset_provider_class() -> type:
    from dataclasses import dataclass as dataclass_

    from megatron.bridge.data.base import DatasetProvider

    @dataclass_(kw_only=True)
    class CountingDatasetProvider(DatasetProvider):
        """Train / validation / test splits of :class:`CountingDataset` (fixed sizes and seeds)."""

        seq_length: int = SEQ

        def build_datasets(self, context):
            return CountingDataset(DATASET_SIZE, 1), CountingDataset(DATASET_SIZE, 2), CountingDataset(DATASET_SIZE, 3)

    CountingDatasetProvider.__module__ = __name__
    CountingDatasetProvider.__qualname__ = "CountingDatasetProvider"
    return CountingDatasetProvider


def _dataset_provider_class() -> type:
    # The provider must subclass Megatron-Bridge's DatasetProvider, but importing Megatron-Bridge while pytest
    # merely collects this module would cost ~10 s: the class is created on first use (in the training process)
    # and kept as the module attribute its __qualname__ names.
    if "CountingDatasetProvider" not in globals():
        globals()["CountingDatasetProvider"] = _make_dataset_provider_class()
    return globals()["CountingDatasetProvider"]


def __getattr__(name: str):
    if name == "CountingDatasetProvider":
        return _dataset_provider_class()
    raise AttributeError(name)


# --------------------------------------------------------------------------------------------------------------
# Model: the local spec; with sequence parallelism, norms that mark their weight for it
# --------------------------------------------------------------------------------------------------------------


def local_spec_with_sequence_parallel_norms(config):
    """``local_layer_spec(config)`` with its norms replaced by an RMSNorm marked ``sequence_parallel``.

    Megatron-Core's local-spec norm without Apex (``WrappedTorchNorm``) refuses ``sequence_parallel=True`` (it does
    not set the attribute that makes ``finalize_model_grads`` all-reduce the norm's gradient over the tensor-
    parallel group); Transformer Engine's norm does. A model-spec matter, not a CPU one; numerically the same
    ``torch.nn.RMSNorm``.
    """
    import dataclasses

    from megatron.bridge.models.gpt_provider import local_layer_spec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    class SequenceParallelRMSNorm(torch.nn.RMSNorm):
        def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_ignored):
            super().__init__(hidden_size, eps=eps)
            self.weight.sequence_parallel = config.sequence_parallel

    spec = local_layer_spec(config)
    submodules = dataclasses.replace(
        spec.submodules, input_layernorm=SequenceParallelRMSNorm, pre_mlp_layernorm=SequenceParallelRMSNorm
    )
    layer = dataclasses.replace(spec, submodules=submodules)
    return TransformerBlockSubmodules(layer_specs=[layer] * config.num_layers, layer_norm=SequenceParallelRMSNorm)


# --------------------------------------------------------------------------------------------------------------
# One training job
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSpec:
    """What one training job does; everything a fresh process needs (picklable)."""

    directory: str
    train_iters: int = TRAIN_ITERS
    tensor_parallel: int = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    save: bool = True
    save_interval: int | None = SAVE_AT
    load: str | None = None
    eval_interval: int | None = EVAL_INTERVAL
    tensorboard: bool = False
    wandb: bool = False
    fully_reshardable: bool = False  # the distributed optimizer's checkpoint format (default: dp_reshardable)
    exercise_reporting: bool = False  # every optional metric, timer level 2, per-step sync, duration checks
    sigterm_at_iteration: int | None = None  # the forward step of this training iteration sends SIGTERM to itself
    import_bridge_before_runtime: bool = False  # exercise both orders of activation and Megatron-Bridge import
    environment: dict = field(default_factory=dict)


def _config(spec: RunSpec):
    from megatron.bridge.models.gpt_provider import GPTModelProvider, local_layer_spec
    from megatron.bridge.training.config import (
        CheckpointConfig,
        ConfigContainer,
        DistributedDataParallelConfig,
        DistributedInitConfig,
        LoggerConfig,
        OptimizerConfig,
        RNGConfig,
        SchedulerConfig,
        TrainingConfig,
        ValidationConfig,
    )
    from megatron.bridge.training.tokenizers.config import TokenizerConfig

    directory = Path(spec.directory)
    reporting = {}
    if spec.exercise_reporting:
        # The optional reporting paths of the loop, which touch CUDA in places of their own (section E of
        # patches_bridge): timers at level 2 written to TensorBoard, throughput, memory, runtime, parameter and
        # gradient norms, zeros in the gradient, world size; a CUDA synchronize every step, emptying the cache, and
        # the wall-clock limit checked (and not reached) after every iteration and evaluation.
        reporting = dict(
            timing_log_level=2,
            log_timers_to_tensorboard=True,
            log_throughput=True,
            log_throughput_to_tensorboard=True,
            log_memory_to_tensorboard=True,
            log_runtime_to_tensorboard=True,
            log_params_norm=True,
            log_l2_norm_grad_to_tensorboard=True,
            log_world_size_to_tensorboard=True,
        )
    model = GPTModelProvider(
        transformer_layer_spec=(
            local_spec_with_sequence_parallel_norms if spec.sequence_parallel else local_layer_spec
        ),
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        ffn_hidden_size=128,
        vocab_size=VOCAB,
        make_vocab_size_divisible_by=1,
        seq_length=SEQ,
        position_embedding_type="rope",
        normalization="RMSNorm",
        num_moe_experts=4,
        moe_router_topk=2,
        moe_ffn_hidden_size=32,
        moe_shared_expert_intermediate_size=64,
        moe_token_dispatcher_type="alltoall",
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=1e-2,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # CPU settings (see gemma4vl/runtime/patches_bridge.py): weights drawn on the CPU (Megatron-Bridge's
        # get_model otherwise moves the model to CUDA), no Apex gradient-accumulation fusion, and no
        # torch.compile'd cross-entropy fusion (inductor compiles it for the CPU: ~30 s for nothing).
        use_cpu_initialization=True,
        gradient_accumulation_fusion=False,
        cross_entropy_loss_fusion=False,
        params_dtype=torch.float32,
        bf16=False,
        fp16=False,
        tensor_model_parallel_size=spec.tensor_parallel,
        sequence_parallel=spec.sequence_parallel,
    )
    return ConfigContainer(
        model=model,
        train=TrainingConfig(
            train_iters=spec.train_iters,
            micro_batch_size=MICRO_BATCH,
            global_batch_size=GLOBAL_BATCH,
            exit_signal_handler=True,
            **(
                dict(train_sync_interval=1, empty_unused_memory_level=2, exit_duration_in_mins=10_000)
                if spec.exercise_reporting
                else {}
            ),
        ),
        validation=ValidationConfig(eval_interval=spec.eval_interval, eval_iters=1 if spec.eval_interval else 0),
        optimizer=OptimizerConfig(
            optimizer="adam",
            lr=1e-2,
            min_lr=0.0,
            weight_decay=0.0,
            clip_grad=1.0,
            bf16=False,
            fp16=False,
            use_distributed_optimizer=spec.distributed_optimizer,
            log_num_zeros_in_grad=spec.exercise_reporting,
        ),
        scheduler=SchedulerConfig(
            lr_decay_style="constant",
            # The schedule spans the 6-iteration run in every job, so that a job that trains 3 iterations has the
            # same schedule as the run it resumes into (the scheduler checks it on load).
            max_steps=TRAIN_ITERS,
            start_weight_decay=0.0,
            end_weight_decay=0.0,
            weight_decay_incr_style="constant",
        ),
        dataset=_dataset_provider_class()(dataloader_type="single", num_workers=0, pin_memory=False),
        logger=LoggerConfig(
            log_interval=1,
            tensorboard_dir=str(directory / "tensorboard") if spec.tensorboard else None,
            wandb_project="gemma4vl-cpu-test" if spec.wandb else None,
            wandb_exp_name="cpu-loop" if spec.wandb else "",
            wandb_save_dir=str(directory / "wandb") if spec.wandb else None,
            **reporting,
        ),
        tokenizer=TokenizerConfig(tokenizer_type="NullTokenizer", vocab_size=VOCAB),
        checkpoint=CheckpointConfig(
            save=str(directory / "checkpoints") if spec.save else None,
            load=spec.load,
            save_interval=spec.save_interval,
            ckpt_format="torch_dist",
            dist_ckpt_optim_fully_reshardable=spec.fully_reshardable,
        ),
        dist=DistributedInitConfig(distributed_backend="gloo"),
        ddp=DistributedDataParallelConfig(use_distributed_optimizer=spec.distributed_optimizer),
        rng=RNGConfig(seed=1234),
    )


class ForwardStep:
    """Our forward step: the model's per-token losses, and a loss function over the loss mask.

    Megatron's schedule divides the returned loss sum by the token count (a masked mean per micro batch); the
    reported ``"lm loss"`` pair ``[sum, tokens]`` is summed over the global batch and divided by the loop.
    """

    def __init__(self, sigterm_at_iteration: int | None):
        self.sigterm_at_iteration = sigterm_at_iteration
        self.sent = False
        # Per training iteration, one draw from the default generator and one from the tensor-parallel RNG
        # tracker per micro batch. Nothing uses them; a resumed run reproduces them only if the RNG states were
        # checkpointed and restored (no dropout here, so the losses alone would not show it).
        self.rng_draws: dict[int, list[list[float]]] = {}

    def __call__(self, state: "GlobalState", data_iterator, model):  # noqa: F821 (Megatron-Bridge reads the name)
        batch = next(data_iterator)
        if model.training:
            from megatron.core.tensor_parallel import get_cuda_rng_tracker

            with get_cuda_rng_tracker().fork():
                tracker_draw = torch.rand(()).item()
            draws = self.rng_draws.setdefault(state.train_state.step + 1, [])
            draws.append([torch.rand(()).item(), tracker_draw])
        if (
            model.training
            and self.sigterm_at_iteration is not None
            and not self.sent
            and state.train_state.step + 1 == self.sigterm_at_iteration
        ):
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)  # as Slurm / torchrun would, in the middle of an iteration
        output = model(batch["tokens"], position_ids=None, attention_mask=None, labels=batch["labels"])
        loss_mask = batch["loss_mask"]

        def loss_function(output_tensor: torch.Tensor):
            losses = output_tensor.float().view(-1)
            mask = loss_mask.view(-1).float()
            loss = torch.sum(losses * mask)
            num_tokens = mask.sum().to(torch.int)
            return loss, num_tokens, {"lm loss": torch.cat([loss.detach().view(1), num_tokens.view(1).float()])}

        return output, loss_function


def _recorder():
    from megatron.bridge.training.callbacks import Callback

    class Recorder(Callback):
        def __init__(self):
            self.losses: dict[int, float] = {}
            self.eval_losses: dict[int, float] = {}
            self.saved: list[int] = []

        def on_train_step_end(self, context):
            if "lm loss" in (context.loss_dict or {}):
                self.losses[context.state.train_state.step + 1] = float(context.loss_dict["lm loss"])

        def on_eval_end(self, context):
            self.eval_losses[context.state.train_state.step] = float(context.total_loss_dict["lm loss"])

        def on_checkpoint_save(self, context):
            self.saved.append(context.state.train_state.step)

    return Recorder()


def _patched_state() -> dict:
    """Which Megatron-Bridge patches are in place (they are applied on import or at activation)."""
    import megatron.bridge.training.initialize as initialize
    import megatron.bridge.training.setup as setup_module

    from gemma4vl.runtime import cpu_standins, patching

    return {
        "seed": initialize._set_random_seed is cpu_standins.set_random_seed,
        "setup_initialize": getattr(setup_module.initialize_megatron, patching.MARK, False),
    }


def train_job(spec: RunSpec) -> dict:
    """Run one training job in this (fresh) process, as the recipe does; return what happened.

    The result is also written to ``<directory>/result-rank<r>.json`` before Megatron-Bridge's ``sys.exit`` (the
    SIGTERM path) can end the process.
    """
    os.environ.update(spec.environment)
    # One intra-op thread in every job: the numbers do not depend on the machine's core count, and the 2-process
    # runs do the same arithmetic per rank as the 1-process run.
    torch.set_num_threads(1)
    from gemma4vl.runtime import import_megatron_bridge, setup_runtime

    if spec.import_bridge_before_runtime:
        import_megatron_bridge()
        import megatron.bridge.training.setup  # noqa: F401  (patched at activation, not on import)
        import megatron.bridge.training.train  # noqa: F401
    setup_runtime("cpu")
    import_megatron_bridge()
    from megatron.bridge.data.utils import get_dataset_provider
    from megatron.bridge.training.callbacks import normalize_callbacks
    from megatron.bridge.training.config import runtime_config_update
    from megatron.bridge.training.setup import setup
    from megatron.bridge.training.state import GlobalState
    from megatron.bridge.training.train import _finish_train, train

    recorder = _recorder()
    callbacks = normalize_callbacks([recorder])
    rank = int(os.environ.get("RANK", "0"))
    result_path = Path(spec.directory) / f"result-rank{rank}.json"
    result: dict = {"patched": _patched_state(), "exit_code": None, "finished": False}

    forward_step = ForwardStep(spec.sigterm_at_iteration)

    def write_result() -> None:
        result.update(
            losses=recorder.losses,
            eval_losses=recorder.eval_losses,
            saved=recorder.saved,
            rng_draws=forward_step.rng_draws,
        )
        result_path.write_text(json.dumps(result))

    cfg = _config(spec)
    runtime_config_update(cfg)
    state = GlobalState()
    state.cfg = cfg
    out = setup(state, get_dataset_provider(cfg.dataset), callback_manager=callbacks)
    result["start_iteration"] = state.train_state.step
    try:
        train(
            forward_step,
            out.model,
            out.optimizer,
            out.scheduler,
            out.train_data_iterator,
            out.valid_data_iterator,
            state,
            out.checkpoint_manager,
            out.pg_collection,
            callback_manager=callbacks,
        )
    except SystemExit as exit_:
        result["exit_code"] = exit_.code
        result["signal_received"] = bool(state.signal_handler._signal_received)
        write_result()
        raise
    _finish_train(state, out.checkpoint_manager)
    result["finished"] = True
    write_result()
    return result


def _in_fresh_process_and_exit(spec: RunSpec) -> None:
    """Target of a plain child process: run the job; an exception is written down and exits with status 99."""
    try:
        train_job(spec)
    except SystemExit:
        raise
    except BaseException:
        (Path(spec.directory) / "traceback.txt").write_text(traceback.format_exc())
        raise SystemExit(99)


def _run_as_plain_process(spec: RunSpec, timeout: float = RUN_TIMEOUT) -> tuple[int, dict]:
    """Run ``train_job`` as a single-process job of its own; return its exit status and its result.

    The child is forked from the ``run_distributed`` fork server (Megatron-Core already imported) but, unlike a
    ``run_distributed`` rank, it is not daemonic (Megatron-Core's ``torch_dist`` checkpoint writer starts a
    ``multiprocessing`` manager process, which daemonic processes may not) and it gets no process group:
    Megatron-Bridge's ``initialize_megatron`` creates it from ``RANK`` / ``WORLD_SIZE`` / ``MASTER_*``.
    """
    environment = {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    spec = replace(spec, environment={**environment, **spec.environment})
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(list(FORKSERVER_PRELOAD))
    process = context.Process(target=_in_fresh_process_and_exit, args=(spec,), daemon=False)
    process.start()
    process.join(timeout)
    if process.is_alive():
        process.kill()
        process.join(5)
        raise TimeoutError(f"training job did not finish within {timeout:g} s")
    traceback_file = Path(spec.directory) / "traceback.txt"
    if traceback_file.exists():
        raise AssertionError(f"training job failed:\n{traceback_file.read_text()}")
    result_file = Path(spec.directory) / "result-rank0.json"
    if not result_file.exists():
        raise AssertionError(f"training job exited with status {process.exitcode} without a result")
    return process.exitcode, json.loads(result_file.read_text())


def _by_step(values: dict) -> dict[int, float]:
    """A job's per-iteration values keyed by int (JSON turned the keys into strings)."""
    return {int(step): value for step, value in values.items()}


def _assert_same_losses(losses: dict[int, float], reference: dict[int, float], *, atol: float, rtol: float = 0.0):
    """``losses`` equals ``reference`` at every iteration ``losses`` has."""
    steps = sorted(losses)
    torch.testing.assert_close([losses[s] for s in steps], [reference[s] for s in steps], rtol=rtol, atol=atol)


# --------------------------------------------------------------------------------------------------------------
# The runs (module-scoped: several tests inspect each)
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """6 iterations on one process: eval every 2, checkpoint every 3, TensorBoard and offline W&B, all reporting."""
    directory = tmp_path_factory.mktemp("reference")
    spec = RunSpec(
        directory=str(directory),
        tensorboard=True,
        wandb=True,
        exercise_reporting=True,
        environment={"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true"},
    )
    exit_status, result = _run_as_plain_process(spec)
    assert exit_status == 0 and result["finished"], (exit_status, result)
    return {**result, "directory": directory}


@pytest.fixture(scope="module")
def sigterm_run(tmp_path_factory):
    """A job told to train 6 iterations that receives SIGTERM during iteration 3 (no interval checkpoints)."""
    directory = tmp_path_factory.mktemp("sigterm")
    spec = RunSpec(
        directory=str(directory),
        save_interval=None,
        eval_interval=None,
        sigterm_at_iteration=SAVE_AT,
    )
    exit_status, result = _run_as_plain_process(spec)
    return {**result, "exit_status": exit_status, "directory": directory}


# --------------------------------------------------------------------------------------------------------------
# Single process
# --------------------------------------------------------------------------------------------------------------


def test_losses_are_pinned_and_fall(reference_run):
    losses = [_by_step(reference_run["losses"])[step] for step in range(1, TRAIN_ITERS + 1)]
    assert reference_run["patched"] == {"seed": True, "setup_initialize": True}
    torch.testing.assert_close(losses, EXPECTED_LOSSES, rtol=1e-5, atol=1e-5)
    assert losses[-1] < losses[0] - 0.3, losses
    assert all(math.isfinite(loss) for loss in losses)


def test_evaluation_runs_at_the_interval_and_reports_its_loss(reference_run):
    eval_losses = _by_step(reference_run["eval_losses"])
    assert sorted(eval_losses) == list(range(EVAL_INTERVAL, TRAIN_ITERS + 1, EVAL_INTERVAL))
    _assert_same_losses(eval_losses, dict(zip(sorted(eval_losses), EXPECTED_EVAL_LOSSES)), rtol=1e-5, atol=1e-5)
    assert eval_losses[TRAIN_ITERS] < eval_losses[EVAL_INTERVAL]


def test_checkpoints_are_written_at_the_interval_in_torch_dist_format(reference_run):
    root = reference_run["directory"] / "checkpoints"
    assert reference_run["saved"] == [SAVE_AT, TRAIN_ITERS]
    assert (root / "latest_checkpointed_iteration.txt").read_text().strip() == str(TRAIN_ITERS)
    assert (root / "latest_train_state.pt").is_file()
    assert sorted(path.name for path in root.glob("iter_*")) == [f"iter_{SAVE_AT:07d}", f"iter_{TRAIN_ITERS:07d}"]
    iteration_dir = root / f"iter_{SAVE_AT:07d}"
    files = {path.name for path in iteration_dir.iterdir()}
    assert {"metadata.json", "run_config.yaml", "train_state.pt", ".metadata"} <= files
    assert json.loads((iteration_dir / "metadata.json").read_text())["sharded_backend"] == "torch_dist"
    assert list(iteration_dir.glob("*.distcp"))
    train_state = torch.load(iteration_dir / "train_state.pt", weights_only=False)
    assert train_state["step"] == SAVE_AT and train_state["consumed_train_samples"] == SAVE_AT * GLOBAL_BATCH


def test_tensorboard_event_files_hold_the_losses(reference_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (event_file,) = glob.glob(str(reference_run["directory"] / "tensorboard" / "events.out.tfevents.*"))
    events = EventAccumulator(event_file)
    events.Reload()
    logged = {event.step: event.value for event in events.Scalars("lm loss")}
    assert sorted(logged) == list(range(1, TRAIN_ITERS + 1))
    _assert_same_losses(_by_step(reference_run["losses"]), logged, rtol=1e-6, atol=0)
    validation = {event.step: event.value for event in events.Scalars("lm loss validation")}
    _assert_same_losses(_by_step(reference_run["eval_losses"]), validation, rtol=1e-6, atol=0)
    tags = set(events.Tags()["scalars"])
    assert {"learning-rate", "iteration-time", "throughput/tflops", "world-size", "forward-backward-time"} <= tags, tags


def test_wandb_offline_run_directory_holds_the_losses(reference_run):
    (run_file,) = glob.glob(str(reference_run["directory"] / "wandb" / "wandb" / "offline-run-*" / "run-*.wandb"))
    history = wandb_history(run_file)
    logged = {row["_step"]: float(row["lm loss"]) for row in history if "lm loss" in row}
    assert sorted(logged) == list(range(1, TRAIN_ITERS + 1))
    _assert_same_losses(_by_step(reference_run["losses"]), logged, rtol=1e-6, atol=0)
    validation = {row["_step"]: float(row["lm loss validation"]) for row in history if "lm loss validation" in row}
    _assert_same_losses(_by_step(reference_run["eval_losses"]), validation, rtol=1e-6, atol=0)


# --------------------------------------------------------------------------------------------------------------
# SIGTERM and resume
# --------------------------------------------------------------------------------------------------------------


def test_sigterm_saves_a_checkpoint_and_exits_with_status_0(reference_run, sigterm_run):
    # Megatron-Bridge's DistributedSignalHandler only records the signal; at the end of the iteration
    # checkpoint_and_decide_exit sees it on some rank (all-gather over gloo), saves a checkpoint and stops the loop;
    # train() then calls sys.exit(exit_code), with the exit code of the rerun state machine: 0.
    assert sigterm_run["exit_status"] == 0
    assert sigterm_run["exit_code"] == 0 and sigterm_run["signal_received"] and not sigterm_run["finished"]
    assert sigterm_run["saved"] == [SAVE_AT]
    root = sigterm_run["directory"] / "checkpoints"
    assert (root / "latest_checkpointed_iteration.txt").read_text().strip() == str(SAVE_AT)
    assert sorted(path.name for path in root.glob("iter_*")) == [f"iter_{SAVE_AT:07d}"]
    # It trained exactly as the reference did until the signal.
    stopped = _by_step(sigterm_run["losses"])
    assert sorted(stopped) == list(range(1, SAVE_AT + 1))
    reference = _by_step(reference_run["losses"])
    _assert_same_losses(stopped, reference, atol=0)
    reference_draws = _by_step(reference_run["rng_draws"])
    assert _by_step(sigterm_run["rng_draws"]) == {step: reference_draws[step] for step in range(1, SAVE_AT + 1)}


def test_resume_after_sigterm_matches_the_uninterrupted_run(reference_run, sigterm_run, tmp_path):
    # A fresh process loads the SIGTERM checkpoint (iteration 3) and trains to 6: equal losses prove that model,
    # optimizer (Adam moments and step), scheduler, data position and RNG state were all restored.
    spec = RunSpec(
        directory=str(tmp_path),
        load=str(sigterm_run["directory"] / "checkpoints"),
        save=False,
        eval_interval=None,
        import_bridge_before_runtime=True,
    )
    (resumed,) = run_distributed(train_job, 1, spec, timeout=RUN_TIMEOUT)
    assert resumed["start_iteration"] == SAVE_AT
    assert resumed["patched"] == {"seed": True, "setup_initialize": True}
    losses = _by_step(resumed["losses"])
    assert sorted(losses) == list(range(SAVE_AT + 1, TRAIN_ITERS + 1))
    reference = _by_step(reference_run["losses"])
    _assert_same_losses(losses, reference, atol=1e-6)
    reference_draws = _by_step(reference_run["rng_draws"])
    resumed_draws = _by_step(resumed["rng_draws"])
    assert resumed_draws == {step: reference_draws[step] for step in range(SAVE_AT + 1, TRAIN_ITERS + 1)}


def _stop_then_resume(directory: Path, *, world_size_on_resume: int = 1, **spec_fields) -> tuple[dict, list[dict]]:
    """Job 1 trains 3 of the 6 iterations and ends normally (final checkpoint); job 2 resumes it to 6."""
    first = RunSpec(
        directory=str(directory / "first"), train_iters=SAVE_AT, save_interval=None, eval_interval=None, **spec_fields
    )
    Path(first.directory).mkdir()
    exit_status, stopped = _run_as_plain_process(first)
    assert exit_status == 0 and stopped["finished"] and stopped["saved"] == [SAVE_AT]
    second = RunSpec(
        directory=str(directory / "second"),
        load=str(Path(first.directory) / "checkpoints"),
        save=False,
        eval_interval=None,
        **spec_fields,
    )
    Path(second.directory).mkdir()
    return stopped, run_distributed(train_job, world_size_on_resume, second, timeout=RUN_TIMEOUT)


def test_distributed_optimizer_resumes_from_its_default_dp_reshardable_checkpoint(reference_run, tmp_path):
    # Megatron-Bridge writes the distributed optimizer's state as "dp_reshardable" unless
    # checkpoint.dist_ckpt_optim_fully_reshardable is set. Resuming it at iteration 3 used to continue with
    # Adam step 1 (patches_core, section D); the losses of steps 5 and 6 showed it (4.4839 instead of 4.4572).
    stopped, (resumed,) = _stop_then_resume(tmp_path, distributed_optimizer=True)
    reference = _by_step(reference_run["losses"])
    assert resumed["start_iteration"] == SAVE_AT
    losses = {**_by_step(stopped["losses"]), **_by_step(resumed["losses"])}
    assert sorted(losses) == list(range(1, TRAIN_ITERS + 1))
    # The distributed optimizer (DP = 1) against the plain one: same math, different summation order.
    _assert_same_losses(losses, reference, atol=1e-5)
    assert _by_step(resumed["rng_draws"]) == {
        step: draws for step, draws in _by_step(reference_run["rng_draws"]).items() if step > SAVE_AT
    }


@pytest.mark.slow
def test_fully_reshardable_checkpoint_resumes_with_another_data_parallel_size(reference_run, tmp_path):
    # The format to resume with a different number of ranks (e.g. a Slurm requeue on fewer nodes): saved by one
    # process, resumed by two (data parallel 2). Loading it used to fail with KeyError: 'step' (section D).
    stopped, results = _stop_then_resume(
        tmp_path, world_size_on_resume=2, distributed_optimizer=True, fully_reshardable=True
    )
    reference = _by_step(reference_run["losses"])
    for rank, resumed in enumerate(results):
        assert resumed["start_iteration"] == SAVE_AT, rank
        losses = _by_step(resumed["losses"])
        assert sorted(losses) == list(range(SAVE_AT + 1, TRAIN_ITERS + 1)), rank
        _assert_same_losses(losses, reference, atol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# Two gloo processes
# --------------------------------------------------------------------------------------------------------------

PARALLEL_ITERS = 3


@pytest.mark.parametrize(
    "layout",
    [
        pytest.param({"distributed_optimizer": True}, id="data-parallel-2-distributed-optimizer"),
        pytest.param({"tensor_parallel": 2, "sequence_parallel": True}, id="tensor-parallel-2-sequence-parallel"),
    ],
)
def test_two_processes_match_the_one_process_run(reference_run, tmp_path, layout):
    # Same global batch (4) and seed: data parallel splits it 2 + 2 and averages the gradients (the distributed
    # optimizer shards Adam's state); tensor parallel shards every layer, sequence parallel the activations between.
    # use_cpu_initialization draws the same full master weights in every layout.
    spec = RunSpec(
        directory=str(tmp_path),
        train_iters=PARALLEL_ITERS,
        save=False,
        eval_interval=None,
        import_bridge_before_runtime=layout.get("tensor_parallel", 1) > 1,
        exercise_reporting=True,  # timers, norms and flags all-reduced / all-gathered over two ranks
        **layout,
    )
    results = run_distributed(train_job, 2, spec, timeout=RUN_TIMEOUT)
    reference = _by_step(reference_run["losses"])
    for rank, result in enumerate(results):
        assert result["patched"] == {"seed": True, "setup_initialize": True}, rank
        losses = _by_step(result["losses"])
        assert sorted(losses) == list(range(1, PARALLEL_ITERS + 1)), rank
        _assert_same_losses(losses, reference, rtol=1e-5, atol=1e-5)
