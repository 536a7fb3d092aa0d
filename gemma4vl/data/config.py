"""The data group's schema (:class:`Gemma4VLDataConfig`, the one definition of every ``data.*`` key and its allowed
values) and how it builds the training / validation datasets.

The Hydra config's ``data`` group is this dataclass (:class:`gemma4vl.config.schema.RunConfig`); Megatron-Bridge
receives it wrapped in :class:`gemma4vl.config.data_provider.Gemma4VLDatasetProvider` (its ``DatasetProvider``).
This module does not import Megatron, so the pipeline, its tests and benchmarks do not need it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
from pathlib import Path
from typing import Any

from gemma4vl.data.collate import Collator
from gemma4vl.data.dataset import Gemma4VLSFTDataset, RowPipeline
from gemma4vl.data.encoding import OVERLONG, THOUGHT_PREFIXES, TRAIN_ON, ConversationEncoder
from gemma4vl.data.errors import LENGTH_REASONS
from gemma4vl.data.formats import FORMATS, resolve_spec
from gemma4vl.data.images import SUPPORTED_MAX_SOFT_TOKENS, ImageLoader, image_settings
from gemma4vl.data.plan import PackingPlan, build_plan, plan_key
from gemma4vl.data.sources import RowReader, load_source

logger = logging.getLogger("gemma4vl.data")
SPLITS = ("train", "validation")
DATALOADER_TYPES = ("single", "cyclic")
"""Megatron-Bridge samplers that serve our map-style datasets (its "batch" sampler expects GPT-style ``tokens``
batches and "external" brings its own loader, so neither applies)."""


@functools.lru_cache(maxsize=4)
def load_processor(path: str):
    """``AutoProcessor.from_pretrained(path)``, once per process; must be a Gemma 4 processor."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(path)
    if type(processor).__name__ != "Gemma4Processor":
        raise ValueError(f"{path} holds a {type(processor).__name__}, expected a Gemma4Processor")
    return processor


def processor_fingerprint(processor, settings) -> str:
    h = hashlib.sha256()
    h.update(processor.chat_template.encode())
    h.update(processor.tokenizer.backend_tokenizer.to_str().encode())
    h.update(repr(dataclasses.astuple(settings)).encode())
    return h.hexdigest()[:16]


_LOADER_FIELDS = ("dataloader_type", "num_workers", "data_sharding", "pin_memory", "drop_last", "persistent_workers",
                  "trust_remote_code", "dataloader_save", "dataloader_load")
"""The fields below that Megatron-Bridge's ``DataloaderConfig`` also has (they do not change the packing plan)."""


@dataclasses.dataclass(kw_only=True)
class Gemma4VLDataConfig:
    """Gemma 4 VL SFT data: the ``data`` group of the run config (``conf/data/*.yaml`` hold exactly these keys) and
    the pipeline's own configuration (see :mod:`gemma4vl.data` for the pipeline). The last group of fields are
    Megatron-Bridge's ``DataloaderConfig`` fields, handed to it by
    :class:`gemma4vl.config.data_provider.Gemma4VLDatasetProvider`."""

    processor_path: str | None = None
    """Directory (or hub name) of the Gemma 4 processor: tokenizer, chat template, image processor. Usually the
    HF checkpoint being finetuned. Required."""
    path: str | None = None
    """Training data: a .json/.jsonl/.parquet/.arrow file, a directory of them (splits from file names), a
    ``save_to_disk`` directory, or a hub dataset name. Required."""
    split: str = "train"
    """Split of ``path`` used for training. Hub datasets also take ``datasets`` split slicing, e.g.
    ``train[:90%]`` (training) with ``validation_split: train[90%:]``."""
    subset: str | None = None
    """Hub datasets: the subset (``datasets`` calls it the configuration, ``load_dataset(path, name=subset)``);
    None: the repository's default. Setting it (or ``revision``) reads ``path`` as a hub repository, also when it
    is a local directory laid out as one (a README.md whose YAML header lists ``configs``)."""
    revision: str | None = None
    """Hub datasets: the git revision (branch, tag or commit) of the dataset repository; None: the default
    branch. Pin a commit for a reproducible run."""
    streaming: bool = False
    """Refused (an error saying why): the packing plan measures every row's length before training, so the data
    is materialised into the Arrow cache (``cache_dir``) anyway; leave it false."""
    validation_path: str | None = None
    """Validation data (same kinds as ``path``); None: ``path`` itself."""
    validation_split: str | None = None
    """Split used for validation; None: no validation set."""
    format: str = "messages"
    """Row format: "messages" (HF chat with content parts), "llava" (conversations/from/value + image column) or
    "sharegpt" (conversations + images + system columns)."""
    messages_column: str | None = None
    """Column with the conversation; None: the format's ("messages" or "conversations")."""
    images_column: str | None = None
    """Column with the images (a list, or one value); None: the format's ("images", llava: "image")."""
    system_column: str | None = None
    """Column with a per-row system prompt; None: the format's (sharegpt: "system", else none)."""
    role_map: dict[str, str] | None = None
    """Source role -> "system" / "user" / "assistant"; None: the format's defaults (e.g. human->user, gpt->assistant).
    Rows with other roles are bad rows ("unknown_role")."""
    image_placeholder: str = "<image>"
    """Marker in string contents that stands for the next image of the images column ("" disables)."""
    image_root: str | None = None
    """Directory that relative image paths resolve against and that no image path may leave; None: the dataset
    file's directory (hub datasets: none)."""
    system_prompt: str | None = None
    """System prompt added to conversations that have none; None: add nothing."""
    enable_thinking: bool = False
    """Render with Gemma 4 thinking on (``<|think|>`` in the system turn; assistant ``reasoning_content`` becomes a
    trained thought channel)."""
    thought_prefix: str = "every_turn"
    """Where the empty thought channel ``<|channel>thought\\n<channel|>`` (not trained) goes before answers when
    thinking is off: "every_turn", "last_turn" or "none"."""
    train_on: str = "all_assistant_turns"
    """Which answers carry loss: "all_assistant_turns" or "last_assistant_turn"."""
    max_soft_tokens: int | None = None
    """Image budget in soft tokens (70, 140, 280, 560, 1120); None: the processor's."""
    seq_length: int = 4096
    """Tokens per training row (sequence length)."""
    overlong: str = "truncate_turns"
    """Rows longer than ``seq_length``: "drop", "truncate_turns" (drop trailing whole turns, keep >= 1 answer),
    "truncate_tokens" (cut tokens, never inside an image) or "error" (raise naming the row). Counted in the plan
    summary."""
    packing: bool = True
    """Pack several conversations into each row (attention and positions stay per conversation)."""
    packing_window: int = 1000
    """Rows considered together when packing (larger: fuller rows, less shuffling across the epoch)."""
    pad_to_seq_length: bool = True
    """Pad batches to ``seq_length`` (fixed shapes); False: to the longest row rounded to ``pad_to_multiple_of``."""
    pad_to_multiple_of: int = 64
    """Rounding of padded lengths when ``pad_to_seq_length`` is False."""
    shuffle: bool = True
    """Shuffle rows before packing and the rows' order every epoch (seeded)."""
    seed: int = 1234
    """Seed of all shuffling (same order on every rank and resume)."""
    bad_rows: str = "error"
    """Bad rows (missing / corrupt image, empty conversation, no answer, unknown role, image count mismatch, hostile
    image): "error" (raise naming dataset, row, reason) or "skip" (count, log the first few, summarise)."""
    max_skipped_fraction: float = 0.1
    """With "skip": fail if more than this fraction of rows is bad (guards against a wrong format / column)."""
    bad_row_log_limit: int = 10
    """How many bad rows are logged one by one."""
    max_image_pixels: int = 40_000_000
    """Images whose header claims more pixels are refused before decoding."""
    max_image_bytes: int = 64 * 2**20
    """Image files / byte strings larger than this are refused before reading."""
    verify_images: bool = False
    """Decode every image during the length pass (slower; no image can then fail during training)."""
    max_train_rows: int | None = None
    """Use only the first N training rows; None: all."""
    max_validation_rows: int | None = None
    """Use only the first N validation rows; None: all."""
    cache_dir: str | None = None
    """Where packing plans (and the ``datasets`` Arrow cache) go; None: ``.gemma4vl_cache`` next to local data,
    the ``datasets`` cache for hub data."""
    plan_num_proc: int = 1
    """Processes for the length pass (computed once per data / settings, then cached)."""
    demo_dir: str | None = None
    """Where the recipe writes the synthetic demo VQA set (:mod:`gemma4vl.data.demo`) when ``path`` is this
    directory and it does not exist yet (a fresh directory, written whole or not at all). None: never. The demo
    group sets ``path: ${data.demo_dir}``; any other ``path`` is read as it is (an error when missing)."""

    # Megatron-Bridge's DataloaderConfig fields (megatron.bridge.data.base.DataloaderConfig).
    dataloader_type: str = "single"
    """Megatron sampler (:data:`DATALOADER_TYPES`): ``single`` walks the dataset in order (the dataset itself
    shuffles, per epoch, seeded), sharded by data-parallel rank and resumable from ``consumed_samples``;
    ``cyclic`` draws a random order per epoch."""
    num_workers: int = 2
    """DataLoader worker processes (decoding and encoding run there); 0: in the training process."""
    data_sharding: bool = True
    """Shard the data over data-parallel ranks."""
    pin_memory: bool = False
    """Pin batches in host memory (worth it on GPUs)."""
    drop_last: bool = True
    """Drop the last incomplete batch."""
    persistent_workers: bool = True
    """Keep DataLoader workers alive between epochs (off when ``num_workers`` is 0)."""
    trust_remote_code: bool | None = None
    """Trust remote code of a hub dataset."""
    dataloader_save: str | None = None
    """Megatron-Bridge dataloader-state directory (Energon only; unused here)."""
    dataloader_load: str | None = None
    """Megatron-Bridge dataloader-state directory to load (Energon only; unused here)."""

    def __post_init__(self) -> None:
        choices = {"format": FORMATS, "thought_prefix": THOUGHT_PREFIXES, "train_on": TRAIN_ON,
                   "overlong": OVERLONG, "bad_rows": ("error", "skip"), "dataloader_type": DATALOADER_TYPES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"data.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.max_soft_tokens is not None and self.max_soft_tokens not in SUPPORTED_MAX_SOFT_TOKENS:
            raise ValueError(f"data.max_soft_tokens must be one of {SUPPORTED_MAX_SOFT_TOKENS} or None, "
                             f"got {self.max_soft_tokens}")
        for name in ("seq_length", "packing_window", "pad_to_multiple_of", "max_image_pixels", "max_image_bytes",
                     "plan_num_proc", "bad_row_log_limit"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        if int(self.num_workers) < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if not 0.0 <= self.max_skipped_fraction <= 1.0:
            raise ValueError(f"data.max_skipped_fraction must be in [0, 1], got {self.max_skipped_fraction}")
        resolve_spec(self.format, self.messages_column, self.images_column, self.system_column, self.role_map)

    # ------------------------------------------------------------------------------------------------ building
    def _require(self, name: str) -> str:
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"data.{name} is required")
        return value

    def pipeline(self, which: str = "train") -> tuple[RowPipeline, Any]:
        """The row pipeline of a split and its source (no plan yet)."""
        if which not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {which!r}")
        if self.streaming:
            raise ValueError("data.streaming=true is not supported: the packing plan measures every row's length "
                             "before training, so the dataset is materialised into the Arrow cache (data.cache_dir) "
                             "anyway; set data.streaming=false (subset / revision / split slicing work without it)")
        processor = load_processor(self._require("processor_path"))
        settings = image_settings(processor, self.max_soft_tokens)
        if which == "train":
            source = load_source(self._require("path"), self.split, image_root=self.image_root,
                                 cache_dir=self.cache_dir, max_rows=self.max_train_rows, bad_rows=self.bad_rows,
                                 subset=self.subset, revision=self.revision)
        else:
            source = load_source(self.validation_path or self._require("path"), self.validation_split,
                                 image_root=self.image_root, cache_dir=self.cache_dir,
                                 max_rows=self.max_validation_rows, bad_rows=self.bad_rows,
                                 subset=None if self.validation_path else self.subset,
                                 revision=None if self.validation_path else self.revision)
        spec = resolve_spec(self.format, self.messages_column, self.images_column, self.system_column, self.role_map)
        columns = [c for c in (spec.messages_column, spec.images_column, spec.system_column) if c]
        encoder = ConversationEncoder(processor, settings, enable_thinking=self.enable_thinking,
                                      thought_prefix=self.thought_prefix, train_on=self.train_on)
        loader = ImageLoader(source.image_root, max_pixels=self.max_image_pixels, max_bytes=self.max_image_bytes)
        rows = RowPipeline(RowReader(source.dataset, columns), source.name, self.format, spec, encoder, loader,
                           self.seq_length, self.overlong, self.image_placeholder, self.system_prompt,
                           self.verify_images)
        return rows, source

    def plan_path(self, source, processor_settings_fp: str) -> Path:
        if self.cache_dir is not None:
            base = Path(self.cache_dir).expanduser()
        elif source.local_dir is not None:
            base = Path(source.local_dir) / ".gemma4vl_cache"
        else:
            import datasets

            base = Path(datasets.config.HF_DATASETS_CACHE) / "gemma4vl_plans"
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(Gemma4VLDataConfig)}
        for irrelevant in ("processor_path", "path", "validation_path", "cache_dir", "plan_num_proc",
                           "pad_to_seq_length", "pad_to_multiple_of", "bad_row_log_limit", "demo_dir",
                           *_LOADER_FIELDS):
            fields.pop(irrelevant)
        key = plan_key({"source": source.fingerprint, "processor": processor_settings_fp, "config": fields})
        try:
            base.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"cannot create the plan cache directory {base} ({e}); set data.cache_dir") from e
        return base / f"plan-{key}.npz"

    def build_split(self, which: str = "train", num_samples: int = 0) -> Gemma4VLSFTDataset:
        """The dataset of ``which`` ("train" / "validation"), long enough for ``num_samples`` rows (whole epochs).

        The packing plan is loaded from the cache or computed (by rank 0 first when torch.distributed is up; the
        other ranks then read it, or compute the identical plan if the cache directory is not shared)."""
        import torch.distributed as dist

        rows, source = self.pipeline(which)
        processor = load_processor(self.processor_path)
        path = self.plan_path(source, processor_fingerprint(processor, rows.encoder.settings))
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if distributed and dist.get_rank() != 0:
            dist.barrier()
        if path.is_file():
            plan = PackingPlan.load(path)
            logger.info("%s (cached plan %s)", plan.summary(source.name), path)
        else:
            plan = build_plan(rows.measure, len(source), name=source.name, seq_length=self.seq_length,
                              packing=self.packing, packing_window=self.packing_window, shuffle=self.shuffle,
                              seed=self.seed, policy=self.bad_rows, log_limit=self.bad_row_log_limit,
                              max_skipped_fraction=self.max_skipped_fraction, num_proc=self.plan_num_proc)
            plan.save(path)
        if distributed and dist.get_rank() == 0:
            dist.barrier()
        self._check_skipped(source, plan)
        collator = Collator(rows.encoder.settings, rows.encoder.pad_id, self.seq_length, self.pad_to_seq_length,
                            self.pad_to_multiple_of)
        return Gemma4VLSFTDataset(rows, plan, collator, num_samples=num_samples, shuffle=self.shuffle,
                                  seed=self.seed + (0 if which == "train" else 1), bad_rows=self.bad_rows,
                                  log_limit=self.bad_row_log_limit)

    def _check_skipped(self, source, plan: PackingPlan) -> None:
        """Lines that were not JSON rows count with the plan's bad rows towards ``max_skipped_fraction``."""
        lines = source.skipped_lines
        if not lines:
            return
        for line in lines[: self.bad_row_log_limit]:
            logger.warning("skipping a line that is not a JSON row: %s", line)
        bad = len(lines) + sum(n for reason, n in plan.skipped().items() if reason not in LENGTH_REASONS)
        total = len(lines) + plan.num_rows
        if bad / total > self.max_skipped_fraction:
            raise ValueError(f"{source.name}: {bad} of {total} rows are bad ({len(lines)} lines not JSON rows, "
                             f"first {lines[0]}): more than data.max_skipped_fraction={self.max_skipped_fraction}")

    def build_datasets(self, context) -> tuple[Gemma4VLSFTDataset, Gemma4VLSFTDataset | None, None]:
        """(train, validation or None, None) sized for ``context.train_samples`` / ``context.valid_samples``."""
        train = self.build_split("train", int(getattr(context, "train_samples", 0) or 0))
        valid = None
        if self.validation_split is not None:
            valid = self.build_split("validation", int(getattr(context, "valid_samples", 0) or 0))
        return train, valid, None
