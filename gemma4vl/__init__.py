"""gemma4vl: finetuning Gemma 4 vision-language models on Megatron-Core, with an exact Hugging Face bridge.

Importing the package installs the Transformer Engine import shim (:mod:`gemma4vl.runtime.te_shim`) when
Transformer Engine is not installed, so every later ``import megatron.bridge`` works, whichever module does it
first. The shim only answers imports made by ``megatron.bridge`` itself and is inert where TE is installed.
"""

from gemma4vl.runtime.te_shim import install as _install_te_shim

_install_te_shim()

__version__ = "0.1.0"
