"""Loss mask and chat format: only answers and their ``<turn|>`` carry labels (token by token against the decoded
template), the empty thought channel per policy, thinking mode, system prompts, and the length policies (never
cutting inside an image)."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoProcessor

from gemma4vl.data import BadRowError, ConversationEncoder, ImageLoader, image_settings, parse_row
from gemma4vl.data.collate import shifted_labels
from gemma4vl.data.formats import resolve_spec
from gemma4vl.labels import IGNORE_INDEX
from test_data_support import A1, A2, Q1, Q2, SYSTEM, config, images, processor_dir, reference_messages, write_jsonl

__all__ = ["processor_dir"]
CHANNEL = "<|channel>thought\n<channel|>"


@pytest.fixture(scope="module")
def processor(processor_dir):
    return AutoProcessor.from_pretrained(processor_dir)


def encode(processor, messages, *, max_length=None, overlong="drop", system_prompt=None, **kwargs):
    enc = ConversationEncoder(processor, image_settings(processor), **kwargs)
    conv = parse_row({"messages": messages}, "messages", resolve_spec("messages"), system_prompt=system_prompt)
    return enc.encode(conv, loader=ImageLoader(None, max_pixels=10**7, max_bytes=10**7), max_length=max_length,
                      overlong=overlong)


def collapse_images(text: str) -> str:
    while "<|image|><|image|>" in text:
        text = text.replace("<|image|><|image|>", "<|image|>")
    return text


def labelled_text(processor, enc) -> str:
    labels = shifted_labels(enc)
    return processor.tokenizer.decode(labels[labels != IGNORE_INDEX])


def test_loss_mask_token_by_token(processor):
    enc = encode(processor, reference_messages())
    tok = processor.tokenizer
    pieces = [tok.decode([int(t)]) for t in enc.input_ids]
    text = "".join(pieces)
    assert collapse_images(text) == (
        f"<bos><|turn>system\n{SYSTEM}<turn|>\n"
        f"<|turn>user\n<|image><|image|><image|>{Q1}<turn|>\n<|turn>model\n{CHANNEL}{A1}<turn|>\n"
        f"<|turn>user\n<|image><|image|><image|>{Q2}<turn|>\n<|turn>model\n{CHANNEL}{A2}<turn|>\n")
    # Walk the decoded tokens: a target starts right after "<|turn>model\n<|channel>thought\n<channel|>" and runs
    # through the next "<turn|>"; everything else (system, user, images, headers, channel, the "\n") is prompt.
    expected, inside, seen = [], False, ""
    for piece in pieces:
        if inside:
            expected.append(True)
            inside = piece != "<turn|>"
        else:
            expected.append(False)
            seen += piece
            inside = seen.endswith("<|turn>model\n" + CHANNEL)
    assert enc.target.tolist() == expected
    labels = shifted_labels(enc)
    for t in range(len(enc) - 1):
        assert labels[t] == (enc.input_ids[t + 1] if expected[t + 1] else IGNORE_INDEX), t
    assert labels[-1] == IGNORE_INDEX
    assert labelled_text(processor, enc) == f"{A1}<turn|>{A2}<turn|>"
    assert int(np.count_nonzero(labels != IGNORE_INDEX)) == len(tok(A1 + A2, add_special_tokens=False)["input_ids"]) + 2


def test_thought_prefix_policies_match_inference_prompts(processor):
    msgs = reference_messages()
    tok = processor.tokenizer
    ids = {p: encode(processor, msgs, thought_prefix=p).input_ids for p in ("every_turn", "last_turn", "none")}
    text = {p: tok.decode(v) for p, v in ids.items()}
    assert text["every_turn"].count(CHANNEL) == 2
    assert text["last_turn"].count(CHANNEL) == 1 and text["none"].count(CHANNEL) == 0
    imgs = [m["content"][0]["image"] for m in msgs if m["role"] == "user"]

    def prompt_ids(messages, n_images):
        rendered = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        out = processor(text=[rendered], images=[imgs[:n_images]], add_special_tokens=False)
        return out["input_ids"][0]

    # "last_turn": everything before the final answer is exactly the inference prompt for it.
    p = prompt_ids(msgs[:-1], 2)
    assert ids["last_turn"][: len(p)].tolist() == list(p)
    # "every_turn": each answer follows exactly its own inference prompt's ending (the first one entirely).
    p1 = prompt_ids(msgs[:2], 1)
    assert ids["every_turn"][: len(p1)].tolist() == list(p1)
    # "none": the template's own rendering of the whole conversation.
    full = processor.apply_chat_template(msgs, tokenize=False)
    assert ids["none"].tolist() == processor(text=[full], images=[imgs], add_special_tokens=False)["input_ids"][0]
    for p in ("every_turn", "last_turn", "none"):
        assert labelled_text(processor, encode(processor, msgs, thought_prefix=p)) == f"{A1}<turn|>{A2}<turn|>"


def test_train_on_last_turn_only(processor):
    enc = encode(processor, reference_messages(), train_on="last_assistant_turn")
    assert labelled_text(processor, enc) == f"{A2}<turn|>"


def test_thinking_mode_trains_reasoning(processor):
    msgs = reference_messages()
    msgs[2] = {"role": "assistant", "content": A1, "reasoning_content": "Green covers most pixels."}
    enc = encode(processor, msgs, enable_thinking=True)
    text = collapse_images(processor.tokenizer.decode(enc.input_ids))
    assert text.startswith(f"<bos><|turn>system\n<|think|>\n{SYSTEM}<turn|>\n")
    assert f"<|turn>model\n<|channel>thought\nGreen covers most pixels.\n<channel|>{A1}<turn|>\n" in text
    assert f"<|turn>model\n{A2}<turn|>\n" in text  # no empty channel when thinking is on
    assert labelled_text(processor, enc) == (
        f"<|channel>thought\nGreen covers most pixels.\n<channel|>{A1}<turn|>{A2}<turn|>")


def test_system_prompt_added_only_when_missing(processor):
    user_only = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    text = processor.tokenizer.decode(encode(processor, user_only, system_prompt="Be terse.").input_ids)
    assert text.startswith("<bos><|turn>system\nBe terse.<turn|>\n<|turn>user\nHi<turn|>\n")
    text = processor.tokenizer.decode(encode(processor, reference_messages(), system_prompt="Be terse.").input_ids)
    assert "Be terse." not in text and SYSTEM in text


def test_literal_image_token_in_text_is_refused(processor):
    msgs = [{"role": "user", "content": "look: <|image|>"}, {"role": "assistant", "content": "ok"}]
    with pytest.raises(BadRowError, match="image_count_mismatch"):
        encode(processor, msgs)


# ---------------------------------------------------------------------------------------------- length policies

def _lengths(processor):
    full = encode(processor, reference_messages())
    first = encode(processor, reference_messages()[:3])
    return len(full), len(first), full


def test_overlong_drop(processor):
    n, _, _ = _lengths(processor)
    with pytest.raises(BadRowError, match=f"too_long: {n} tokens > seq_length {n - 1}"):
        encode(processor, reference_messages(), max_length=n - 1, overlong="drop")


def test_overlong_truncate_turns_keeps_whole_turns(processor):
    n, n_first, _ = _lengths(processor)
    enc = encode(processor, reference_messages(), max_length=n - 1, overlong="truncate_turns")
    assert (len(enc), enc.num_images, len(enc.images), enc.truncation) == (n_first, 1, 1, 3)
    assert labelled_text(processor, enc) == f"{A1}<turn|>"
    with pytest.raises(BadRowError, match="too_long"):
        encode(processor, reference_messages(), max_length=n_first - 1, overlong="truncate_turns")


def test_overlong_truncate_tokens_never_cuts_an_image(processor):
    n, n_first, full = _lengths(processor)
    boi = int(processor.tokenizer.convert_tokens_to_ids("<|image>"))
    second_image = int(np.flatnonzero(full.input_ids == boi)[1])
    cut = second_image + 10  # inside the second image's tokens
    enc = encode(processor, reference_messages(), max_length=cut, overlong="truncate_tokens")
    assert len(enc) == second_image and enc.num_images == 1 and len(enc.images) == 1
    assert int(np.count_nonzero(enc.input_ids == processor.tokenizer.image_token_id)) == 63
    assert labelled_text(processor, enc) == f"{A1}<turn|>"


def test_length_policies_are_counted_in_the_plan(processor_dir, tmp_path):
    row = {"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"},
                                                     {"type": "text", "text": Q1}]},
                        {"role": "assistant", "content": A1},
                        {"role": "user", "content": "x" * 120}, {"role": "assistant", "content": A2}]}
    short = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo."}]}
    images()[0].save(tmp_path / "a.png")
    path = write_jsonl(tmp_path / "d.jsonl", [row, short, row])
    plans = {}
    for policy in ("drop", "truncate_turns", "truncate_tokens"):
        cfg = config(processor_dir, path, seq_length=160, overlong=policy, cache_dir=str(tmp_path / policy))
        ds = cfg.build_split("train")
        plans[policy] = ds.plan
        for i in range(len(ds)):
            item = ds[i]
            assert item["input_ids"].shape[0] <= 160
            assert int(item["mm_token_type_ids"].sum()) == sum(gh * gw // 4 for _, (gh, gw) in item["images"])
    assert plans["drop"].skipped() == {"too_long": 2} and plans["drop"].truncated_rows == 0
    assert plans["truncate_turns"].skipped() == {} and plans["truncate_turns"].truncated_rows == 2
    assert plans["truncate_tokens"].skipped() == {} and plans["truncate_tokens"].truncated_rows == 2
    assert plans["truncate_tokens"].lengths.tolist()[0] == 160


def test_prompt_for_evaluation_is_the_inference_prompt(processor):
    """encode_prompt: everything before the last answer + the generation prompt, and the reference answer."""
    enc = ConversationEncoder(processor, image_settings(processor))
    msgs = reference_messages()
    conv = parse_row({"messages": msgs}, "messages", resolve_spec("messages"))
    ids, imgs, answer = enc.encode_prompt(conv, ImageLoader(None, max_pixels=10**7, max_bytes=10**7))
    rendered = processor.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
    ref = processor(text=[rendered], images=[[msgs[1]["content"][0]["image"], msgs[3]["content"][0]["image"]]],
                    add_special_tokens=False)
    assert ids.tolist() == ref["input_ids"][0] and answer == A2 and len(imgs) == 2
    assert processor.tokenizer.decode(ids).endswith("<|turn>model\n" + CHANNEL)
