"""The data group as Megatron-Bridge's dataset provider: ``ConfigContainer.dataset``.

Megatron-Bridge calls :meth:`Gemma4VLDatasetProvider.build_datasets` with the run's sample counts and wraps the
returned map-style datasets in its samplers (``dataloader_type="single"``: sequential, sharded by data-parallel
rank, resumed from ``consumed_samples``) and a ``DataLoader`` that uses each dataset's ``collate_fn``, whose
:class:`~gemma4vl.data.batch.Batch` reaches our forward step untouched.

The adapter holds the data group's schema (:class:`gemma4vl.data.config.Gemma4VLDataConfig`, where every key and
its allowed values are defined) and copies its ``DataloaderConfig`` fields and ``seq_length`` into the provider's
own, which is how Megatron-Bridge reads them. Living in ``config/``, it keeps Megatron out of :mod:`gemma4vl.data`.
"""

from __future__ import annotations

import dataclasses

from gemma4vl.data.config import Gemma4VLDataConfig
from gemma4vl.runtime import import_megatron_bridge

import_megatron_bridge()

from megatron.bridge.data.base import DataloaderConfig, DatasetProvider  # noqa: E402


@dataclasses.dataclass(kw_only=True)
class Gemma4VLDatasetProvider(DatasetProvider):
    """:class:`~gemma4vl.data.config.Gemma4VLDataConfig` as a Megatron-Bridge ``DatasetProvider``; build it with
    :meth:`from_config` (the dataloader fields are the data config's)."""

    data: Gemma4VLDataConfig
    """The data group; builds the datasets."""

    seq_length: int
    """``data.seq_length``, copied: Megatron-Bridge's training log reads ``ConfigContainer.dataset.seq_length``
    (tokens per step for its throughput figures)."""

    @classmethod
    def from_config(cls, data: Gemma4VLDataConfig) -> Gemma4VLDatasetProvider:
        """The provider of ``data``: its ``DataloaderConfig`` fields (``dataloader_type``, ``num_workers``, ...)
        copied, the rest read from ``data`` when the datasets are built."""
        loader = {f.name: getattr(data, f.name) for f in dataclasses.fields(DataloaderConfig)}
        return cls(data=data, seq_length=data.seq_length, **loader)

    def build_datasets(self, context):
        """(train, validation or None, None) for Megatron-Bridge; ``context`` is a ``DatasetBuildContext``."""
        return self.data.build_datasets(context)
