"""`python -m gemma4vl.runtime.check_env`: verifies the installed environment (run at the end of `make env`)."""

import sys


def main() -> int:
    import torch

    from gemma4vl.runtime import import_megatron_bridge

    import_megatron_bridge()
    import megatron.core
    import transformers
    from transformers import Gemma4ForConditionalGeneration  # noqa: F401

    print(
        f"gemma4vl env ok: python {sys.version.split()[0]}, torch {torch.__version__} "
        f"(cuda available: {torch.cuda.is_available()}), megatron-core {megatron.core.__version__}, "
        f"transformers {transformers.__version__}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
