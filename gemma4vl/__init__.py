"""gemma4vl: finetuning Gemma 4 vision-language models on Megatron-Core, with an exact Hugging Face bridge.

Importing the package installs the Transformer Engine import shim (:mod:`gemma4vl.runtime.te_shim`) when
Transformer Engine is not installed, so every later ``import megatron.bridge`` works, whichever module does it
first. The shim only answers imports made by ``megatron.bridge`` itself and is inert where TE is installed. It also
attaches the filters of :mod:`gemma4vl.runtime.log_noise` (Megatron output hidden unless
``logger.megatron_details``).
"""

from gemma4vl.runtime.log_noise import install as _install_log_filters
from gemma4vl.runtime.te_shim import install as _install_te_shim

_install_te_shim()
_install_log_filters()  # Megatron-Bridge's import-probe traceback and the DDP bucket listing (see log_noise)

__version__ = "0.1.0"
