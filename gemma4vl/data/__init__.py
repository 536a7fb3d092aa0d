"""Multimodal SFT data for Gemma 4: sources -> conversations -> tokens with the real processor -> packed rows ->
the model's batches.

Pipeline (one module each):

- :mod:`~gemma4vl.data.sources`: a local file / directory / ``save_to_disk`` directory / hub name through
  ``datasets``, read row by row from memory-mapped Arrow (memory does not grow with the dataset);
- :mod:`~gemma4vl.data.formats`: ``messages`` / ``llava`` / ``sharegpt`` rows -> :class:`Conversation`;
- :mod:`~gemma4vl.data.images`: images refused before allocation or out-of-root reads, patchified bit-exactly as
  ``Gemma4ImageProcessor`` does;
- :mod:`~gemma4vl.data.encoding`: the processor's chat template, the empty thought channel, loss only on answers
  (and their ``<turn|>``), image token expansion, length policies;
- :mod:`~gemma4vl.data.plan`: the cached length pass and deterministic packing plan;
- :mod:`~gemma4vl.data.dataset` / :mod:`~gemma4vl.data.collate`: training rows, collated into
  :class:`~gemma4vl.data.batch.Batch` (the one batch type: model inputs, ``.to``, ``from_prompt``);
- :mod:`~gemma4vl.data.config`: :class:`Gemma4VLDataConfig`, the ``data`` group's schema: every key, its default,
  its allowed values and a docstring per field (``conf/data/*.yaml`` hold exactly these keys); Megatron-Bridge gets
  it through :class:`gemma4vl.config.data_provider.Gemma4VLDatasetProvider`;
- :mod:`~gemma4vl.data.demo`: the synthetic VQA demo set (``python -m gemma4vl.data.demo --out DIR``).

The package imports neither Megatron nor Transformer Engine (``tests/test_batch.py`` checks).

Python::

    from gemma4vl.data import Gemma4VLDataConfig
    cfg = Gemma4VLDataConfig(processor_path=ckpt, path="data/", validation_split="validation", seq_length=1024)
    train = cfg.build_split("train", num_samples=1000)       # item i: one packed row
    batch = train.collate_fn([train[0], train[1]])           # a Batch
    loss = model(**batch.model_kwargs())                      # Gemma4VLModel -> per-token loss [b, s]
"""

from gemma4vl.data.batch import Batch, RowReport
from gemma4vl.data.collate import Collator, assemble_row
from gemma4vl.data.config import Gemma4VLDataConfig, load_processor
from gemma4vl.data.dataset import Gemma4VLSFTDataset, RowPipeline
from gemma4vl.data.encoding import ConversationEncoder, Encoded
from gemma4vl.data.errors import REASONS, BadRowError
from gemma4vl.data.formats import Conversation, parse_row, resolve_spec
from gemma4vl.data.images import ImageLoader, ImageSettings, image_settings, to_pixel_values
from gemma4vl.data.plan import PackingPlan, build_plan, pack
from gemma4vl.data.sources import RowReader, Source, load_source

__all__ = [
    "REASONS",
    "Batch",
    "BadRowError",
    "Collator",
    "Conversation",
    "ConversationEncoder",
    "Encoded",
    "Gemma4VLDataConfig",
    "Gemma4VLSFTDataset",
    "ImageLoader",
    "ImageSettings",
    "PackingPlan",
    "RowPipeline",
    "RowReader",
    "RowReport",
    "Source",
    "assemble_row",
    "build_plan",
    "image_settings",
    "load_processor",
    "load_source",
    "pack",
    "parse_row",
    "to_pixel_values",
    "resolve_spec",
]
