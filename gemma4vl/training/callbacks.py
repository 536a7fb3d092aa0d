"""Megatron-Bridge callbacks of a gemma4vl run: the progress line and the metrics history.

Every step the last rank (which holds the loss) appends ``{"step", "loss", "grad_norm", "lr", "seconds"}`` to
``<run_dir>/metrics.jsonl`` (validation results as ``{"step", "val_loss"}``); every ``log_interval`` steps it
prints

    step 20/60 | loss 2.3141 | grad norm 1.92 | lr 8.6e-05 | 1843 tok/s | ETA 0:01:12

where tok/s counts the sequence positions processed (global batch x sequence length per step time).
"""

from __future__ import annotations

import json
import math
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.bridge.training.callbacks import Callback, CallbackContext

from gemma4vl.training.metrics import read_metrics  # noqa: F401  (re-exported)


def _is_last_rank() -> bool:
    return not dist.is_initialized() or dist.get_rank() == dist.get_world_size() - 1


def _scalar(value) -> float | None:
    if value is None:
        return None
    if isinstance(value, (tuple, list)):  # (sum, count) pairs
        total, count = (float(v) for v in value)
        return total / max(count, 1.0)
    if isinstance(value, torch.Tensor):
        return float(value.float().mean())
    return float(value)


class ProgressCallback(Callback):
    """Progress line and ``metrics.jsonl`` (see module docstring)."""

    def __init__(self, run_dir: str | Path, log_interval: int, tokens_per_step: int, total_steps: int):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.log_interval = log_interval
        self.tokens_per_step = tokens_per_step
        self.total_steps = total_steps
        self._last = None
        self._durations: list[float] = []

    def _write(self, record: dict) -> None:
        # Strict JSON: a non-finite value (the loss of a step whose rows were all skipped) is written as null.
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")

    def on_train_step_start(self, context: CallbackContext) -> None:
        self._last = time.perf_counter()

    def on_train_step_end(self, context: CallbackContext) -> None:
        if not _is_last_rank():
            return
        seconds = time.perf_counter() - self._last
        self._durations = (self._durations + [seconds])[-20:]
        step = context.state.train_state.step + 1  # Megatron-Bridge advances the counter after this event
        losses = context.loss_dict or {}
        loss = _scalar(losses.get("lm loss"))
        lr = context.optimizer.param_groups[0]["lr"] if context.optimizer is not None else None
        record = {"step": step, "loss": loss, "grad_norm": _scalar(context.grad_norm), "lr": lr,
                  "seconds": seconds, "skipped": bool(context.skipped_iter)}
        self._write(record)
        if step % self.log_interval == 0 or step == self.total_steps:
            mean = sum(self._durations) / len(self._durations)
            eta = timedelta(seconds=round(mean * (self.total_steps - step)))
            grad = "n/a" if record["grad_norm"] is None else f"{record['grad_norm']:.3g}"
            shown = "n/a" if loss is None or not math.isfinite(loss) else f"{loss:.4f}"
            print(f"step {step}/{self.total_steps} | loss {shown} | grad norm {grad} | lr {lr:.3g} | "
                  f"{self.tokens_per_step / mean:.0f} tok/s | ETA {eta}", flush=True)

    def on_eval_end(self, context: CallbackContext) -> None:
        if not _is_last_rank():
            return
        val = _scalar((context.total_loss_dict or {}).get("lm loss"))
        step = context.state.train_state.step
        self._write({"step": step, "val_loss": val})
        print(f"validation at step {step}: loss {'n/a' if val is None else f'{val:.4f}'}", flush=True)



class ValidationAnswersCallback(Callback):
    """After each evaluation: the model's greedy answers to a few validation questions (see
    :mod:`gemma4vl.training.answers`), their exact-match accuracy in ``metrics.jsonl`` and on stdout, and a wandb
    table of image / question / reference / answer when wandb is the logger."""

    def __init__(self, probes, tokenizer, image_token_id: int, run_dir: str | Path, log_table: bool):
        self.probes = probes
        self.tokenizer = tokenizer
        self.image_token_id = image_token_id
        self.stop_ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<turn|>")}
        self.path = Path(run_dir) / "metrics.jsonl"
        self.log_table = log_table

    def on_eval_end(self, context: CallbackContext) -> None:
        from megatron.core.utils import unwrap_model

        from gemma4vl.training.answers import greedy_answer

        model = unwrap_model(context.model)[0]
        was_training = model.training
        model.eval()
        answers = [self.tokenizer.decode(greedy_answer(model, p, self.image_token_id, self.stop_ids),
                                         skip_special_tokens=True).strip() for p in self.probes]
        model.train(was_training)
        if not _is_last_rank():
            return
        step = context.state.train_state.step
        correct = sum(a.lower() == p.reference.lower() for a, p in zip(answers, self.probes))
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "val_answer_accuracy": correct / len(self.probes),
                                "val_answers": answers}) + "\n")
        shown = ", ".join(f"{p.reference!r}->{a!r}" for p, a in list(zip(self.probes, answers))[:4])
        print(f"validation answers at step {step}: {correct}/{len(self.probes)} exact ({shown}, ...)", flush=True)
        wandb = context.state.wandb_logger if self.log_table else None
        if wandb is not None:
            table = wandb.Table(columns=["step", "image", "question", "reference", "answer"])
            for p, a in zip(self.probes, answers):
                image = wandb.Image(p.image.numpy()) if p.image is not None else None
                table.add_data(step, image, p.question, p.reference, a)
            wandb.log({"validation/answers": table, "validation/answer_accuracy": correct / len(self.probes)},
                      step=step)
