"""Megatron-Bridge's view of the data config: ``ConfigContainer.dataset = Gemma4VLDatasetConfig(...)``.

Megatron-Bridge calls :meth:`build_datasets` with the run's sample counts and wraps the returned map-style datasets
in its samplers (``dataloader_type="single"``: sequential, sharded by data-parallel rank, resumed from
``consumed_samples``) and a ``DataLoader`` that uses each dataset's ``collate_fn``. The batches are the keyword
inputs of :class:`gemma4vl.models.Gemma4VLModel` (see :mod:`gemma4vl.data.collate`).

Importing this module imports ``megatron.bridge`` (through the Transformer Engine import shim).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from gemma4vl.data.config import Gemma4VLDataConfig
from gemma4vl.runtime.te_shim import install as _install_te_shim

_install_te_shim()

from megatron.bridge.data.base import DatasetProvider  # noqa: E402


@dataclasses.dataclass(kw_only=True)
class Gemma4VLDatasetConfig(Gemma4VLDataConfig, DatasetProvider):
    """:class:`~gemma4vl.data.config.Gemma4VLDataConfig` as a Megatron-Bridge ``DatasetProvider`` (its dataloader
    fields: ``dataloader_type``, ``num_workers``, ``data_sharding``, ``pin_memory``, ``drop_last``,
    ``persistent_workers``, ``trust_remote_code``, ``dataloader_save``, ``dataloader_load``)."""

    dataloader_type: Literal["single", "cyclic", "batch", "external"] | None = "single"
    """Megatron sampler: "single" walks the dataset in order (the dataset itself shuffles, per epoch, seeded),
    sharded by data-parallel rank and resumable from ``consumed_samples``."""
    num_workers: int = 2
    """DataLoader worker processes (decoding and encoding run there)."""
    pin_memory: bool = False
    """Pin batches in host memory (worth it on GPU runs)."""

    def __post_init__(self) -> None:
        Gemma4VLDataConfig.__post_init__(self)
        if self.dataloader_type not in ("single", "cyclic", "batch", "external", None):
            raise ValueError("dataset.dataloader_type must be single/cyclic/batch/external, "
                             f"got {self.dataloader_type!r}")

    def build_datasets(self, context):
        """(train, validation, None) for Megatron-Bridge; ``context`` is a ``DatasetBuildContext``."""
        return Gemma4VLDataConfig.build_datasets(self, context)
