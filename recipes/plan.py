"""Per-GPU memory plan of a run:  ``python -m recipes.plan experiment=gemma4_26b_sft [key=value ...]``.

Composes the run config exactly as ``recipes.finetune`` does, counts the model's parameters from the
checkpoint's config.json (or the bundled shape of a known hub id: no download, no weights), validates the
layout for ``parallel.world_size`` processes and prints bytes per GPU for weights, gradients, optimizer state,
activations, the loss peak and the optimizer step (:mod:`gemma4vl.config.memory`). The last line is
``per-GPU peak estimate: <X> GiB of <Y> GiB`` (``trainer.device_memory_gib``). Exit status 1 when it does not fit.

The plan assumes a fused Adam (Transformer Engine or Apex) on the GPU nodes and says what torch's AdamW would
add; ``recipes.finetune`` checks the same plan with what is actually installed.
"""

import sys

from omegaconf import DictConfig

from gemma4vl.config import register_configs
from gemma4vl.config.compose import to_run_config
from gemma4vl.config.hydra_guard import hydra_main

register_configs()


@hydra_main(config_path="pkg://gemma4vl.conf", config_name="config")  # hydra.main behind the config allowlist
def main(cfg: DictConfig) -> None:
    from gemma4vl.bridge import read_hf_config
    from gemma4vl.config.memory import GIB, architecture_dir, plan_memory
    from gemma4vl.config.parallel import ParallelSizeError
    from gemma4vl.config.validate import ConfigError, validate

    run = to_run_config(cfg)
    if run.parallel.world_size is None:
        sys.exit("parallel.world_size is not set: give the number of GPUs to plan for, e.g. parallel.world_size=8")
    world = run.parallel.world_size
    hf = read_hf_config(architecture_dir(run.model.hf_path))
    try:
        plan = plan_memory(run, hf, world, fused_adam=True)
    except ParallelSizeError as err:
        sys.exit(f"parallel.* on parallel.world_size={world} GPUs: {err}")
    fallback = plan_memory(run, hf, world, fused_adam=False)
    plan.header.append(f"optimizer: a fused Adam (Transformer Engine or Apex) is assumed; torch's AdamW would add "
                       f"{(fallback.line('optimizer step').bytes - plan.line('optimizer step').bytes) / GIB:.2f} "
                       f"GiB to the optimizer step (peak {fallback.peak_bytes / GIB:.1f} GiB)")
    print(plan.render())
    try:
        validate(run, world, hf, fused_adam=True)
    except ConfigError as err:
        print(err, file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
