"""``finetune(cfg)``: a whole finetuning run, as ``recipes/finetune.py`` calls it (setup, train, save, cleanup).

1. setup: runtime for the device, process group, inputs generated when the config asks for demo inputs, the
   checkpoint's config read and the run config validated (before any weight is read), resume detection;
2. train: Megatron-Bridge's ``setup`` (model built with the HF weights imported through our bridge, or restored
   from the newest checkpoint), ``train`` with our forward step, evaluation and periodic checkpoints;
3. save: the HF export (un-fused with the trained norms, verified, written atomically) into ``<run_dir>/hf_export``,
   and / or for LoRA runs the PEFT adapter into ``<run_dir>/hf_adapter`` (``export.format``);
4. cleanup: Megatron-Bridge's finish (async saves, loggers) and the process group.

Works as one process or under ``torchrun`` (one process per device).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from gemma4vl.config.schema import RunConfig
from gemma4vl.config.validate import ConfigError, ValidatedRun
from gemma4vl.export.hf_export import recover_interrupted_export
from gemma4vl.runtime import setup_runtime
from gemma4vl.runtime.distributed import destroy_process_group, init_process_group
from gemma4vl.training.metrics import MetricsLog
from gemma4vl.training.preflight import (  # noqa: F401  (latest_checkpoint_step re-exported)
    check_data,
    check_outputs,
    check_outputs_apart_from_inputs,
    check_resume,
    latest_checkpoint_step,
)

logger = logging.getLogger("gemma4vl")

EXIT_PREEMPTED = 75
"""Exit status after a SIGTERM / SIGUSR1 made the run save a checkpoint and stop (``EX_TEMPFAIL``): the Slurm
launcher requeues on it, and rerunning the same command resumes."""


@dataclass
class FinetuneResult:
    """What a finished run produced."""

    run_dir: Path
    """The run directory."""

    steps: int
    """Optimizer steps completed (including resumed ones)."""

    resumed_from: int | None
    """The checkpointed step this process resumed from, or None."""

    export_dir: Path | None
    """The verified HF export (the PEFT adapter with ``export.format=adapter``), or None when export is
    disabled."""

    preempted: bool
    """True when a signal stopped the run early (a checkpoint was saved)."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def resolve_hf_path(path: str) -> Path:
    """A local checkpoint directory for ``model.hf_path``: a directory holding config.json, or a hub id
    (``owner/name``) downloaded where the hub is reachable. Anything else is an error naming the key and path."""
    local = Path(path).expanduser()
    if (local / "config.json").is_file():
        return local
    if local.is_dir():
        raise ConfigError(f"model.hf_path={path}: the directory has no config.json (expected a Hugging Face "
                          "checkpoint: config.json, model*.safetensors, processor files; an incomplete copy?)")
    if local.exists():
        raise ConfigError(f"model.hf_path={path}: not a directory (expected a Hugging Face checkpoint dir)")
    if path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise ConfigError(f"model.hf_path={path}: no such directory (and not a hub id like owner/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=path))
    except Exception as e:  # noqa: BLE001 - offline, unknown id, gated ...
        raise ConfigError(f"model.hf_path={path}: no such local directory, and downloading it as a hub id "
                          f"failed ({type(e).__name__}: {e})") from e


def _export_dtype(cfg: RunConfig) -> torch.dtype | None:
    return None if cfg.export.dtype == "source" else getattr(torch, cfg.export.dtype)


def finetune(cfg: RunConfig) -> FinetuneResult:
    """Run ``cfg`` end to end (see module docstring)."""
    from gemma4vl.bridge import precheck_hf_checkpoint, read_hf_config
    from gemma4vl.config.validate import validate

    setup_runtime(cfg.trainer.device)
    init_process_group(cfg.trainer.device, cfg.trainer.distributed_timeout_minutes)
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    run_dir = Path(cfg.run_dir)
    if _rank() == 0:
        check_outputs(cfg)
    _barrier()
    hf_dir = resolve_hf_path(cfg.model.hf_path)
    checked = validate(cfg, world_size, read_hf_config(hf_dir))  # the one read of config.json, passed down
    precheck_hf_checkpoint(checked.hf, megatron_bridge_names=cfg.peft.method != "none")  # no weight read yet
    check_outputs_apart_from_inputs(cfg, hf_dir)
    check_data(cfg.data)
    resumed_from = check_resume(cfg)
    if _rank() == 0:
        OmegaConf.save(OmegaConf.structured(cfg), run_dir / "config.yaml")
        MetricsLog(run_dir).truncate_after(resumed_from or 0)
        recover_interrupted_export(Path(cfg.export.dir))
        recover_interrupted_export(Path(cfg.export.adapter_dir))
        if resumed_from is not None:
            print(f"resuming from the checkpoint of step {resumed_from} in {cfg.checkpoint.dir}", flush=True)
    _barrier()
    trained = _train(cfg, checked, resume=resumed_from is not None)
    # Training is over: a SIGUSR1 from now on (the Slurm launcher repeats it every 30 s while the ranks live) must
    # not end the process. Python restores its handled signals to the default action while the interpreter shuts
    # down, and the default action of SIGUSR1 is to terminate: a rank that had saved and returned 75 died as 138.
    # An ignored signal stays ignored through shutdown.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    steps, preempted = trained.state.train_state.step, trained.preempted
    export_dir = None
    if cfg.export.enabled and not preempted:
        export_dir = _export(cfg, checked, trained)
    _finish(trained)
    if preempted:
        print(f"stopped by a signal after step {steps}; checkpoint saved in {cfg.checkpoint.dir} "
              f"(exit status {EXIT_PREEMPTED}: rerun the same command to resume)", flush=True)
    return FinetuneResult(run_dir, steps, resumed_from, export_dir, preempted)


@dataclass
class _Trained:
    """What ``_train`` hands to the export and the cleanup."""

    state: object  # Megatron-Bridge's GlobalState
    model: list  # the model chunks
    auto_bridge: object  # the AutoBridge the model was imported through (and exports through)
    checkpoint_manager: object  # Megatron-Bridge's, for finalising asynchronous saves
    metrics: MetricsLog  # the run's metrics log (with its wandb run on the rank that logs to wandb)
    preempted: bool  # a signal stopped the run after a checkpoint


def _train(cfg: RunConfig, checked: ValidatedRun, resume: bool) -> _Trained:
    import gemma4vl.bridge  # noqa: F401  (registers the bridge)
    from megatron.bridge import AutoBridge
    from megatron.bridge.data.utils import get_dataset_provider
    from megatron.bridge.training.callbacks import CallbackManager
    from megatron.bridge.training.config import runtime_config_update
    from megatron.bridge.training.setup import setup
    from megatron.bridge.training.state import GlobalState
    from megatron.bridge.training.train import train

    from gemma4vl.config.container import build_config_container
    from gemma4vl.training.callbacks import ProgressCallback
    from gemma4vl.training.bad_rows import BadRowCallback, BadRowMonitor
    from gemma4vl.training.forward_step import ForwardStep, TokenCounter

    from gemma4vl.runtime.log_noise import show_megatron_details

    show_megatron_details(cfg.logger.megatron_details)
    auto_bridge = AutoBridge.from_hf_pretrained(str(checked.hf.path.parent))
    container = build_config_container(cfg, auto_bridge, resume=resume)
    runtime_config_update(container)
    state = GlobalState()
    state.cfg = container  # installs Megatron-Bridge's SIGTERM handler
    # Before setup: a signal during setup is honoured, and the data-loader workers setup forks inherit the handler
    # (with the default action, the SIGUSR1 Slurm sends to every process of a step ended them, and the run).
    _translate_sigusr1()
    wandb_run = init_wandb(cfg) if cfg.logger.backend == "wandb" else None
    callbacks = CallbackManager()
    monitor = BadRowMonitor(cfg.data.max_skipped_fraction, cfg.data.bad_row_log_limit)
    callbacks.add(BadRowCallback(monitor))
    counter = TokenCounter()
    metrics = MetricsLog(cfg.run_dir, wandb_run)
    callbacks.add(ProgressCallback(metrics, cfg.trainer.log_interval, counter,
                                   total_steps=cfg.trainer.train_iters))
    answers = validation_answers_callback(cfg, checked.hf.arch.image_token_id, metrics)
    if answers is not None:
        callbacks.add(answers)
    out = setup(state, get_dataset_provider(container.dataset), callback_manager=callbacks)
    _log_parameter_counts(cfg, out.model)
    state = out.state
    preempted = False
    try:
        train(ForwardStep(monitor, counter), out.model, out.optimizer, out.scheduler, out.train_data_iterator,
              out.valid_data_iterator, state, out.checkpoint_manager, out.pg_collection, callback_manager=callbacks)
    except SystemExit:
        # After an exit signal Megatron-Bridge saves a checkpoint and calls sys.exit(0) inside train(). Every rank
        # leaves the loop at the same iteration, so the collective check below is safe.
        if not (cfg.trainer.exit_on_signal and any(state.signal_handler.signals_received())):
            raise
        preempted = True
    return _Trained(state, out.model, auto_bridge, out.checkpoint_manager, metrics, preempted)


def wandb_mode(mode: str, probe_timeout: float = 5.0) -> str:
    """``online`` / ``offline`` for the logger's ``wandb_mode``; ``auto`` is online only when wandb credentials are
    configured (``WANDB_API_KEY``, or a ``wandb login`` entry in ~/.netrc) *and* the wandb server answers a TCP
    connection within ``probe_timeout`` seconds (so a machine without network logs offline at once instead of
    stalling in ``wandb.init``)."""
    if mode != "auto":
        return mode
    import netrc

    if os.environ.get("WANDB_API_KEY", "").strip():
        has_key = True
    else:
        try:
            has_key = bool(netrc.netrc().authenticators("api.wandb.ai"))
        except (FileNotFoundError, netrc.NetrcParseError):
            has_key = False
    if not has_key:
        return "offline"
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    host, port = url.hostname or "api.wandb.ai", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=probe_timeout).close()
    except OSError as e:
        logger.warning("logger.wandb_mode=auto: %s:%s is not reachable (%s); logging to wandb offline (sync later "
                       "with `wandb sync %s`)", host, port, e, "<run_dir>/wandb")
        return "offline"
    return "online"


def init_wandb(cfg: RunConfig):
    """The wandb run the metrics log writes to (:class:`~gemma4vl.training.metrics.MetricsLog`), on the last rank
    (which holds the loss; None on the others), with an explicit mode and our own resolved config; a resumed run
    continues the same wandb run (its id derives from the run directory)."""
    if not dist.is_initialized() or dist.get_rank() != dist.get_world_size() - 1:
        return None
    import hashlib

    import wandb

    run_id = hashlib.sha1(str(Path(cfg.run_dir).resolve()).encode()).hexdigest()[:12]
    return wandb.init(project=cfg.logger.project, entity=cfg.logger.entity, name=cfg.name, id=run_id,
                      resume="allow", dir=str(cfg.run_dir), mode=wandb_mode(cfg.logger.wandb_mode),
                      config=OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True))


def validation_answers_callback(cfg: RunConfig, image_token_id: int, metrics: MetricsLog):
    """The callback showing validation answers, or None (no evaluation, no samples asked, or pipeline parallel)."""
    from gemma4vl.data.config import load_processor
    from gemma4vl.training.answers import load_probes
    from gemma4vl.training.callbacks import ValidationAnswersCallback

    if not cfg.trainer.eval_interval or cfg.logger.val_image_samples <= 0:
        return None
    if cfg.parallel.pipeline > 1:
        logger.warning("validation answers are not generated with pipeline parallelism (parallel.pipeline > 1)")
        return None
    probes = load_probes(cfg.data, cfg.logger.val_image_samples)
    if not probes:
        return None
    processor = load_processor(cfg.data.processor_path)
    return ValidationAnswersCallback(probes, processor.tokenizer, image_token_id, metrics)


def _translate_sigusr1() -> None:
    """Megatron-Bridge's exit handler listens for one signal (SIGTERM); Slurm's advance warning is often SIGUSR1.
    Deliver SIGUSR1 as SIGTERM so both stop the run the same way (checkpoint, then exit status 75), while that
    handler is installed: once Megatron-Bridge has restored SIGTERM's default (or with trainer.exit_on_signal=false)
    a SIGUSR1, e.g. the launcher repeating one, is dropped instead of ending the process."""

    def handler(signum, frame):
        if signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN, None):
            os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGUSR1, handler)


def model_card(cfg: RunConfig, steps: int) -> str:
    """The export's README.md: what it was finetuned from, on what data, with which config (the resolved run
    config, as in <run_dir>/config.yaml)."""
    config = OmegaConf.to_yaml(OmegaConf.structured(cfg), resolve=True)
    data = cfg.data.path if cfg.data.subset is None else f"{cfg.data.path} (subset {cfg.data.subset})"
    revision = "" if cfg.data.revision is None else f", revision {cfg.data.revision}"
    return (f"---\nlibrary_name: transformers\npipeline_tag: image-text-to-text\n---\n\n# {cfg.name}\n\n"
            f"Finetuned with gemma4vl from `{cfg.model.hf_path}` for {steps} steps "
            f"({'LoRA, merged' if cfg.peft.method != 'none' else 'full'} finetuning) on `{data}` split "
            f"`{cfg.data.split}`{revision} (format `{cfg.data.format}`).\n\n"
            f"The license and usage terms of the base model apply.\n\n## Config\n\n```yaml\n{config}```\n")


def _export(cfg: RunConfig, checked: ValidatedRun, trained: _Trained) -> Path | None:
    from gemma4vl.export import export_hf_adapter, export_hf_checkpoint

    if cfg.export.format in ("merged", "both"):
        report = export_hf_checkpoint(trained.auto_bridge, trained.model, cfg.export.dir, dtype=_export_dtype(cfg),
                                      max_shard_bytes=checked.max_shard_bytes, overwrite=True,
                                      model_card=model_card(cfg, trained.state.train_state.step))
        if report is not None:
            print(f"exported {report.num_tensors} tensors ({report.num_bytes / 1e9:.2f} GB, {report.dtype}) to "
                  f"{report.path} in {report.seconds:.1f} s; verified", flush=True)
    if cfg.export.format in ("adapter", "both"):
        adapter = export_hf_adapter(trained.auto_bridge, trained.model, cfg.export.adapter_dir, trained.state.cfg.peft,
                                    overwrite=True)
        if adapter is not None:
            print(f"exported the LoRA adapter ({adapter.num_parameters:,} parameters on "
                  f"{len(adapter.target_modules)} modules) to {adapter.path} in {adapter.seconds:.1f} s; verified",
                  flush=True)
    if cfg.export.verify_logits:
        _verify_export_logits(cfg, checked, trained)
    return Path(cfg.export.adapter_dir if cfg.export.format == "adapter" else cfg.export.dir)


def _verify_export_logits(cfg: RunConfig, checked: ValidatedRun, trained: _Trained) -> None:
    from megatron.core.utils import unwrap_model

    from gemma4vl.training.answers import load_probes
    from gemma4vl.training.export_check import verify_export_logits

    if cfg.parallel.pipeline > 1:
        raise ValueError("export.verify_logits needs parallel.pipeline=1")
    probes = load_probes(cfg.data, 1)
    if not probes:
        raise ValueError("export.verify_logits needs a validation split (data.validation_split)")
    hf_dir, image_token_id = checked.hf.path.parent, checked.hf.arch.image_token_id
    metrics, step = trained.metrics, trained.state.train_state.step
    atol = 1e-4 if cfg.trainer.precision == "fp32" else None
    chunk = unwrap_model(trained.model)[0]
    if atol is None:  # bf16: relative to the logit range
        from gemma4vl.training.export_check import megatron_logits

        atol = 0.05 * megatron_logits(chunk, probes[0], image_token_id).abs().max().item()
    if cfg.export.format in ("merged", "both"):
        verify_export_logits(chunk, probes[0], image_token_id, cfg.export.dir, metrics, step, atol)
    if cfg.export.format in ("adapter", "both"):
        _verify_base_unchanged(cfg, trained.auto_bridge, trained.model, metrics, step)
        verify_export_logits(chunk, probes[0], image_token_id, hf_dir, metrics, step, atol,
                             adapter_dir=cfg.export.adapter_dir)


def _verify_base_unchanged(cfg: RunConfig, auto_bridge, model, metrics: MetricsLog, step: int) -> None:
    """The adapter is loaded onto the source checkpoint: check the trained model's base weights are still its
    tensors, bit for bit (recorded as ``adapter_base_tensors_identical`` in the metrics log)."""
    from gemma4vl.export.adapter_export import base_differences

    compared, differing = base_differences(auto_bridge, model)
    if _rank() != 0:
        return
    metrics.append({"step": step, "adapter_base_tensors_identical": compared - len(differing),
                    "adapter_base_tensors_differing": differing[:20]})
    print(f"adapter check: {compared - len(differing)} of {compared} base tensors equal the source checkpoint's, "
          "bit for bit", flush=True)
    if differing:
        raise RuntimeError(f"the trained model's base weights differ from {cfg.model.hf_path}: {differing[:5]}; the "
                           "adapter alone does not reproduce it")


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameters of this rank's model chunks."""
    from megatron.core.utils import unwrap_model

    params = [p for chunk in unwrap_model(model) for p in chunk.parameters()]
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def _log_parameter_counts(cfg: RunConfig, model) -> None:
    trainable, total = parameter_counts(model)
    if _rank() == 0:
        where = " on rank 0" if dist.is_initialized() and dist.get_world_size() > 1 else ""
        what = " (LoRA adapters)" if cfg.peft.method != "none" else ""
        print(f"trainable parameters{where}: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%){what}",
              flush=True)


def _finish(trained: _Trained) -> None:
    """What Megatron-Bridge's own ``pretrain`` does after training, through public calls (fault tolerance and the
    straggler detector, which it also shuts down, are not used by gemma4vl): wait for asynchronous checkpoint
    saves, close our wandb run, drop Megatron's global state; then the process group."""
    from megatron.bridge.training.initialize import destroy_global_state

    trained.checkpoint_manager.finalize_async_saves(state=trained.state, blocking=True, terminate=True)
    if trained.metrics.wandb_run is not None:
        trained.metrics.wandb_run.finish()
    destroy_global_state()
    _barrier()
    destroy_process_group()


def main_exit_code(result: FinetuneResult) -> int:
    """Process exit status for ``result``: 0, or :data:`EXIT_PREEMPTED` after a signal."""
    return EXIT_PREEMPTED if result.preempted else 0


if __name__ == "__main__":  # pragma: no cover - use recipes/finetune.py
    sys.exit("use: python -m recipes.finetune")
