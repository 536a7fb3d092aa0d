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
- :mod:`~gemma4vl.data.dataset` / :mod:`~gemma4vl.data.collate`: training rows and batches;
- :mod:`~gemma4vl.data.config` / :mod:`~gemma4vl.data.provider`: the config, and the Megatron-Bridge
  ``DatasetProvider`` (``Gemma4VLDatasetConfig``);
- :mod:`~gemma4vl.data.demo`: the synthetic VQA demo set (``python -m gemma4vl.data.demo --out DIR``).

Configuration (``conf/data/*.yaml`` hold exactly these keys; each field is documented on the dataclass):

=====================  ===================  =====================================================================
field                  default              meaning
=====================  ===================  =====================================================================
processor_path         (required)           Gemma 4 processor directory / hub name (usually the checkpoint)
path                   (required)           training data: file, directory, save_to_disk dir or hub name
split                  "train"              split of ``path`` used for training (hub: slicing like ``train[:90%]``)
subset                 None (repo default)  hub dataset subset (``load_dataset(path, name=subset)``)
revision               None (default br.)   hub dataset git revision (branch / tag / commit)
streaming              False                refused: the packing plan measures every row first
validation_path        None (= path)        validation data
validation_split       None (no valid.)     split used for validation
format                 "messages"           "messages" | "llava" | "sharegpt"
messages_column        None (format's)      conversation column
images_column          None (format's)      images column
system_column          None (format's)      per-row system prompt column
role_map               None (format's)      source role -> system / user / assistant
image_placeholder      "<image>"            marker for "next image" in string contents
image_root             None (data dir)      where relative image paths resolve; no path may leave it
system_prompt          None                 system prompt for conversations without one
enable_thinking        False                Gemma 4 thinking mode (``<|think|>``; reasoning_content trained)
thought_prefix         "every_turn"         empty thought channel before answers: every_turn | last_turn | none
train_on               "all_assistant_turns"  or "last_assistant_turn"
max_soft_tokens        None (processor's)   image budget: 70 | 140 | 280 | 560 | 1120
seq_length             4096                 tokens per training row
overlong               "truncate_turns"     "drop" | "truncate_turns" | "truncate_tokens" (never inside an image) | "error"
packing                True                 pack conversations into rows
packing_window         1000                 rows packed together (best-fit decreasing)
pad_to_seq_length      True                 fixed [b, seq_length] batches
pad_to_multiple_of     64                   else pad to the longest row rounded to this
shuffle / seed         True / 1234          seeded shuffling before packing and per epoch
bad_rows               "error"              "error" (raise with dataset, row, reason) | "skip" (count, log, summary)
max_skipped_fraction   0.1                  "skip" fails when more rows than this are bad
bad_row_log_limit      10                   bad rows logged one by one
max_image_pixels       40_000_000           larger image headers are refused before decoding
max_image_bytes        64 MiB               larger image files / bytes are refused before reading
verify_images          False                decode every image in the length pass
max_train_rows         None                 first N training rows only
max_validation_rows    None                 first N validation rows only
cache_dir              None                 packing plans (+ datasets cache); default ``.gemma4vl_cache`` by the data
plan_num_proc          1                    processes for the length pass
dataloader_type ...    "single", 2 workers  Megatron-Bridge ``DataloaderConfig`` fields (provider only)
=====================  ===================  =====================================================================

Python::

    from gemma4vl.data import Gemma4VLDataConfig
    cfg = Gemma4VLDataConfig(processor_path=ckpt, path="data/", validation_split="validation", seq_length=1024)
    train = cfg.build_split("train", num_samples=1000)       # item i: one packed row
    batch = train.collate_fn([train[0], train[1]])           # Gemma4VLModel(**batch) -> per-token loss
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
