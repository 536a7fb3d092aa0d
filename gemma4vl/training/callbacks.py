"""Megatron-Bridge callbacks of a gemma4vl run: the progress line and the metrics history.

Every step the last rank (which holds the loss) appends ``{"step", "loss", "grad_norm", "lr", "seconds",
"real_tokens", "samples"}`` to the run's :class:`~gemma4vl.training.metrics.MetricsLog` (validation results as
``{"step", "val_loss"}``); every ``log_interval`` steps it logs (logger ``gemma4vl.progress``, INFO: the console and Hydra's
``<run_dir>/finetune.log``)

    step 20/60 | loss 2.3141 | grad norm 1.92 | lr 8.6e-05 | 1843 real tok/s | 3.1 samples/s | ETA 0:01:12 | peak mem 41.2 GiB

``real_tokens`` counts the global batch's real tokens of the step (positions with ``segment_ids > 0``: prompt,
image and answer tokens of the samples, not padding; summed over data-parallel ranks), ``samples`` its packed
samples. real tok/s and samples/s are those counts summed over the steps since the previous line, divided by
the sum of those steps' ``seconds``. peak mem is ``torch.cuda.max_memory_allocated`` of the logging rank (absent
on CPU).
"""

from __future__ import annotations

import logging
import math
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.bridge.training.callbacks import Callback, CallbackContext

from gemma4vl.training.metrics import MetricsLog

logger = logging.getLogger("gemma4vl.progress")


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

    def __init__(self, metrics: MetricsLog, log_interval: int, counter, total_steps: int):
        self.metrics = metrics
        self.log_interval = log_interval
        self.counter = counter  # gemma4vl.training.forward_step.TokenCounter
        self.total_steps = total_steps
        self._last = None
        self._durations: list[float] = []
        self._interval = [0.0, 0, 0]  # seconds, real tokens, samples since the last progress line

    def _reduce(self, counts: tuple[int, int]) -> tuple[int, int]:
        """Sum (real tokens, samples) over the data-parallel group (every rank calls this)."""
        if not dist.is_initialized():
            return counts
        from megatron.core import parallel_state

        group = parallel_state.get_data_parallel_group() if parallel_state.model_parallel_is_initialized() else None
        device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
        t = torch.tensor(counts, dtype=torch.int64, device=device)
        dist.all_reduce(t, group=group)
        return int(t[0]), int(t[1])

    def on_train_step_start(self, context: CallbackContext) -> None:
        self._last = time.perf_counter()

    def on_train_step_end(self, context: CallbackContext) -> None:
        real_tokens, samples = self._reduce(self.counter.take())
        if not _is_last_rank():
            return
        seconds = time.perf_counter() - self._last
        self._durations = (self._durations + [seconds])[-20:]
        self._interval = [self._interval[0] + seconds, self._interval[1] + real_tokens, self._interval[2] + samples]
        step = context.state.train_state.step + 1  # Megatron-Bridge advances the counter after this event
        losses = context.loss_dict or {}
        loss = _scalar(losses.get("lm loss"))
        lr = context.optimizer.param_groups[0]["lr"] if context.optimizer is not None else None
        record = {"step": step, "loss": loss, "grad_norm": _scalar(context.grad_norm), "lr": lr,
                  "seconds": seconds, "real_tokens": real_tokens, "samples": samples,
                  "skipped": bool(context.skipped_iter)}
        self.metrics.append(record)
        if step % self.log_interval == 0 or step == self.total_steps:
            mean = sum(self._durations) / len(self._durations)
            eta = timedelta(seconds=round(mean * (self.total_steps - step)))
            grad = "n/a" if record["grad_norm"] is None else f"{record['grad_norm']:.3g}"
            shown = "n/a" if loss is None or not math.isfinite(loss) else f"{loss:.4f}"
            elapsed, tokens, done = self._interval
            self._interval = [0.0, 0, 0]
            memory = (f" | peak mem {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
                      if torch.cuda.is_available() else "")
            logger.info("step %d/%d | loss %s | grad norm %s | lr %.3g | %.1f real tok/s | %.3g samples/s | ETA %s%s",
                        step, self.total_steps, shown, grad, lr, tokens / elapsed, done / elapsed, eta, memory)

    def on_eval_end(self, context: CallbackContext) -> None:
        if not _is_last_rank():
            return
        val = _scalar((context.total_loss_dict or {}).get("lm loss"))
        step = context.state.train_state.step
        self.metrics.append({"step": step, "val_loss": val})
        logger.info("validation at step %d: loss %s", step, "n/a" if val is None else f"{val:.4f}")



class ValidationAnswersCallback(Callback):
    """After each evaluation: the model's greedy answers to a few validation questions (see
    :mod:`gemma4vl.training.answers`), their exact-match accuracy in the metrics log and on stdout, and a wandb
    table of image / question / reference / answer when the metrics log has a wandb run."""

    def __init__(self, probes, tokenizer, image_token_id: int, metrics: MetricsLog):
        self.probes = probes
        self.tokenizer = tokenizer
        self.image_token_id = image_token_id
        self.stop_ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<turn|>")}
        self.metrics = metrics

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
        self.metrics.append({"step": step, "val_answer_accuracy": correct / len(self.probes), "val_answers": answers})
        shown = ", ".join(f"{p.reference!r}->{a!r}" for p, a in list(zip(self.probes, answers))[:4])
        print(f"validation answers at step {step}: {correct}/{len(self.probes)} exact ({shown}, ...)", flush=True)
        if self.metrics.wandb_run is not None:
            import wandb

            table = wandb.Table(columns=["step", "image", "question", "reference", "answer"])
            for p, a in zip(self.probes, answers):
                image = wandb.Image(p.image.numpy()) if p.image is not None else None
                table.add_data(step, image, p.question, p.reference, a)
            self.metrics.wandb_run.log({"validation/answers": table}, step=step)
