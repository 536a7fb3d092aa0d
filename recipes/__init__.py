"""Entry points: ``python -m recipes.finetune`` (Hydra) and ``python -m recipes.demo`` (the CPU demo)."""
