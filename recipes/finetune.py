"""Finetune a Gemma 4 VL model:  ``python -m recipes.finetune [group=option ...] [key=value ...]``.

With no arguments: the CPU demo (tiny random model, synthetic VQA). Groups: model, parallel, data, optim, peft,
trainer, logger, checkpoint, export, experiment, debug (see conf/). Under torchrun or Slurm, see launch/.
Exit status: 0 when done, 1 with `error: <what and where>` for bad input found before training, 75 when a
SIGTERM / SIGUSR1 stopped the run after saving a checkpoint (rerun the
same command to resume).
"""

import multiprocessing
import signal
import sys

if multiprocessing.current_process().name != "MainProcess":
    # A helper process that a rank spawned and that re-imports this module as its main (Megatron-Core's asynchronous
    # checkpoint writer starts a multiprocessing Manager with the spawn method at the first save; multiprocessing
    # names the child before it imports the main module, and sets parent_process() only after). Slurm delivers the
    # launcher's SIGUSR1 to every process of the step, and repeats it while the ranks save; its default action
    # would end this helper and fail the save (EOFError in the rank). Only the ranks act on SIGUSR1.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)

from omegaconf import DictConfig  # noqa: E402

from gemma4vl.bridge.checkpoint import CheckpointError  # noqa: E402
from gemma4vl.config import register_configs  # noqa: E402
from gemma4vl.config.compose import to_run_config  # noqa: E402
from gemma4vl.config.hydra_guard import hydra_main  # noqa: E402
from gemma4vl.config.validate import ConfigError  # noqa: E402
from gemma4vl.training.finetune import finetune, main_exit_code  # noqa: E402
from recipes.inputs import prepare_demo_inputs  # noqa: E402

register_configs()


@hydra_main(config_path="pkg://gemma4vl.conf", config_name="config")  # hydra.main behind the config allowlist
def main(cfg: DictConfig) -> None:
    run = to_run_config(cfg)
    prepare_demo_inputs(run)  # the demo's generated checkpoint / data, only where the config points at them
    try:
        code = main_exit_code(finetune(run))
    except (ConfigError, CheckpointError) as e:  # bad input or checkpoint: the message says what and where
        sys.exit(f"error: {e}")
    if code:
        sys.exit(code)  # SystemExit passes through Hydra's error reporting


if __name__ == "__main__":
    main()
