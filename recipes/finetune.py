"""Finetune a Gemma 4 VL model:  ``python -m recipes.finetune [group=option ...] [key=value ...]``.

With no arguments: the CPU demo (tiny random model, synthetic VQA). Groups: model, parallel, data, optim, peft,
trainer, logger, checkpoint, export, experiment, debug (see conf/). Under torchrun or Slurm, see launch/.
Exit status: 0 when done, 1 with `error: <what and where>` for bad input found before training, 75 when a
SIGTERM / SIGUSR1 stopped the run after saving a checkpoint (rerun the
same command to resume).
"""

import sys

from omegaconf import DictConfig

from gemma4vl.bridge.checkpoint import CheckpointError
from gemma4vl.config import register_configs
from gemma4vl.config.compose import to_run_config
from gemma4vl.config.hydra_guard import hydra_main
from gemma4vl.config.validate import ConfigError
from gemma4vl.training.finetune import finetune, main_exit_code
from recipes.inputs import prepare_demo_inputs

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
