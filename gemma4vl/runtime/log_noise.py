"""Megatron-Bridge / Megatron-Core output a gemma4vl run hides by default, one logger or call site at a time
(never by filtering all warnings: our WARNINGs, e.g. bad rows skipped, must stay visible):

- the traceback of Megatron-Bridge's optional-import probe (``megatron.bridge.utils.import_utils``: "Import of
  FP8GlobalStateManager from megatron.core.extensions.transformer_engine failed with: Traceback ...", logged at
  import time where Transformer Engine is absent);
- the DDP bucket parameter listing (``megatron.core.distributed.param_and_grad_buffer``: one record "Number of
  buckets ...: 1\nParams for bucket 1 (... elements ...):" followed by every parameter name; its first line is
  kept);
- Megatron-Bridge's own per-iteration line (``training_log``'s ``print_rank_last``), which duplicates our progress
  line (:class:`gemma4vl.training.callbacks.ProgressCallback`): sent to the DEBUG level of logger
  ``megatron.bridge.training.utils.train_utils`` instead of stdout.

``logger.megatron_details=true`` shows all three again (:func:`show_megatron_details`). Records at WARNING or above
are never hidden.
"""

from __future__ import annotations

import logging

# logger name -> message prefixes hidden below WARNING: a record starting with one is dropped; a record holding one
# at the start of a later line is cut before that line
NOISY = {
    "megatron.bridge.utils.import_utils": ("Import of ",),
    "megatron.core.distributed.param_and_grad_buffer": ("Params for bucket ",),
}
ITERATION_LOGGER = "megatron.bridge.training.utils.train_utils"


class _HideNoise(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes
        self.enabled = True

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.enabled or record.levelno >= logging.WARNING:
            return True
        message = str(record.msg)
        if message.startswith(self.prefixes):
            return False
        for prefix in self.prefixes:
            cut = message.find("\n" + prefix)
            if cut >= 0:
                record.msg, record.args = message[:cut], ()
                message = record.msg
        return True


_FILTERS: dict[str, _HideNoise] = {}


def install() -> None:
    """Attach the filters to their loggers (idempotent; done when :mod:`gemma4vl` is imported, before Megatron-Bridge
    runs its import probe)."""
    for name, prefixes in NOISY.items():
        if name not in _FILTERS:
            _FILTERS[name] = _HideNoise(prefixes)
            logging.getLogger(name).addFilter(_FILTERS[name])


def _iteration_line_to_debug(message: str) -> None:
    logging.getLogger(ITERATION_LOGGER).debug(message.strip())


def show_megatron_details(show: bool) -> None:
    """Show (True) or hide (False, the default) the output listed in the module docstring."""
    from megatron.bridge.training.utils import train_utils
    from megatron.bridge.utils.common_utils import print_rank_last

    install()
    for f in _FILTERS.values():
        f.enabled = not show
    # training_log calls the name print_rank_last of train_utils only for its per-iteration line.
    train_utils.print_rank_last = print_rank_last if show else _iteration_line_to_debug
