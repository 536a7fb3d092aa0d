"""gemma4vl: finetuning Gemma 4 vision-language models on Megatron-Core, with an exact Hugging Face bridge."""

__version__ = "0.1.0"
