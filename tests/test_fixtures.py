"""Tests of the tiny random Gemma 4 VL fixtures (gemma4vl/testing): checkpoints, tokenizer, processor, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from gemma4vl.testing import fixtures as fx
from gemma4vl.testing.pytest_fixtures import tiny_checkpoint, tiny_ckpt, tiny_ckpt_dir  # noqa: F401

TOK = fx.SPECIAL_TOKEN_IDS
needs_torchvision = pytest.mark.skipif(
    not fx.has_torchvision(), reason="Gemma4Processor needs torchvision (mandatory video sub-processor)"
)


def _load_model(path, dtype):
    from transformers import Gemma4ForConditionalGeneration

    model, info = Gemma4ForConditionalGeneration.from_pretrained(path, dtype=dtype, output_loading_info=True)
    return model.eval(), info


def _weights(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="session")
def processor(tiny_ckpt_dir):  # noqa: F811
    if not fx.has_torchvision():
        pytest.skip("Gemma4Processor needs torchvision")
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_ckpt_dir)


@pytest.fixture(scope="session")
def chat_inputs(processor):
    return processor.apply_chat_template(fx.tiny_chat(), tokenize=True, return_dict=True, return_tensors="pt")


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints


@pytest.mark.parametrize("layout", fx.LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_checkpoint_loads_with_from_pretrained(tmp_path_factory, layout, dtype):
    info = tiny_checkpoint(tmp_path_factory, layout, dtype)
    model, loading = _load_model(info.path, dtype)
    assert not loading["missing_keys"] and not loading["unexpected_keys"] and not loading["mismatched_keys"]
    assert model.dtype == dtype
    # The file contents are exactly what the model holds (lm_head tied to the embeddings).
    state = model.state_dict()
    files = _weights(info.path)
    assert set(files) == set(state) - {"lm_head.weight"}
    for name, t in files.items():
        assert t.dtype == dtype, name
        assert torch.equal(state[name], t), name
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    assert info.num_parameters == sum(t.numel() for t in files.values())

    # The 26B-A4B shape in miniature, whichever config layout it was read from.
    text = model.config.text_config
    assert text.layer_types == ["sliding_attention", "full_attention"] * 2
    assert text.attention_k_eq_v and text.enable_moe_block and not text.hidden_size_per_layer_input
    assert (text.num_experts, text.top_k_experts, text.moe_intermediate_size) == (4, 2, 32)
    assert text.final_logit_softcapping == 30.0 and text.use_bidirectional_attention == "vision"
    assert text.vocab_size == 448 and text.vocab_size >= fx.TOKENIZER_VOCAB_SIZE
    layers = model.model.language_model.layers
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        if text.layer_types[i] == "full_attention":
            assert (attn.head_dim, attn.k_proj.out_features, attn.v_proj) == (32, 64, None)
        else:
            assert (attn.head_dim, attn.k_proj.out_features, attn.v_proj.out_features) == (16, 64, 64)
    assert model.config.vision_config.rope_parameters["rope_type"] == "axial"
    assert model.config.image_token_id == TOK.image and model.config.boi_token_id == TOK.boi

    raw = json.loads((info.path / "config.json").read_text())
    if layout == "released":
        assert raw["text_config"]["global_head_dim"] == 32 and raw["text_config"]["num_global_key_value_heads"] == 2
        assert "per_layer_config" not in raw["text_config"]
        assert raw["vision_config"]["rope_parameters"]["rope_type"] == "default"
    else:
        assert raw["text_config"]["per_layer_config"] == {
            "1": {"head_dim": 32, "num_key_value_heads": 2},
            "3": {"head_dim": 32, "num_key_value_heads": 2},
        }
        assert "global_head_dim" not in raw["text_config"]
        assert raw["vision_config"]["rope_parameters"]["rope_type"] == "axial"


def test_per_layer_config_layout_is_what_save_pretrained_writes(tmp_path_factory, tmp_path):
    info = tiny_checkpoint(tmp_path_factory, "per_layer_config", "float32")
    model, _ = _load_model(info.path, torch.float32)
    model.config.save_pretrained(tmp_path)
    ours = json.loads((info.path / "config.json").read_text())
    theirs = json.loads((tmp_path / "config.json").read_text())
    assert ours == theirs


@needs_torchvision
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_both_layouts_give_identical_models_and_logits(tmp_path_factory, chat_inputs, dtype):
    a, _ = _load_model(tiny_checkpoint(tmp_path_factory, "released", dtype).path, dtype)
    b, _ = _load_model(tiny_checkpoint(tmp_path_factory, "per_layer_config", dtype).path, dtype)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    with torch.no_grad():
        la, lb = a(**chat_inputs).logits, b(**chat_inputs).logits
    assert torch.isfinite(la).all()
    torch.testing.assert_close(la, lb, rtol=0, atol=0)


def test_bfloat16_checkpoint_is_the_float32_one_rounded(tmp_path_factory):
    f32 = _weights(tiny_checkpoint(tmp_path_factory, "released", "float32").path)
    bf16 = _weights(tiny_checkpoint(tmp_path_factory, "released", "bfloat16").path)
    assert f32.keys() == bf16.keys()
    for k in f32:
        assert torch.equal(f32[k].to(torch.bfloat16), bf16[k]), k


def test_sharded_index_covers_every_tensor_once(tmp_path_factory):
    one = tiny_checkpoint(tmp_path_factory, "released", "float32")
    sharded = tiny_checkpoint(tmp_path_factory, "released", "float32", max_shard_size="200KB")
    assert sharded.sharded and not one.sharded
    index = json.loads((sharded.path / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    shard_files = sorted(sharded.path.glob("model-*-of-*.safetensors"))
    assert len(shard_files) > 1 and not (sharded.path / "model.safetensors").exists()
    assert sorted(set(weight_map.values())) == [f.name for f in shard_files]
    seen: dict[str, str] = {}
    total = 0
    for f in shard_files:
        with safe_open(f, "pt") as sf:
            names = list(sf.keys())
            assert sf.metadata() == {"format": "pt"}
            size = 0
            for n in names:
                t = sf.get_tensor(n)
                size += t.numel() * t.element_size()
        assert size <= 200_000 or len(names) == 1, f"{f.name}: {size} bytes in {len(names)} tensors"
        total += size
        for n in names:
            assert n not in seen, f"{n} in {seen[n]} and {f.name}"
            seen[n] = f.name
    assert seen == weight_map
    assert index["metadata"]["total_size"] == total == sharded.weights_bytes
    assert index["metadata"]["total_parameters"] == sharded.num_parameters
    # Same seed, same tensors, whatever the sharding; and the sharded directory loads.
    w1, w2 = _weights(one.path), _weights(sharded.path)
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    model, loading = _load_model(sharded.path, torch.float32)
    assert not loading["missing_keys"] and not loading["unexpected_keys"]


def test_seed_determines_the_weights(tmp_path_factory, tmp_path):
    base = _weights(tiny_checkpoint(tmp_path_factory, "released", "float32").path)
    again = _weights(fx.write_checkpoint(tmp_path / "same", with_processor=False).path)
    other = _weights(fx.write_checkpoint(tmp_path / "other", seed=1, with_processor=False).path)
    assert all(torch.equal(base[k], again[k]) for k in base)
    assert not torch.equal(base["model.language_model.norm.weight"], other["model.language_model.norm.weight"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_norm_scale_and_layer_scalar_differs_from_one(tmp_path_factory, dtype):
    from transformers import Gemma4ForConditionalGeneration

    info = tiny_checkpoint(tmp_path_factory, "released", dtype)
    weights = _weights(info.path)
    # Which tensors a default (HF) init sets to all-ones: exactly the ones the fixture must randomise.
    torch.manual_seed(0)
    reference = Gemma4ForConditionalGeneration(info.config).state_dict()
    ones = {k for k, v in reference.items() if k in weights and torch.all(v == 1)}
    scale_like = {k for k in weights if _is_scale_like(k)}
    assert ones == scale_like | {"model.vision_tower.patch_embedder.position_embedding_table"}
    # per decoder layer: 7 norms (input, post-attention, pre/post-feedforward, _1, _2, pre_2) + q/k norm + router
    # scale + per-expert scale + layer_scalar = 12; final norm; per vision layer: 4 norms + q/k norm = 6; std_scale.
    assert len(scale_like) == 4 * 12 + 1 + 2 * 6 + 1
    for k in sorted(ones):
        assert (weights[k] != 1).all(), k
    by_kind: dict[str, list[torch.Tensor]] = {}
    for k, v in weights.items():
        by_kind.setdefault(_kind(k), []).append(v.float())
    for kind in ("norm", "router_scale", "per_expert_scale", "std_scale"):
        v = torch.cat([t.flatten() for t in by_kind[kind]])
        assert v.min() >= 0.5 and v.max() <= 1.5 and ((v - 1).abs() >= 0.04).all(), kind
    qk = torch.cat([t.flatten() for t in by_kind["qk_norm"]])
    assert qk.min() >= 0.29 and qk.max() <= 0.76
    assert len(by_kind["qk_norm"]) == 2 * 4 + 2 * 2  # text q/k per layer + vision q/k per layer
    scalars = [float(t) for t in by_kind["layer_scalar"]]
    assert len(scalars) == 4 and len(set(scalars)) == 4 and all(abs(s - 1) > 0.04 for s in scalars)
    assert (weights["model.vision_tower.std_bias"] != 0).all()


def _kind(name: str) -> str:
    from gemma4vl.testing._checkpoint_fixture import init_kind

    return init_kind(name)


def _is_scale_like(name: str) -> bool:
    return _kind(name) in {"norm", "qk_norm", "router_scale", "per_expert_scale", "std_scale", "layer_scalar"}


def test_k_eq_v_off_adds_v_proj(tmp_path):
    info = fx.write_checkpoint(tmp_path / "ckpt", attention_k_eq_v=False, with_processor=False)
    model, loading = _load_model(info.path, torch.float32)
    assert not loading["missing_keys"] and not loading["unexpected_keys"]
    assert model.model.language_model.layers[1].self_attn.v_proj is not None
    raw = json.loads((info.path / "config.json").read_text())
    assert raw["text_config"]["attention_k_eq_v"] is False


def test_refuses_to_overwrite_a_checkpoint(tmp_path):
    fx.write_checkpoint(tmp_path, with_processor=False)
    with pytest.raises(FileExistsError, match="already holds checkpoint files"):
        fx.write_checkpoint(tmp_path, with_processor=False)
    fx.write_checkpoint(tmp_path, with_processor=False, max_shard_size="300KB", overwrite=True)
    assert not (tmp_path / "model.safetensors").exists()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(variant="huge"), "unknown variant"),
        (dict(layout="flat"), "unknown layout"),
        (dict(dtype="float16"), "unsupported dtype"),
        (dict(max_shard_size="lots"), "max_shard_size='lots': expected bytes or a size"),
        (dict(num_layers=1), "num_layers must be >= 2"),
        (dict(max_soft_tokens=64), "max_soft_tokens must be one of"),
    ],
)
def test_bad_arguments_raise_clear_errors(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fx.write_checkpoint(tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer, chat template, processor


def test_tokenizer_round_trips_text_and_special_ids(tiny_ckpt_dir):  # noqa: F811
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_ckpt_dir)
    assert type(tok).__name__ == "GemmaTokenizer" and len(tok) == fx.TOKENIZER_VOCAB_SIZE
    texts = [
        "Hello, world!",
        "  leading and  double spaces, trailing \n",
        "tabs\tand\r\nnewlines\n\n",
        "unicode: naïve café 日本語 🙂👍🏽 ∑x²",
        "control tokens: <|turn>user\nhi<turn|>\n<|image><|image|><image|> <|think|><|channel>thought\n<channel|>",
        "",
    ]
    for text in texts:
        ids = tok(text, add_special_tokens=False).input_ids
        assert tok.decode(ids) == text
        assert tok(text).input_ids == [TOK.bos] + ids  # Gemma adds <bos> on plain calls
    named = {
        "<pad>": TOK.pad, "<eos>": TOK.eos, "<bos>": TOK.bos, "<unk>": TOK.unk, "<mask>": TOK.mask,
        "<|turn>": TOK.turn_start, "<turn|>": TOK.turn_end, "<|think|>": TOK.think,
        "<|channel>": TOK.channel_start, "<channel|>": TOK.channel_end, "<|image>": TOK.boi,
        "<|image|>": TOK.image, "<image|>": TOK.eoi, "<|audio>": TOK.boa, "<|audio|>": TOK.audio,
        "<audio|>": TOK.eoa, "<|video|>": TOK.video, "\n": TOK.newline,
    }  # fmt: skip
    assert {t: tok.convert_tokens_to_ids(t) for t in named} == named
    assert (TOK.pad, TOK.eos, TOK.bos, TOK.turn_start, TOK.turn_end, TOK.newline) == (0, 1, 2, 105, 106, 107)
    assert tok.image_token_id == TOK.image and tok.boi_token == "<|image>" and tok.eot_token_id == TOK.turn_end
    assert tok("<|turn>user\n", add_special_tokens=False).input_ids == [TOK.turn_start, tok.convert_tokens_to_ids("user"), TOK.newline]
    assert tok.decode([TOK.bos, TOK.image, TOK.turn_end] + tok("ok", add_special_tokens=False).input_ids,
                      skip_special_tokens=True) == "ok"


CONVERSATION = [
    {"role": "system", "content": "You are a careful assistant."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "<|channel>thought\nadd them<channel|>4"},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6"},
]
RENDERED = (
    "<bos><|turn>system\nYou are a careful assistant.<turn|>\n"
    "<|turn>user\nWhat is 2+2?<turn|>\n"
    "<|turn>model\n4<turn|>\n"
    "<|turn>user\nAnd 3+3?<turn|>\n"
    "<|turn>model\n6<turn|>\n"
)


def test_chat_template_renders_gemma4_turns(tiny_ckpt_dir):  # noqa: F811
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_ckpt_dir)
    assert tok.chat_template == fx.load_chat_template() == (tiny_ckpt_dir / "chat_template.jinja").read_text()
    render = tok.apply_chat_template
    assert render(CONVERSATION, tokenize=False) == RENDERED
    prompt = CONVERSATION[:-1]
    assert render(prompt, tokenize=False, add_generation_prompt=True) == (
        "<bos><|turn>system\nYou are a careful assistant.<turn|>\n"
        "<|turn>user\nWhat is 2+2?<turn|>\n"
        "<|turn>model\n4<turn|>\n"
        "<|turn>user\nAnd 3+3?<turn|>\n"
        "<|turn>model\n<|channel>thought\n<channel|>"
    )
    assert render(prompt, tokenize=False, add_generation_prompt=True, enable_thinking=True) == (
        "<bos><|turn>system\n<|think|>\nYou are a careful assistant.<turn|>\n"
        "<|turn>user\nWhat is 2+2?<turn|>\n"
        "<|turn>model\n4<turn|>\n"
        "<|turn>user\nAnd 3+3?<turn|>\n"
        "<|turn>model\n"
    )
    assert render([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True) == (
        "<bos><|turn>user\nHi<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
    )
    ids = render(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    assert ids == tok(RENDERED, add_special_tokens=False).input_ids and ids.count(TOK.bos) == 1


@needs_torchvision
def test_processor_expands_one_image_to_the_budget(processor, chat_inputs):
    assert type(processor).__name__ == "Gemma4Processor"
    assert type(processor.image_processor).__name__ == "Gemma4ImageProcessor"
    text = processor.apply_chat_template(fx.tiny_chat(), tokenize=False)
    assert text == (
        "<bos><|turn>system\nYou are a helpful assistant.<turn|>\n"
        "<|turn>user\n<|image|>What is in this image?<turn|>\n"
        "<|turn>model\nA colourful test pattern.<turn|>\n"
    )
    n = fx.expected_num_soft_tokens(64, 64, patch_size=4, pooling_kernel_size=2, max_soft_tokens=70)
    assert n == 64
    ids = chat_inputs["input_ids"][0].tolist()
    assert ids.count(TOK.image) == n and ids.count(TOK.boi) == 1 and ids.count(TOK.eoi) == 1
    start = ids.index(TOK.boi)
    assert ids[start : start + n + 2] == [TOK.boi] + [TOK.image] * n + [TOK.eoi]
    assert ids[0] == TOK.bos and ids.count(TOK.bos) == 1
    mm = chat_inputs["mm_token_type_ids"][0]
    assert torch.equal(mm == 1, chat_inputs["input_ids"][0] == TOK.image)
    # Patchified pixels padded to the budget's patch count: 70 * 2**2 = 280 patches of 4*4*3 values.
    assert chat_inputs["pixel_values"].shape == (1, 280, 48)
    pos = chat_inputs["image_position_ids"]
    assert pos.shape == (1, 280, 2) and pos.dtype == torch.long
    valid = (pos[0] >= 0).all(-1)
    assert valid.sum() == n * 4 and (pos[0][~valid] == -1).all()
    assert pos[0, :16, 0].tolist() == list(range(16)) and pos[0, 16].tolist() == [0, 1]  # (x=col, y=row)


@needs_torchvision
def test_hf_forward_on_processor_output(tiny_ckpt_dir, chat_inputs):  # noqa: F811
    model, _ = _load_model(tiny_ckpt_dir, torch.float32)
    with torch.no_grad():
        logits = model(**chat_inputs).logits
    seq = chat_inputs["input_ids"].shape[1]
    assert logits.shape == (1, seq, 448) and torch.isfinite(logits).all()
    assert logits.abs().max() <= 30.0  # final logit softcapping
    # The image matters: other pixels, other logits after the image.
    other = dict(chat_inputs, pixel_values=torch.rand_like(chat_inputs["pixel_values"]))
    with torch.no_grad():
        assert not torch.allclose(model(**other).logits, logits)


@needs_torchvision
@pytest.mark.parametrize("size, budget", [((80, 48), 70), ((40, 40), 140), ((100, 30), 70)])
def test_processor_budget_and_aspect_ratio(tmp_path, size, budget):
    from transformers import AutoProcessor

    fx.write_tokenizer_and_processor(tmp_path, patch_size=4, pooling_kernel_size=2, max_soft_tokens=budget)
    proc = AutoProcessor.from_pretrained(tmp_path)
    out = proc.apply_chat_template(fx.tiny_chat(size=size, system=None, answer=None), tokenize=True,
                                   return_dict=True, add_generation_prompt=True, return_tensors="pt")
    n = fx.expected_num_soft_tokens(size[1], size[0], 4, 2, budget)
    assert 0 < n <= budget
    assert out["input_ids"][0].tolist().count(TOK.image) == n
    assert out["pixel_values"].shape == (1, budget * 4, 48)
    thought = proc.tokenizer.convert_tokens_to_ids("thought")
    assert out["input_ids"][0, -4:].tolist() == [TOK.channel_start, thought, TOK.newline, TOK.channel_end]


def test_processor_files_without_torchvision_match(tmp_path):
    """Without torchvision the same files are written by hand; tokenizer and image processor still load."""
    script = (
        "import sys; sys.modules['torchvision'] = None\n"
        "from gemma4vl.testing.fixtures import write_tokenizer_and_processor, has_torchvision\n"
        "assert not has_torchvision()\n"
        f"info = write_tokenizer_and_processor({str(tmp_path / 'plain')!r})\n"
        "assert not info.loadable_with_auto_processor\n"
        "from transformers import AutoTokenizer, AutoImageProcessor\n"
        f"tok = AutoTokenizer.from_pretrained({str(tmp_path / 'plain')!r})\n"
        f"ip = AutoImageProcessor.from_pretrained({str(tmp_path / 'plain')!r})\n"
        "assert (ip.patch_size, ip.pooling_kernel_size, ip.max_soft_tokens) == (4, 2, 70), ip\n"
        "assert tok.image_token_id == 16\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=Path(__file__).resolve().parents[1])
    if not fx.has_torchvision():
        return
    fx.write_tokenizer_and_processor(tmp_path / "full")
    for name in ("processor_config.json", "tokenizer_config.json", "tokenizer.json"):
        a = json.loads((tmp_path / "plain" / name).read_text())
        b = json.loads((tmp_path / "full" / name).read_text())
        assert a == b, name
    assert (tmp_path / "plain" / "chat_template.jinja").read_text() == (tmp_path / "full" / "chat_template.jinja").read_text()


def test_make_image_and_tiny_chat_are_deterministic():
    a, b, c = fx.make_image(3), fx.make_image(3), fx.make_image(4)
    assert a.size == (64, 64) and a.mode == "RGB" and a.tobytes() == b.tobytes() != c.tobytes()
    assert fx.make_image(0, (80, 48)).size == (80, 48)
    msgs = fx.tiny_chat(seed=3)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant"]
    assert [c["type"] for c in msgs[1]["content"]] == ["image", "text"]
    assert msgs[1]["content"][0]["image"].tobytes() == a.tobytes()


# ----------------------------------------------------------------------------------------------------------------
# CLI


def test_cli_writes_and_reports(tmp_path, capsys):
    out = tmp_path / "cli"
    rc = fx.main(["--variant", "tiny-moe", "--out", str(out), "--layout", "per_layer_config", "--dtype", "bfloat16",
                  "--max-shard-size", "300KB", "--seed", "3", "--num-layers", "6"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "parameters:" in printed and "model.safetensors.index.json" in printed and "config.json" in printed
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16" and cfg["text_config"]["num_hidden_layers"] == 6
    assert set(cfg["text_config"]["per_layer_config"]) == {"1", "3", "5"}
    # A second write into the same directory is refused with a readable message.
    assert fx.main(["--out", str(out)]) == 2
    assert "already holds checkpoint files" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--variant", "big", "--out", "x"], "invalid choice: 'big'"),
        (["--out", "x", "--dtype", "int8"], "invalid choice: 'int8'"),
        (["--out", "x", "--max-shard-size", "12 parsecs"], "max_shard_size='12 parsecs': expected bytes or a size"),
        (["--out", "x", "--num-layers", "1"], "--num-layers must be >= 2"),
        (["--variant", "tiny-moe"], "the following arguments are required: --out"),
    ],
)
def test_cli_rejects_bad_arguments(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        fx.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# Real widths (about 4.9 GB of bfloat16 weights)


@pytest.mark.slow
def test_real_width_checkpoint(tmp_path):
    t0 = time.perf_counter()
    info = fx.write_checkpoint(tmp_path / "real", variant="real-width")
    seconds = time.perf_counter() - t0
    assert info.dtype == torch.bfloat16 and info.sharded
    assert 4.5e9 < info.weights_bytes < 5.5e9, info.weights_bytes
    index = json.loads((info.path / "model.safetensors.index.json").read_text())
    for f in set(index["weight_map"].values()):
        with safe_open(info.path / f, "pt") as sf:
            assert (info.path / f).stat().st_size <= 1e9 + 1e6 or len(list(sf.keys())) == 1, f
    text = info.config.text_config
    sliding, full = text.per_layer_config[0], text.per_layer_config[1]  # text.head_dim is ambiguous in 5.23
    assert (text.hidden_size, text.num_attention_heads) == (2816, 16)
    assert (sliding.head_dim, sliding.num_key_value_heads, full.head_dim, full.num_key_value_heads) == (256, 8, 512, 2)
    assert (text.num_experts, text.top_k_experts, text.moe_intermediate_size, text.intermediate_size) == (128, 8, 704, 2112)
    assert text.vocab_size == 262144 and text.layer_types == ["sliding_attention", "full_attention"]

    model, loading = _load_model(info.path, torch.bfloat16)
    assert not loading["missing_keys"] and not loading["unexpected_keys"] and not loading["mismatched_keys"]
    full = model.model.language_model.layers[1].self_attn
    assert (full.head_dim, full.k_proj.out_features, full.v_proj) == (512, 1024, None)
    assert model.config.vision_config.hidden_size == 1152 and model.config.vision_config.num_hidden_layers == 2
    for name, p in model.state_dict().items():
        if name != "lm_head.weight" and _is_scale_like(name):
            assert (p != 1).all(), name
    ids = torch.tensor([[TOK.bos, TOK.turn_start, 50, 60, 70, TOK.turn_end, TOK.newline, TOK.turn_start]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, 8, 262144) and torch.isfinite(logits.float()).all()
    print(f"real-width fixture: {info.weights_bytes / 1e9:.2f} GB, {info.num_parameters:,} parameters, "
          f"written in {seconds:.1f} s")
