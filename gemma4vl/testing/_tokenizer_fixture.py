"""Offline Gemma 4 tokenizer and processor for tests (no hub access).

The tokenizer is a real `GemmaTokenizer` (transformers' class for Gemma 4: BPE with byte fallback, spaces
normalised to "▁"), built with a small fixed vocabulary:

* ids 0-4 are `<pad> <eos> <bos> <unk> <mask>` and ids 105/106 are `<|turn>` / `<turn|>`, as in the released
  Gemma 4 vocabulary (so `eos_token_id = [1, 106]` holds here too), and "\\n" is id 107 as there;
* every other Gemma 4 control token (thinking, channel, tool, image, audio, video markers) is a special token
  at a fixture-specific id (the released ids, e.g. 258880 for `<|image|>`, do not fit a tiny vocabulary);
* the 256 byte-fallback tokens `<0x00>`..`<0xFF>`, "▁", the printable ASCII characters and a few merges
  (`user`, `model`, `system`, `thought`) make any text round-trip (except a literal "▁", which decodes as a
  space, as in the real Gemma tokenizer).

The processor is a real `Gemma4Processor`; the chat template is Gemma 4's (see `gemma4_chat_template.jinja`
and `CHAT_TEMPLATE_SOURCE`). Building a `Gemma4Processor` (and `AutoProcessor.from_pretrained`) needs
torchvision in transformers 5.23 (its video processor is a mandatory sub-processor); without it the same files
are written by hand so the tokenizer and image processor still load on their own.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from importlib import resources
from pathlib import Path

# ----------------------------------------------------------------------------------------------------------------
# Chat template

CHAT_TEMPLATE_FILE = "gemma4_chat_template.jinja"

# Where the template text came from. The hub copy (google/gemma-4-*-it, chat_template.jinja) cannot be downloaded
# here; public copies were found with the code search and cross-checked against each other:
#   * the full "mainline" template (the 12B / 26B-A4B / 31B flavour whose generation prompt, with thinking off,
#     ends in the empty thought channel `<|channel>thought\n<channel|>`), embedded verbatim as
#     `Gemma4ChatHandler.CHAT_FORMAT` in llama-cpp-python's `llama_chat_format.py`;
#   * NVIDIA's copy of the real E4B template (Megatron's `gemma4_assistant_masked_template`, same text with
#     {% generation %} markers; the E-series differs only in omitting the empty thought channel), whose blank-line
#     layout this file follows (blank lines sit between whitespace-trimming tags and render to nothing);
#   * the macros byte-checked (sha256) against mlx-community/gemma-4-26b-a4b-it-qat-4bit's served template in a
#     public Swift test (`format_parameters(..., filter_keys=false)` revision).
# Several revisions of Google's template exist (they differ in tool-call / tool-response handling, not in the
# system / user / model / image / thinking rendering that the fixtures exercise).
CHAT_TEMPLATE_SOURCE = (
    "Gemma 4 'mainline' chat_template.jinja (26B-A4B / 31B flavour), reproduced from public copies: "
    "llama-cpp-python Gemma4ChatHandler.CHAT_FORMAT, NVIDIA Megatron gemma4 template, mlx-community "
    "gemma-4-26b-a4b-it-qat-4bit macros"
)


def load_chat_template() -> str:
    """Gemma 4's chat template (Jinja source), shipped as package data next to this module."""
    return resources.files(__package__).joinpath(CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")


# ----------------------------------------------------------------------------------------------------------------
# Vocabulary

# Named special tokens: attribute name (tokenizer.<name>, tokenizer.<name>_id) -> token. The processor needs
# image/boi/eoi and audio/boa/eoa; the others mirror the rest of Gemma 4's control tokens.
NAMED_SPECIAL_TOKENS: dict[str, str] = {
    "sot_token": "<|turn>",
    "eot_token": "<turn|>",
    "think_token": "<|think|>",
    "soc_token": "<|channel>",
    "eoc_token": "<channel|>",
    "std_token": "<|tool>",
    "etd_token": "<tool|>",
    "stc_token": "<|tool_call>",
    "etc_token": "<tool_call|>",
    "str_token": "<|tool_response>",
    "etr_token": "<tool_response|>",
    "escape_token": '<|"|>',
    "boi_token": "<|image>",
    "image_token": "<|image|>",
    "eoi_token": "<image|>",
    "boa_token": "<|audio>",
    "audio_token": "<|audio|>",
    "eoa_token": "<audio|>",
}
VIDEO_TOKEN = "<|video|>"  # Gemma4Processor registers it itself (as an extra special token)

# Ids shared with the released Gemma 4 vocabulary.
_FIXED_IDS = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4, "<|turn>": 105, "<turn|>": 106, "\n": 107}
_MERGED_WORDS = ("user", "model", "system", "thought")


@dataclasses.dataclass(frozen=True)
class SpecialTokenIds:
    """Ids of the fixture tokenizer's special tokens (identical for every fixture written by this module)."""

    pad: int
    eos: int
    bos: int
    unk: int
    mask: int
    turn_start: int  # <|turn>
    turn_end: int  # <turn|>
    think: int  # <|think|>
    channel_start: int  # <|channel>
    channel_end: int  # <channel|>
    boi: int  # <|image>
    image: int  # <|image|> (soft-token placeholder)
    eoi: int  # <image|>
    boa: int  # <|audio>
    audio: int  # <|audio|>
    eoa: int  # <audio|>
    video: int  # <|video|>
    newline: int  # "\n"

    @property
    def eos_ids(self) -> list[int]:
        """Generation stops on either (Gemma 4: [1, 106])."""
        return [self.eos, self.turn_end]

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def _merges() -> list[tuple[str, str]]:
    merges = []
    for word in _MERGED_WORDS:
        for i in range(2, len(word) + 1):
            merges.append((word[: i - 1], word[i - 1]))
    return merges


def build_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The fixture vocabulary (token -> id, dense from 0) and its BPE merges; deterministic."""
    specials = list(NAMED_SPECIAL_TOKENS.values()) + [VIDEO_TOKEN]
    tokens: list[str] = [t for t in specials if t not in _FIXED_IDS]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    tokens.append("▁")
    tokens += [chr(c) for c in range(33, 127)]
    merges = _merges()
    for a, b in merges:
        if a + b not in tokens:
            tokens.append(a + b)
    vocab: dict[str, int] = dict(_FIXED_IDS)
    next_id = 0
    for tok in tokens:
        if tok in vocab:
            continue
        while next_id in vocab.values():
            next_id += 1
        vocab[tok] = next_id
        next_id += 1
    assert sorted(vocab.values()) == list(range(len(vocab))), "fixture vocabulary must be dense"
    return vocab, merges


def _ids_from_vocab(vocab: dict[str, int]) -> SpecialTokenIds:
    return SpecialTokenIds(
        pad=vocab["<pad>"],
        eos=vocab["<eos>"],
        bos=vocab["<bos>"],
        unk=vocab["<unk>"],
        mask=vocab["<mask>"],
        turn_start=vocab["<|turn>"],
        turn_end=vocab["<turn|>"],
        think=vocab["<|think|>"],
        channel_start=vocab["<|channel>"],
        channel_end=vocab["<channel|>"],
        boi=vocab["<|image>"],
        image=vocab["<|image|>"],
        eoi=vocab["<image|>"],
        boa=vocab["<|audio>"],
        audio=vocab["<|audio|>"],
        eoa=vocab["<audio|>"],
        video=vocab[VIDEO_TOKEN],
        newline=vocab["\n"],
    )


SPECIAL_TOKEN_IDS = _ids_from_vocab(build_vocab()[0])
TOKENIZER_VOCAB_SIZE = len(build_vocab()[0])


def padded_vocab_size(multiple: int = 64) -> int:
    """Model vocabulary for tiny checkpoints: the tokenizer's size rounded up to `multiple`."""
    return int(math.ceil(TOKENIZER_VOCAB_SIZE / multiple) * multiple)


def build_tokenizer(chat_template: str | None = None):
    """A `GemmaTokenizer` over the fixture vocabulary (adds `<bos>` on plain calls, like Gemma's)."""
    from transformers import GemmaTokenizer

    vocab, merges = build_vocab()
    tok = GemmaTokenizer(
        vocab=vocab,
        merges=merges,
        add_bos_token=True,
        add_eos_token=False,
        chat_template=chat_template if chat_template is not None else load_chat_template(),
        extra_special_tokens=[VIDEO_TOKEN],
        **NAMED_SPECIAL_TOKENS,
    )
    # Make every control token a real added (unsplittable, skippable) special token.
    tok.add_special_tokens({"extra_special_tokens": [VIDEO_TOKEN]}, replace_extra_special_tokens=False)
    missing = [t for t in NAMED_SPECIAL_TOKENS.values() if tok.convert_tokens_to_ids(t) != vocab[t]]
    assert not missing, f"special tokens not registered at their vocabulary ids: {missing}"
    return tok


# ----------------------------------------------------------------------------------------------------------------
# Processor

SUPPORTED_MAX_SOFT_TOKENS = (70, 140, 280, 560, 1120)  # Gemma4ImageProcessor rejects anything else


@dataclasses.dataclass(frozen=True)
class ProcessorSpec:
    patch_size: int = 4
    pooling_kernel_size: int = 2
    max_soft_tokens: int = 70

    def validate(self) -> None:
        if self.max_soft_tokens not in SUPPORTED_MAX_SOFT_TOKENS:
            raise ValueError(
                f"max_soft_tokens must be one of {SUPPORTED_MAX_SOFT_TOKENS} (Gemma4ImageProcessor's budgets), "
                f"got {self.max_soft_tokens}"
            )
        if self.patch_size < 1 or self.pooling_kernel_size < 1:
            raise ValueError(f"patch_size and pooling_kernel_size must be >= 1, got {self}")


def expected_num_soft_tokens(
    height: int, width: int, patch_size: int = 4, pooling_kernel_size: int = 2, max_soft_tokens: int = 70
) -> int:
    """Number of `<|image|>` tokens the processor emits for an image of this size (after its resize)."""
    from transformers.models.gemma4.image_processing_pil_gemma4 import get_aspect_ratio_preserving_size

    th, tw = get_aspect_ratio_preserving_size(
        height=height,
        width=width,
        patch_size=patch_size,
        max_patches=max_soft_tokens * pooling_kernel_size**2,
        pooling_kernel_size=pooling_kernel_size,
    )
    return (th // patch_size) * (tw // patch_size) // pooling_kernel_size**2


def has_torchvision() -> bool:
    from transformers.utils import is_torchvision_available

    return bool(is_torchvision_available())


def _image_processor(spec: ProcessorSpec):
    kwargs = dict(
        patch_size=spec.patch_size, pooling_kernel_size=spec.pooling_kernel_size, max_soft_tokens=spec.max_soft_tokens
    )
    if has_torchvision():
        from transformers import Gemma4ImageProcessor

        return Gemma4ImageProcessor(**kwargs)
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    return Gemma4ImageProcessorPil(**kwargs)


def build_processor(spec: ProcessorSpec = ProcessorSpec(), chat_template: str | None = None):
    """A real `Gemma4Processor` (needs torchvision: its video processor is mandatory in transformers 5.23)."""
    spec.validate()
    if not has_torchvision():
        raise ImportError(
            "Gemma4Processor needs torchvision (its Gemma4VideoProcessor is a mandatory sub-processor in "
            "transformers 5.23); install torchvision==0.28.0 (the build matching torch 2.13.0)"
        )
    from transformers import Gemma4AudioFeatureExtractor, Gemma4Processor, Gemma4VideoProcessor

    template = chat_template if chat_template is not None else load_chat_template()
    return Gemma4Processor(
        feature_extractor=Gemma4AudioFeatureExtractor(),
        image_processor=_image_processor(spec),
        tokenizer=build_tokenizer(template),
        video_processor=Gemma4VideoProcessor(
            patch_size=spec.patch_size, pooling_kernel_size=spec.pooling_kernel_size, max_soft_tokens=spec.max_soft_tokens
        ),
        chat_template=template,
        image_seq_length=spec.max_soft_tokens,
    )


def _processor_config_by_hand(spec: ProcessorSpec) -> dict:
    """What `Gemma4Processor.save_pretrained` writes to processor_config.json (used without torchvision)."""
    from transformers import Gemma4AudioFeatureExtractor

    fe = json.loads(Gemma4AudioFeatureExtractor().to_json_string())
    fe.pop("processor_class", None)
    ip = json.loads(_image_processor(spec).to_json_string())
    ip.pop("processor_class", None)
    ip["image_processor_type"] = "Gemma4ImageProcessor"
    common = dict(
        do_convert_rgb=True,
        do_rescale=True,
        do_resize=True,
        image_mean=[0.0, 0.0, 0.0],
        image_std=[1.0, 1.0, 1.0],
        max_soft_tokens=spec.max_soft_tokens,
        patch_size=spec.patch_size,
        pooling_kernel_size=spec.pooling_kernel_size,
        resample=3,
        rescale_factor=1 / 255,
    )
    vp = dict(common, do_normalize=True, do_sample_frames=True, num_frames=32, return_metadata=False)
    vp["video_processor_type"] = "Gemma4VideoProcessor"
    return {
        "audio_ms_per_token": 40,
        "audio_seq_length": 750,
        "feature_extractor": fe,
        "image_processor": ip,
        "image_seq_length": spec.max_soft_tokens,
        "processor_class": "Gemma4Processor",
        "video_processor": vp,
    }


@dataclasses.dataclass
class ProcessorInfo:
    path: Path
    files: list[str]
    spec: ProcessorSpec
    token_ids: SpecialTokenIds
    tokenizer_vocab_size: int
    loadable_with_auto_processor: bool  # False only when torchvision is missing


def write_tokenizer_and_processor(
    out_dir: str | os.PathLike,
    *,
    patch_size: int = 4,
    pooling_kernel_size: int = 2,
    max_soft_tokens: int = 70,
    chat_template: str | None = None,
) -> ProcessorInfo:
    """Write the offline tokenizer + `Gemma4Processor` files into `out_dir` (created if needed).

    `AutoTokenizer.from_pretrained(out_dir)` and `AutoProcessor.from_pretrained(out_dir)` then work offline. The
    image budget is `max_soft_tokens` (one of 70/140/280/560/1120): an image becomes `<|image>` + N x `<|image|>` +
    `<image|>` with N = `expected_num_soft_tokens(h, w, patch_size, pooling_kernel_size, max_soft_tokens)`.
    """
    spec = ProcessorSpec(patch_size, pooling_kernel_size, max_soft_tokens)
    spec.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    template = chat_template if chat_template is not None else load_chat_template()
    if has_torchvision():
        build_processor(spec, template).save_pretrained(out)
        loadable = True
    else:
        tok = build_tokenizer(template)
        tok.add_special_tokens({"extra_special_tokens": [VIDEO_TOKEN]})  # as Gemma4Processor.__init__ does
        tok._set_processor_class("Gemma4Processor")
        tok.save_pretrained(out)
        (out / "processor_config.json").write_text(
            json.dumps(_processor_config_by_hand(spec), indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
        loadable = False
    # A single template file (transformers >= 5 writes chat_template.jinja); keep none in tokenizer_config.json.
    (out / "chat_template.jinja").write_text(template, encoding="utf-8")
    files = sorted(f for f in _PROCESSOR_FILES if (out / f).is_file())
    return ProcessorInfo(
        path=out,
        files=files,
        spec=spec,
        token_ids=SPECIAL_TOKEN_IDS,
        tokenizer_vocab_size=TOKENIZER_VOCAB_SIZE,
        loadable_with_auto_processor=loadable,
    )


_PROCESSOR_FILES = {
    "tokenizer.json",
    "tokenizer_config.json",
    "processor_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
}
