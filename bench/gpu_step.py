"""GPU step benchmark: attention kernels, a real-width training step, transformers side by side, GPU-vs-reference.

    python bench/gpu_step.py [--sections a,b,c,d] [--seq 8192] [--steps 5] [--json OUT]   # one H100 / H200
    python bench/gpu_step.py --dry-run [--json OUT]                                      # CPU, toy sizes (CI)

Sections (each catches its own failure, so one broken section still leaves the others' rows in the table):

(a) attention microbench, per 26B-A4B layer type (sliding: head_dim 256, 8 KV heads, window 1024; full: head_dim
    512, 2 KV heads; 16 query heads), forward+backward on one packed row of ``--seq`` tokens (samples and 280-token
    images as in (b)): FlexAttention with our block masks (``flex``, the training kernel, with FLEX_KERNEL_OPTIONS)
    against SDPA with the dense masks it needs (``dense``, the reference kernel: K/V repeated, bool mask), plus for
    the full layer SDPA's plain causal kernel without any mask (what SDPA does when there is no packing: a bound,
    not a usable kernel) and torch's own flex tile choice at head_dim 512 (to check FLEX_KERNEL_OPTIONS). Also the
    time to build each type's masks.
(b) real-width proxy training step: our Megatron model with 26B-A4B widths (hidden 2816, 16 heads, 128 experts
    top-8, vocab 262144), 4 decoder layers (3 sliding + 1 full, the 5:1 pattern's tail), a 2-layer vision tower,
    bf16, random init, on packed ``--seq``-token rows with 280-token images; forward, backward and an SGD update
    per step (Adam's state would not fit beside transformers' copy and is not what is measured here). Attention
    kernel: per layer type the faster of flex and dense in (a) (``--kernel`` forces one). Reports
    tokens/s, model TFLOP/s by F = 6N + 3A(S) per token (N: active parameters, A: attention FLOPs per token, both
    defined in :func:`active_params` / :func:`attention_flops_per_token`) and peak memory.
(c) transformers' ``Gemma4ForConditionalGeneration`` with the same config (same layers, sdpa attention, its default
    experts implementation) on the same batch and GPU, same step; the ratio ours / transformers.
(d) numerics on a small input: our model with 26B-A4B's head shapes (head_dim 256 / 512, 8 / 2 KV heads, 16 heads)
    at a small width, packed rows with images: the flex kernel vs the dense reference kernel, same weights, max
    |logit diff| and gradient agreement (worst per-tensor max |grad diff| / max |grad|, and the cosine of all
    gradients), fp32 with TF32 off (and flex in bf16 with ``--numerics-bf16``). Both on the GPU: a process runs
    Megatron on one device, and the dense kernel is the same code the CPU runs. (The bf16 kernel's agreement at 8k
    is in (a): max |flex - dense| of the forward outputs.)

``--dry-run`` runs every section on CPU at toy size (FlexAttention's eager CPU forward; no flex backward on CPU,
so (a) and (d) compare forwards only and (b) trains with the dense kernel) so CI proves the script works. The
script prints progress (and every table row as it is measured) with flush, then one table; ``--json`` also writes
the rows and per-section results, rewritten after every section (``"complete": false`` until the end), so a run killed
by an outer time limit still leaves what it measured. Sections not started by ``--deadline-s`` (default 360 s) are
skipped, so the table still prints inside 8 minutes. Exit status 1 if any section failed.

``bench/gpu_check.sh`` runs this script after the ``gpu``-marked attention tests, inside one 8-minute budget.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SECTIONS = ("a", "b", "c", "d")
GIB = 1024**3
_T0 = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f}s] {message}", flush=True)


# ----------------------------------------------------------------------------------------------- model FLOPs
def active_params(text: dict) -> int:
    """N: parameters a token's forward multiplies with, from a released-layout ``text_config`` dict: per layer the
    q/k/v/o projections of its type (no v on K=V full layers), the dense MLP (3 matrices), top_k of the experts
    (3 matrices each) and the router; plus the (tied) embedding once, as the output projection. Norm weights are
    left out (0.02% at 26B-A4B). 26B-A4B: 3,821,830,144."""
    h, heads = text["hidden_size"], text["num_attention_heads"]
    per_type = {}
    for layer_type, (d, kv, k_eq_v) in {
        "sliding_attention": (text["head_dim"], text["num_key_value_heads"], False),
        "full_attention": (text["global_head_dim"], text["num_global_key_value_heads"] or text["num_key_value_heads"],
                           text["attention_k_eq_v"]),
    }.items():
        attention = h * heads * d + h * kv * d * (1 if k_eq_v else 2) + heads * d * h
        mlp = 3 * h * text["intermediate_size"]
        experts = text["top_k_experts"] * 3 * h * text["moe_intermediate_size"]
        router = text["num_experts"] * h
        per_type[layer_type] = attention + mlp + experts + router
    return sum(per_type[t] for t in text["layer_types"]) + text["vocab_size"] * h


def attention_flops_per_token(text: dict, seq: int) -> float:
    """A(S): forward attention FLOPs per token on a row of ``seq`` tokens, 4 * heads * head_dim * (mean keys per
    query) per layer (q k^T and p v, 2 FLOPs a multiply-add): full layers causal, (S + 1) / 2 keys; sliding layers
    min(position + 1, window). Packing is ignored (the model FLOPs convention). 26B-A4B at 4096: 0.703 GFLOP."""
    heads, window = text["num_attention_heads"], text["sliding_window"]
    sliding_keys = (min(window, seq) * (min(window, seq) + 1) / 2 + max(0, seq - window) * window) / seq
    full_keys = (seq + 1) / 2
    total = 0.0
    for t in text["layer_types"]:
        d, keys = (text["head_dim"], sliding_keys) if t == "sliding_attention" else (text["global_head_dim"], full_keys)
        total += 4 * heads * d * keys
    return total


def model_flops_per_token(text: dict, seq: int) -> float:
    """F = 6N + 3A(S) (forward + backward)."""
    return 6 * active_params(text) + 3 * attention_flops_per_token(text, seq)


# ------------------------------------------------------------------------------------------------- settings
@dataclass
class Setup:
    device: str
    dtype: torch.dtype
    dry_run: bool
    seq: int
    rows: int
    steps: int
    warmup: int
    attn_iters: int
    image_tokens: int  # soft tokens per image
    images_per_row: int
    samples_per_row: int
    numerics_seq: int
    numerics_window: int
    numerics_bf16: bool
    deadline_s: float
    kernel: str | None
    workdir: Path
    results: dict = field(default_factory=dict)
    rows_out: list = field(default_factory=list)
    failed: list = field(default_factory=list)

    def row(self, section: str, name: str, value, unit: str = "", note: str = "") -> None:
        self.rows_out.append({"section": section, "name": name, "value": value, "unit": unit, "note": note})
        log(f"row ({section}) {name}: {'' if value is None else value} {unit} {note}".rstrip())

    def elapsed(self) -> float:
        return time.perf_counter() - _T0

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()


def text_dict_real(num_layers: int = 4) -> tuple[object, dict]:
    """(transformers Gemma4Config, released-layout config.json dict) of the real-width fixture."""
    from gemma4vl.testing._checkpoint_fixture import build_config, config_dict

    cfg = build_config("real-width", num_layers=num_layers)
    return cfg, config_dict(cfg, "released", torch.bfloat16, 280)


def text_dict_toy() -> tuple[object, dict]:
    from gemma4vl.testing._checkpoint_fixture import build_config, config_dict

    cfg = build_config("tiny-moe")
    return cfg, config_dict(cfg, "released", torch.float32, 70)


def numerics_config_dict(window: int) -> dict:
    """The tiny fixture with 26B-A4B's attention shapes at width 128: 16 heads, sliding head_dim 256 / 8 KV heads,
    full head_dim 512 / 2 KV heads (K=V), layers [sliding x 3, full]."""
    _, d = text_dict_toy()
    d["text_config"].update(hidden_size=128, num_attention_heads=16, head_dim=256, num_key_value_heads=8,
                            global_head_dim=512, num_global_key_value_heads=2, sliding_window=window,
                            num_hidden_layers=4,
                            layer_types=["sliding_attention"] * 3 + ["full_attention"])
    return d


def write_config(d: dict, directory: Path):
    from gemma4vl.bridge.hf_config import read_hf_config

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(d))
    return read_hf_config(directory)


# ---------------------------------------------------------------------------------------------------- batch
def packed_layout(seq: int, rows: int, samples: int, images: int, image_tokens: int):
    """(segment_ids, mm_token_type_ids) [rows, seq]: ``samples`` samples per row of about equal length, the first
    ``images`` of them with one image of ``image_tokens`` soft tokens starting at offset 8. No padding."""
    segments = torch.zeros(rows, seq, dtype=torch.long)
    mm = torch.zeros(rows, seq, dtype=torch.long)
    bounds = [round(i * seq / samples) for i in range(samples + 1)]
    for r in range(rows):
        for i in range(samples):
            start, stop = bounds[i], bounds[i + 1]
            segments[r, start:stop] = i + 1
            if i < images:
                if stop - start < image_tokens + 10:
                    raise ValueError(f"sample of {stop - start} tokens cannot hold a {image_tokens}-token image")
                mm[r, start + 8:start + 8 + image_tokens] = 1
    return segments, mm


def image_grid(image_tokens: int, pooling: int) -> tuple[int, int]:
    """Patch grid (rows, cols) whose k x k pooling gives ``image_tokens`` soft tokens, as square as possible."""
    a = int(math.isqrt(image_tokens))
    while image_tokens % a:
        a -= 1
    return a * pooling, image_tokens // a * pooling


def make_batch(hf_config, setup: Setup, seed: int = 0, seq: int | None = None, images: int | None = None) -> dict:
    """A packed batch for our model (``ours``) and transformers (``hf``): random text ids, image placeholders with
    boi / eoi around them, pixel values and patch positions, labels (next token within the sample, no loss on
    image tokens or across sample ends)."""
    from gemma4vl.labels import IGNORE_INDEX

    seq = setup.seq if seq is None else seq
    images = setup.images_per_row if images is None else images
    g = torch.Generator().manual_seed(seed)
    text, vision = hf_config.text_config, hf_config.vision_config
    segments, mm = packed_layout(seq, setup.rows, setup.samples_per_row, images, setup.image_tokens)
    special = {hf_config.image_token_id, hf_config.boi_token_id, hf_config.eoi_token_id, hf_config.video_token_id,
               hf_config.audio_token_id, hf_config.boa_token_id, hf_config.eoa_token_index, text.pad_token_id}
    ids = torch.randint(4, text.vocab_size, (setup.rows, seq), generator=g)
    for tok in special:
        ids[ids == tok] = 5
    is_image = mm == 1
    ids[is_image] = hf_config.image_token_id
    starts = is_image & ~torch.roll(is_image, 1, 1)
    ends = is_image & ~torch.roll(is_image, -1, 1)
    ids[torch.roll(starts, -1, 1)] = hf_config.boi_token_id
    ids[torch.roll(ends, 1, 1)] = hf_config.eoi_token_id
    positions = torch.zeros_like(ids)
    for r in range(setup.rows):
        for s in segments[r].unique().tolist():
            where = (segments[r] == s).nonzero().flatten()
            positions[r, where] = torch.arange(len(where))
    same_next = segments == torch.roll(segments, -1, 1)
    same_next[:, -1] = False
    target = torch.roll(ids, -1, 1)
    labels = torch.where(same_next & (target != hf_config.image_token_id), target, IGNORE_INDEX)

    n_images = int(starts.sum())
    p, k = vision.patch_size, vision.pooling_kernel_size
    gh, gw = image_grid(setup.image_tokens, k)
    pixel_values = torch.rand(n_images, gh * gw, 3 * p * p, generator=g)
    yy, xx = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    image_positions = torch.stack([xx.flatten(), yy.flatten()], -1).expand(n_images, -1, 2).clone()

    dev = setup.device
    ours = dict(input_ids=ids.to(dev), position_ids=positions.to(dev), segment_ids=segments.to(dev),
                mm_token_type_ids=mm.to(dev), pixel_values=pixel_values.to(dev, setup.dtype),
                image_position_ids=image_positions.to(dev))
    # transformers: no segment ids; restarting position_ids with no attention_mask make it build the packed
    # (block-diagonal) masks itself. Its loss shifts the labels, so it gets unshifted ones.
    hf_labels = torch.where(is_image, IGNORE_INDEX, ids)
    hf = dict(input_ids=ids.to(dev), position_ids=positions.to(dev), mm_token_type_ids=mm.to(dev),
              pixel_values=pixel_values.to(dev, setup.dtype), image_position_ids=image_positions.to(dev),
              labels=hf_labels.to(dev))
    return {"ours": ours, "hf": hf, "labels": labels.to(dev), "tokens": setup.rows * seq,
            "loss_tokens": int((labels != IGNORE_INDEX).sum())}


# --------------------------------------------------------------------------------------------------- models
_PARALLEL = {"ready": False}


def ensure_parallel(setup: Setup) -> None:
    if not _PARALLEL["ready"]:
        from gemma4vl.runtime.distributed import initialize_model_parallel

        initialize_model_parallel(setup.device)
        _PARALLEL["ready"] = True


def build_ours(hf, setup: Setup, kernel: str, dtype: torch.dtype):
    """Our model from a Gemma4HFConfig, random init (Megatron's init on the device), on ``setup.device``."""
    from gemma4vl.bridge.provider import provider_from_hf_config

    ensure_parallel(setup)
    provider = provider_from_hf_config(hf, params_dtype=dtype)
    provider.attention_kernel = kernel
    provider.perform_initialization = True
    provider.use_cpu_initialization = setup.device == "cpu"
    provider.vision_attn_implementation = "sdpa"
    provider.finalize()
    model = provider.provide_distributed_model(wrap_with_ddp=False, use_cpu_initialization=setup.device == "cpu",
                                               mixed_precision_wrapper=None)[0]
    return model.to(setup.device)


def sgd_(params, lr: float = 1e-5) -> None:
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                p.add_(p.grad, alpha=-lr)
                p.grad = None


def free_memory(setup: Setup) -> None:
    gc.collect()
    if setup.device == "cuda":
        torch.cuda.empty_cache()


def timed_steps(setup: Setup, step, n_warmup: int, n_timed: int) -> tuple[float, list[float], list[float]]:
    """(seconds of the first call, seconds of each timed call, values step returned), synchronised."""
    values = []
    setup.sync()
    t = time.perf_counter()
    values.append(step())
    setup.sync()
    first = time.perf_counter() - t
    for _ in range(max(0, n_warmup - 1)):
        values.append(step())
    times = []
    for _ in range(n_timed):
        setup.sync()
        t = time.perf_counter()
        values.append(step())
        setup.sync()
        times.append(time.perf_counter() - t)
    return first, times, values


def peak_gib(setup: Setup) -> float | None:
    return torch.cuda.max_memory_allocated() / GIB if setup.device == "cuda" else None


def reset_peak(setup: Setup) -> None:
    if setup.device == "cuda":
        torch.cuda.reset_peak_memory_stats()


# ------------------------------------------------------------------------------------------------ section a
def section_a(setup: Setup) -> dict:
    """Attention microbench: flex vs dense SDPA per layer type."""
    import torch.nn.functional as F

    from gemma4vl.models.arch import FULL, SLIDING, AttentionSpec, Gemma4Arch, RopeSpec
    from gemma4vl.models.attention_kernels import (
        build_dense_masks,
        build_flex_masks,
        dense_attention_kernel,
        flex_attention_kernel,
        flex_kernel_options,
        kernels_per_layer_type,
    )
    from gemma4vl.models.masks import FULL_INDEX, SLIDING_INDEX

    window = 1024 if not setup.dry_run else 32
    arch = Gemma4Arch(layer_types=(SLIDING, FULL), sliding=AttentionSpec(256, 8, False, RopeSpec(1e4), window),
                      full=AttentionSpec(512, 2, True, RopeSpec(1e6, 0.25), None), final_logit_softcapping=30.0,
                      enable_moe_block=True, bidirectional_image_attention=True, image_token_id=1, pad_token_id=0)
    segments, mm = packed_layout(setup.seq, 1, setup.samples_per_row, setup.images_per_row, setup.image_tokens)
    segments, mm = segments.to(setup.device), mm.to(setup.device)
    backward = not setup.dry_run  # FlexAttention has no CPU backward
    mode = "fwd+bwd" if backward else "fwd"

    setup.sync()
    t = time.perf_counter()
    flex_masks = build_flex_masks(arch, kernels_per_layer_type("flex"), segments, mm)
    setup.sync()
    flex_build_ms = (time.perf_counter() - t) * 1e3
    t = time.perf_counter()
    dense_masks = build_dense_masks(arch, kernels_per_layer_type("dense"), segments, mm)
    setup.sync()
    dense_build_ms = (time.perf_counter() - t) * 1e3
    setup.row("a", "flex block masks, both types: build", round(flex_build_ms, 2), "ms", "once per micro batch")
    setup.row("a", "dense [s, s] masks, both types: build", round(dense_build_ms, 2), "ms",
              f"{dense_masks.numel() / 2**20:.0f} MiB of bool")
    out = {"mode": mode, "flex_mask_build_ms": flex_build_ms, "dense_mask_build_ms": dense_build_ms}

    heads = 16
    g = torch.Generator(device=setup.device).manual_seed(0)
    for layer_type, index in ((SLIDING, SLIDING_INDEX), (FULL, FULL_INDEX)):
        spec = arch.attention(layer_type)
        d, kv = spec.head_dim, spec.num_kv_heads
        shape_q, shape_kv = (1, heads, setup.seq, d), (1, kv, setup.seq, d)
        q = (torch.randn(shape_q, generator=g, device=setup.device) * 0.5 / d**0.25).to(setup.dtype)
        k = (torch.randn(shape_kv, generator=g, device=setup.device) * 0.5 / d**0.25).to(setup.dtype)
        v = torch.randn(shape_kv, generator=g, device=setup.device).to(setup.dtype)
        grad = torch.randn(shape_q, generator=g, device=setup.device).to(setup.dtype)
        block_mask, dense_mask = flex_masks.for_layer_type(layer_type), dense_masks[index]
        allowed_pairs = int((~dense_mask).sum())
        useful_flops = 4 * heads * d * allowed_pairs * (3 if backward else 1)  # fwd 2 matmuls; bwd twice fwd

        def runner(fn):
            def run():
                qq, kk, vv = (x.detach().requires_grad_(backward) for x in (q, k, v))
                o = fn(qq, kk, vv)
                if backward:
                    torch.autograd.backward(o, grad)
                return o.detach()
            return run

        variants = {
            "flex": runner(lambda a, b, c: flex_attention_kernel(a, b, c, block_mask)),
            "dense sdpa": runner(lambda a, b, c: dense_attention_kernel(a, b, c, dense_mask)),
        }
        if layer_type == FULL:
            groups = heads // kv
            variants["sdpa causal, no mask (bound)"] = runner(
                lambda a, b, c: F.scaled_dot_product_attention(a, b.repeat_interleave(groups, 1),
                                                               c.repeat_interleave(groups, 1), is_causal=True,
                                                               scale=1.0))
            # torch's own tiles at head_dim 512 (about 40 s more of compile): only while the run is on schedule.
            if setup.device == "cuda" and setup.elapsed() < setup.deadline_s * 0.3:
                from torch.nn.attention.flex_attention import flex_attention

                torch_default = torch.compile(flex_attention, dynamic=False)
                options = {"ROWS_GUARANTEED_SAFE": True}
                variants["flex, torch's default tiles"] = runner(
                    lambda a, b, c: torch_default(a, b, c, block_mask=block_mask, scale=1.0, enable_gqa=True,
                                                  kernel_options=options))
        outputs, times = {}, {}
        for name, run in variants.items():
            try:
                first, each, values = timed_steps(setup, run, 1, setup.attn_iters)
            except Exception as exc:  # one variant failing (e.g. a tile config that does not fit) leaves the rest
                log(f"(a) {layer_type} {name}: FAILED {type(exc).__name__}: {str(exc)[:300]}")
                setup.row("a", f"{layer_type} d{d} {name}", "FAILED", "", f"{type(exc).__name__}: {str(exc)[:80]}")
                continue
            ms = statistics.median(each) * 1e3
            times[name], outputs[name] = ms, values[-1]
            log(f"(a) {layer_type} d{d} {name}: first call {first:.1f} s, median {ms:.3f} ms")
            setup.row("a", f"{layer_type} d{d} {name} {mode}", round(ms, 3), "ms",
                      f"{useful_flops / (ms * 1e-3) / 1e12:.1f} useful TFLOP/s; first call {first:.1f} s")
        ref = outputs.get("dense sdpa")
        result = {"ms": times, "allowed_pair_fraction": allowed_pairs / setup.seq**2,
                  "kernel_options": {k: v for k, v in flex_kernel_options(setup.dtype, d).items()}}
        if ref is not None:
            for name, o in outputs.items():
                if name != "dense sdpa" and "causal" not in name:
                    diff = (o.float() - ref.float()).abs().max().item()
                    result[f"max_abs_diff[{name}]"] = diff
                    setup.row("a", f"{layer_type} d{d} max |{name} - dense| (fwd out)", f"{diff:.2e}")
        if "flex" in times and "dense sdpa" in times:
            ratio = times["dense sdpa"] / times["flex"]
            result["dense_over_flex"] = ratio
            setup.row("a", f"{layer_type} d{d} dense / flex time", round(ratio, 2), "x",
                      f"flex visits {allowed_pairs / setup.seq**2:.1%} of the pairs (plus tile edges)")
        out[layer_type] = result
    return out


# ------------------------------------------------------------------------------------------------ section b
def _train_step(setup: Setup, model, batch):
    def step():
        loss = model(**batch["ours"], labels=batch["labels"])
        loss = loss.sum() / batch["loss_tokens"]
        loss.backward()
        sgd_(model.parameters())
        return loss.detach().float().item()
    return step


def choose_kernel(setup: Setup) -> tuple[str, str]:
    """(trainer.attention_kernel for (b), why): ``--kernel`` if given; dense on CPU; else per layer type the faster
    of flex and dense SDPA in (a) when (a) ran (a flex variant that failed counts as slower), flex otherwise."""
    if setup.kernel is not None:
        return setup.kernel, "--kernel"
    if setup.dry_run:
        return "dense", "CPU: no FlexAttention backward"
    a = setup.results.get("a")
    if not isinstance(a, dict) or "sliding_attention" not in a or "full_attention" not in a:
        return "flex", "default (section (a) did not run)"
    faster = {}
    for layer_type in ("sliding_attention", "full_attention"):
        ms = a[layer_type]["ms"]
        faster[layer_type] = ms.get("flex", math.inf) <= ms.get("dense sdpa", math.inf)
    # No kernel choice runs flex on full layers only: if flex loses on sliding layers, dense everywhere.
    choice = {(True, True): "flex", (True, False): "flex_sliding"}.get(
        (faster["sliding_attention"], faster["full_attention"]), "dense")
    names = {True: "flex", False: "dense"}
    return choice, (f"faster in (a): sliding {names[faster['sliding_attention']]}, "
                    f"full {names[faster['full_attention']]}")


def section_b(setup: Setup) -> dict:
    """Real-width proxy (toy model in dry-run): our model's training steps."""
    hf_config, d = text_dict_toy() if setup.dry_run else text_dict_real(4)
    hf = write_config(d, setup.workdir / "proxy")
    kernel, why = choose_kernel(setup)
    setup.row("b", "attention kernel", kernel, "", why)
    log(f"(b) building our model ({hf.num_layers} layers {list(hf.arch.layer_types)}, hidden {hf.hidden_size}, "
        f"{hf.num_experts} experts, vocab {hf.vocab_size}, {setup.dtype}, attention kernel {kernel})")
    t = time.perf_counter()
    model = build_ours(hf, setup, kernel, setup.dtype).train()
    log(f"(b) built in {time.perf_counter() - t:.1f} s")
    batch = make_batch(hf_config, setup, seed=1)
    reset_peak(setup)
    first, times, losses = timed_steps(setup, _train_step(setup, model, batch), setup.warmup, setup.steps)
    step_s = statistics.median(times)
    tokens_per_s = batch["tokens"] / step_s
    f_token = model_flops_per_token(d["text_config"], setup.seq)
    tflops = tokens_per_s * f_token / 1e12
    peak = peak_gib(setup)
    text = d["text_config"]
    log(f"(b) first step {first:.1f} s; median step {step_s * 1e3:.1f} ms; {tokens_per_s:,.0f} tokens/s; "
        f"{tflops:.1f} TFLOP/s; losses {[round(x, 4) for x in losses]}")
    setup.row("b", f"ours ({kernel}) tokens/s", round(tokens_per_s, 1), "tok/s",
              f"{setup.rows} x {setup.seq} tokens/step, median of {setup.steps} steps")
    setup.row("b", "ours model TFLOP/s", round(tflops, 2), "TFLOP/s",
              f"F = 6N + 3A(S) = {f_token / 1e9:.3f} GFLOP/token, N = {active_params(text) / 1e9:.4f} B")
    setup.row("b", "ours peak memory", None if peak is None else round(peak, 2), "GiB",
              "n/a on CPU" if peak is None else "torch.cuda.max_memory_allocated")
    setup.row("b", "ours first step (compile, warm-up)", round(first, 2), "s")
    setup.row("b", "ours loss (first, last)", f"{losses[0]:.4f}, {losses[-1]:.4f}", "nats",
              f"ln(vocab) = {math.log(hf.vocab_size):.4f}")
    result = {"tokens_per_step": batch["tokens"], "steps_timed": len(times), "step_s": step_s,
              "tokens_per_s": tokens_per_s, "tflops": tflops, "flops_per_token": f_token,
              "active_params": active_params(text), "peak_gib": peak, "losses": losses,
              "ln_vocab": math.log(hf.vocab_size), "kernel": kernel, "first_step_s": first}
    del model, batch
    free_memory(setup)
    return result


# ------------------------------------------------------------------------------------------------ section c
def section_c(setup: Setup) -> dict:
    """transformers' model, same config and batch, same step."""
    from transformers import Gemma4ForConditionalGeneration

    hf_config, _ = text_dict_toy() if setup.dry_run else text_dict_real(4)
    log("(c) building transformers' Gemma4ForConditionalGeneration (sdpa attention)")
    t = time.perf_counter()
    with torch.device(setup.device):
        model = Gemma4ForConditionalGeneration._from_config(hf_config, attn_implementation="sdpa", dtype=setup.dtype)
    model.train()
    log(f"(c) built in {time.perf_counter() - t:.1f} s")
    batch = make_batch(hf_config, setup, seed=1)

    def step():
        out = model(**batch["hf"])
        out.loss.backward()
        sgd_(model.parameters())
        return out.loss.detach().float().item()

    reset_peak(setup)
    first, times, losses = timed_steps(setup, step, setup.warmup, setup.steps)
    step_s = statistics.median(times)
    tokens_per_s = batch["tokens"] / step_s
    peak = peak_gib(setup)
    log(f"(c) first step {first:.1f} s; median step {step_s * 1e3:.1f} ms; {tokens_per_s:,.0f} tokens/s; "
        f"losses {[round(x, 4) for x in losses]}")
    setup.row("c", "transformers tokens/s", round(tokens_per_s, 1), "tok/s", "same batch, sdpa, default experts")
    setup.row("c", "transformers peak memory", None if peak is None else round(peak, 2), "GiB")
    result = {"tokens_per_s": tokens_per_s, "step_s": step_s, "peak_gib": peak, "losses": losses,
              "experts_implementation": getattr(model.config.get_text_config(), "_experts_implementation", None)}
    ours = setup.results.get("b")
    if isinstance(ours, dict) and "tokens_per_s" in ours:
        ratio = ours["tokens_per_s"] / tokens_per_s
        result["ours_over_transformers"] = ratio
        setup.row("c", "ours / transformers tokens/s", round(ratio, 2), "x", "measured in this run, same device")
    del model, batch
    free_memory(setup)
    return result


# ------------------------------------------------------------------------------------------------ section d
def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}


def section_d(setup: Setup) -> dict:
    """flex vs the dense reference kernel on a small input, same weights."""
    from gemma4vl.testing._checkpoint_fixture import build_config

    if setup.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    d = numerics_config_dict(setup.numerics_window)
    hf = write_config(d, setup.workdir / "numerics")
    hf_config = build_config("tiny-moe")
    backward = not setup.dry_run
    small = Setup(**{**setup.__dict__, "dtype": torch.float32, "rows": 2, "samples_per_row": 3,
                     "images_per_row": 2, "image_tokens": 16})
    batch = make_batch(hf_config, small, seed=2, seq=setup.numerics_seq)
    reference = build_ours(hf, setup, "dense", torch.float32)
    # Unit-RMS q, k times head_dim^-0.25 each: softmax logits of unit scale (attention scaling is 1.0 and q/k norm
    # weights of 1 would make it near one-hot, where fp32 rounding alone moves logits by 1e-3).
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "q_layernorm" in name or "k_layernorm" in name:
                p.fill_(p.shape[-1] ** -0.25)
    state = reference.state_dict()

    def run(model, train: bool):
        model.zero_grad(set_to_none=True)
        dtype = next(model.parameters()).dtype
        inputs = dict(batch["ours"], pixel_values=batch["ours"]["pixel_values"].to(dtype))
        if not train:
            with torch.no_grad():
                return model(**inputs).float(), None, None
        logits = model(**inputs)
        loss = model(**inputs, labels=batch["labels"]).sum() / batch["loss_tokens"]
        loss.backward()
        return logits.detach().float(), loss.detach().float().item(), _grads(model)

    ref_logits, ref_loss, ref_grads = run(reference, backward)
    if not backward:
        with torch.no_grad():
            ref_loss = (reference(**batch["ours"], labels=batch["labels"]).sum() / batch["loss_tokens"]).item()
    valid = batch["ours"]["segment_ids"] > 0
    logit_range = ref_logits[valid].abs().max().item()
    out = {"logit_range": logit_range, "ref_loss": ref_loss, "seq": setup.numerics_seq}
    setup.row("d", "dense fp32 (reference) loss", round(ref_loss, 6), "nats", f"|logits| <= {logit_range:.2f}")
    for label, dtype in (("flex fp32", torch.float32), ("flex bf16", torch.bfloat16)):
        if dtype == torch.bfloat16 and not setup.numerics_bf16:
            continue
        model = build_ours(hf, setup, "flex", dtype)
        model.load_state_dict({k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                               for k, v in state.items()})
        logits, loss, grads = run(model, backward)
        if not backward:
            with torch.no_grad():
                loss = (model(**batch["ours"], labels=batch["labels"]).sum() / batch["loss_tokens"]).item()
        diff = (logits - ref_logits)[valid].abs().max().item()
        entry = {"max_logit_diff": diff, "loss": loss}
        setup.row("d", f"{label} vs dense fp32: max |logit diff|", f"{diff:.3e}", "",
                  f"loss {loss:.6f} vs {ref_loss:.6f}")
        if grads is not None:
            worst_name, worst = max(((n, (grads[n] - g).abs().max().item() / max(g.abs().max().item(), 1e-30))
                                     for n, g in ref_grads.items()), key=lambda x: x[1])
            flat_ref = torch.cat([g.flatten() for g in ref_grads.values()])
            flat = torch.cat([grads[n].flatten() for n in ref_grads])
            cosine = torch.nn.functional.cosine_similarity(flat, flat_ref, dim=0).item()
            entry.update(grad_worst_rel=worst, grad_worst_tensor=worst_name, grad_cosine=cosine,
                         n_grads=len(grads), n_ref_grads=len(ref_grads))
            setup.row("d", f"{label} vs dense fp32: worst max|dgrad|/max|grad|", f"{worst:.3e}", "", worst_name)
            setup.row("d", f"{label} vs dense fp32: gradient cosine", f"{cosine:.8f}", "",
                      f"{len(grads)} tensors")
        else:
            setup.row("d", f"{label}: gradients", "n/a", "", "no FlexAttention backward on CPU")
        out[label] = entry
        del model
    del reference
    free_memory(setup)
    return out


# ------------------------------------------------------------------------------------------------------ main
def print_table(setup: Setup, device_name: str) -> None:
    rows = setup.rows_out
    print("\n" + "=" * 118, flush=True)
    print(f"bench/gpu_step.py on {device_name}; dtype {setup.dtype}; seq {setup.seq}"
          + ("; DRY RUN (CPU, toy sizes: not a measurement)" if setup.dry_run else ""), flush=True)
    print(f"{'sec':<4}{'measurement':<58}{'value':>16} {'unit':<9}note", flush=True)
    print("-" * 118, flush=True)
    for r in rows:
        value = "" if r["value"] is None else str(r["value"])
        print(f"{r['section']:<4}{r['name'][:57]:<58}{value:>16} {r['unit']:<9}{r['note']}", flush=True)
    print("=" * 118, flush=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, toy sizes: proves the script works")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of a,b,c,d")
    parser.add_argument("--seq", type=int, default=None, help="tokens per packed row (default 8192; dry run 256)")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps in (b), (c) (default 5)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2)")
    parser.add_argument("--json", type=Path, default=None, help="also write rows and results here")
    parser.add_argument("--kernel", choices=("dense", "flex", "flex_sliding"), default=None,
                        help="attention kernel of (b) (default: per layer type the faster in (a); flex without (a))")
    parser.add_argument("--numerics-bf16", action="store_true",
                        help="(d) also compares flex in bf16 (two more kernel compiles, about a minute)")
    parser.add_argument("--deadline-s", type=float, default=360.0,
                        help="sections not started by then are skipped (default 360, so that the whole run stays "
                             "under 8 minutes if no section takes more than 2)")
    return parser.parse_args(argv)


def write_json(path: Path | None, setup: Setup, device_name: str, sections: list[str], complete: bool) -> None:
    """The rows and per-section results so far (``complete``: every section has run or been skipped)."""
    if path is None:
        return
    path.write_text(json.dumps({"device": device_name, "torch": torch.__version__, "dry_run": setup.dry_run,
                                "seq": setup.seq, "sections": sections, "complete": complete,
                                "failed": setup.failed, "rows": setup.rows_out, "results": setup.results},
                               indent=1, default=str))


def main(argv=None) -> int:
    args = parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        print(f"--sections: unknown {unknown}; choose from {list(SECTIONS)}", file=sys.stderr)
        return 2
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run on CPU (toy sizes), or on a GPU machine", file=sys.stderr)
        return 2
    dry = args.dry_run
    workdir = Path(tempfile.mkdtemp(prefix="gemma4vl-gpu-step-"))
    setup = Setup(
        device="cpu" if dry else "cuda", dtype=torch.float32 if dry else torch.bfloat16, dry_run=dry,
        seq=args.seq or (256 if dry else 8192), rows=1, steps=args.steps or (2 if dry else 5),
        warmup=args.warmup or (1 if dry else 2), attn_iters=2 if dry else 10,
        image_tokens=16 if dry else 280, images_per_row=2 if dry else 4, samples_per_row=3 if dry else 4,
        numerics_seq=128 if dry else 1024, numerics_window=32 if dry else 256,
        numerics_bf16=args.numerics_bf16 and not dry, deadline_s=args.deadline_s, kernel=args.kernel,
        workdir=workdir)
    device_name = "CPU (dry run)" if dry else torch.cuda.get_device_name()
    log(f"torch {torch.__version__}; device {device_name}; sections {sections}; seq {setup.seq}")
    if not dry:
        torch.backends.cuda.matmul.allow_tf32 = True  # (d) turns it off for its fp32 comparison
    functions = {"a": section_a, "b": section_b, "c": section_c, "d": section_d}
    for name in sections:
        if setup.elapsed() > setup.deadline_s:
            setup.results[name] = {"skipped": f"deadline {setup.deadline_s:.0f} s passed"}
            setup.row(name, f"section ({name}) skipped", None, "", f"--deadline-s {setup.deadline_s:.0f} passed")
            continue
        log(f"section ({name}) start")
        t = time.perf_counter()
        try:
            setup.results[name] = functions[name](setup)
            log(f"section ({name}) done in {time.perf_counter() - t:.1f} s")
        except Exception as exc:
            traceback.print_exc()
            sys.stderr.flush()
            setup.failed.append(name)
            setup.results[name] = {"error": f"{type(exc).__name__}: {exc}"}
            setup.row(name, f"section ({name}) FAILED", None, "", f"{type(exc).__name__}: {str(exc)[:90]}")
            log(f"section ({name}) FAILED after {time.perf_counter() - t:.1f} s: {type(exc).__name__}: {exc}")
            free_memory(setup)
        # After every section: a run killed by an outer time limit still leaves what it measured.
        write_json(args.json, setup, device_name, sections, complete=False)
    print_table(setup, device_name)
    write_json(args.json, setup, device_name, sections, complete=True)
    if _PARALLEL["ready"]:
        from gemma4vl.runtime.distributed import destroy_model_parallel

        destroy_model_parallel()
    log(f"total {time.perf_counter() - _T0:.1f} s" + (f"; FAILED sections {setup.failed}" if setup.failed else ""))
    return 1 if setup.failed else 0


if __name__ == "__main__":
    sys.exit(main())
