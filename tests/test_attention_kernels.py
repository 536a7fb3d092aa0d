"""The attention kernels (gemma4vl.models.attention_kernels): FlexAttention against the dense reference.

CPU (``make test``):
- the flex block masks, materialised over every (query, key) pair from the BlockMask's own tables plus its
  mask_mod (as the kernel reads them), equal models/masks.py's dense masks element for element, on packed rows
  with padding, images (one cut by a sample boundary, one longer than the window) and several block sizes; the
  tables are minimal (no skipped tile holds an allowed pair, every all-allowed tile is "full") and the backward's
  query-side tables are their transpose;
- FlexAttention's forward equals the dense kernel at both 26B-A4B head shapes (256 with 8 KV heads, 512 with 2),
  and the whole model's logits with ``flex`` / ``flex_sliding`` equal ``dense`` on a packed batch with images
  (no-grad: torch 2.13 has no CPU FlexAttention backward, which the model refuses with a clear error);
- ``trainer.attention_kernel`` is validated (choices; flex needs ``trainer.device=cuda``) and reaches the model.

Slow (``make test-slow``): the compiled CPU FlexAttention kernel, which does read the block tables, equals dense.
GPU (``make test-all`` on a CUDA machine): forward and backward of the compiled kernel against dense at both head
shapes (fp32 and bf16), and the whole model's logits and gradients, flex vs dense, on CUDA.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import create_mask

from gemma4vl.models.arch import FULL, SLIDING, AttentionSpec, Gemma4Arch, RopeSpec
from gemma4vl.models.attention_kernels import (
    FLEX_BLOCK_SIZE,
    FLEX_KERNEL_OPTIONS,
    FlexBlockMasks,
    build_block_mask,
    build_flex_masks,
    dense_attention_kernel,
    flex_attention_kernel,
    flex_kernel_options,
    kernels_per_layer_type,
)
from gemma4vl.models.masks import FULL_INDEX, SLIDING_INDEX, attention_mask_mods, build_attention_masks
from gemma4vl.testing.pytest_fixtures import tiny_ckpt, tiny_ckpt_dir  # noqa: F401  (fixtures)

# 26B-A4B's attention shapes: 16 query heads; sliding layers head_dim 256 with 8 KV heads, full layers 512 with 2.
HEADS = 16
SHAPES = {SLIDING: (256, 8), FULL: (512, 2)}


def _arch(window: int, bidirectional: bool = True) -> Gemma4Arch:
    return Gemma4Arch(
        layer_types=(SLIDING, SLIDING, FULL),
        sliding=AttentionSpec(256, 8, False, RopeSpec(1e4), window),
        full=AttentionSpec(512, 2, True, RopeSpec(1e6, 0.25), None),
        final_logit_softcapping=30.0,
        enable_moe_block=True,
        bidirectional_image_attention=bidirectional,
        image_token_id=7,
        pad_token_id=0,
    )


def _packed_rows(seq: int = 80) -> tuple[torch.Tensor, torch.Tensor]:
    """(segment_ids, mm_token_type_ids) [2, seq]: row 0 packs three samples and padding, with an image that ends
    sample 1 right where sample 2 starts with another (two images, not one); row 1 holds one sample with a
    20-token image (longer than the test windows) and padding."""
    segments = torch.zeros(2, seq, dtype=torch.long)
    mm = torch.zeros(2, seq, dtype=torch.long)
    segments[0, :30], segments[0, 30:61], segments[0, 61:76] = 1, 2, 3
    mm[0, 3:12] = 1
    mm[0, 24:36] = 1  # 24..29 in sample 1, 30..35 in sample 2
    mm[0, 64:66] = 1
    segments[1, :50] = 1
    mm[1, 10:30] = 1
    return segments, mm


def _tables(count: torch.Tensor, indices: torch.Tensor, n_cols: int) -> torch.Tensor:
    """FlexAttention's (count, indices) layout back to a dense [b, h, rows, n_cols] bool table."""
    b, h, rows = count.shape
    out = torch.zeros(b, h, rows, n_cols, dtype=torch.bool)
    for i in range(b):
        for j in range(h):
            for r in range(rows):
                out[i, j, r, indices[i, j, r, : count[i, j, r]].long()] = True
    return out


def _materialise(block_mask, mask_mod, batch: int, seq: int) -> torch.Tensor:
    """[batch, seq, seq] bool, True = attend: what the kernel computes from ``block_mask`` -- every pair in a full
    tile, the mask_mod's answer in a partial tile, nothing elsewhere."""
    q_block, kv_block = block_mask.BLOCK_SIZE
    n_q, n_kv = -(-seq // q_block), -(-seq // kv_block)
    partial = _tables(block_mask.kv_num_blocks, block_mask.kv_indices, n_kv)[:, 0]
    full = _tables(block_mask.full_kv_num_blocks, block_mask.full_kv_indices, n_kv)[:, 0]
    assert not (partial & full).any(), "a tile is both partial and full"
    rows = torch.arange(seq) // q_block
    cols = torch.arange(seq) // kv_block
    partial_pairs = partial[:, rows][:, :, cols]
    full_pairs = full[:, rows][:, :, cols]
    b = torch.arange(batch).view(batch, 1, 1)
    q = torch.arange(seq).view(1, seq, 1)
    kv = torch.arange(seq).view(1, 1, seq)
    return full_pairs | (partial_pairs & mask_mod(b, None, q, kv))


@pytest.mark.parametrize("block_size", [8, 16, 128])
@pytest.mark.parametrize("window,bidirectional", [(8, True), (13, True), (8, False)])
def test_block_masks_equal_the_dense_masks_element_for_element(block_size, window, bidirectional):
    arch = _arch(window, bidirectional)
    segments, mm = _packed_rows(seq=80)
    batch, seq = segments.shape
    dense = build_attention_masks(arch, segments, mm)  # True = masked out
    masks = build_flex_masks(arch, kernels_per_layer_type("flex"), segments, mm, block_size=block_size)
    mods = dict(zip((SLIDING, FULL), attention_mask_mods(arch, segments, mm)))
    for layer_type, index in ((SLIDING, SLIDING_INDEX), (FULL, FULL_INDEX)):
        expected = ~dense[index, :, 0]  # [b, s, s], True = attend
        block_mask = masks.for_layer_type(layer_type)
        assert block_mask.BLOCK_SIZE == (block_size, block_size)
        assert block_mask.seq_lengths == (seq, seq)
        got = _materialise(block_mask, mods[layer_type], batch, seq)
        mismatches = (got != expected).sum().item()
        assert mismatches == 0, f"{layer_type}, block {block_size}: {mismatches} pairs differ from the dense mask"

        # Minimal and maximal tables: a tile is skipped iff it allows nothing, full iff it allows everything.
        n = -(-seq // block_size)
        padded = torch.zeros(batch, n * block_size, n * block_size, dtype=torch.bool)
        padded[:, :seq, :seq] = expected
        tiles = padded.view(batch, n, block_size, n, block_size)
        any_tile, all_tile = tiles.any(4).any(2), tiles.all(4).all(2)
        partial = _tables(block_mask.kv_num_blocks, block_mask.kv_indices, n)[:, 0]
        full = _tables(block_mask.full_kv_num_blocks, block_mask.full_kv_indices, n)[:, 0]
        assert torch.equal(full, all_tile)
        assert torch.equal(partial, any_tile & ~all_tile)
        # The backward walks the query-side tables: they must be the transpose of the key-side ones.
        assert torch.equal(_tables(block_mask.q_num_blocks, block_mask.q_indices, n)[:, 0], partial.transpose(1, 2))
        assert torch.equal(_tables(block_mask.full_q_num_blocks, block_mask.full_q_indices, n)[:, 0],
                           full.transpose(1, 2))

        # The same predicate through FlexAttention's own vmap evaluation (how its eager and compiled kernels call
        # a mask_mod: one (b, h, q, kv) at a time).
        vmapped = create_mask(mods[layer_type], batch, 1, seq, seq, device="cpu")[:, 0]
        assert torch.equal(vmapped, expected)


def test_block_masks_skip_what_the_window_and_samples_exclude():
    """At 512 tokens (four packed samples, window 64, 32-token tiles) the sliding mask visits a fraction of the
    tiles and the full mask about the causal half within samples: the numbers, not just the pattern."""
    arch = _arch(64)
    seq, block = 512, 32
    segments = torch.zeros(1, seq, dtype=torch.long)
    for i, (start, stop) in enumerate([(0, 128), (128, 256), (256, 384), (384, 512)]):
        segments[0, start:stop] = i + 1
    masks = build_flex_masks(arch, kernels_per_layer_type("flex"), segments, None, block_size=block)
    n = seq // block
    visited = {t: int((masks.for_layer_type(t).kv_num_blocks + masks.for_layer_type(t).full_kv_num_blocks).sum())
               for t in (SLIDING, FULL)}
    # Full: each 128-token sample is 4 x 4 tiles, causal -> 4 * 5 / 2 = 10 tiles per sample, 40 of 256.
    assert visited[FULL] == 40
    # Sliding (window 64 = 2 tiles): per sample, diagonal tiles 4 + first sub-diagonal 3 + second 2 = 9, 36 of 256.
    assert visited[SLIDING] == 36
    assert n * n == 256


def test_chunked_block_building_equals_one_chunk():
    arch = _arch(8)
    segments, mm = _packed_rows(seq=80)
    sliding_mod, _ = attention_mask_mods(arch, segments, mm)
    one = build_block_mask(sliding_mod, 2, 80, 8)
    chunked = build_block_mask(sliding_mod, 2, 80, 8, max_chunk_elements=1)  # one query tile at a time
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
        assert torch.equal(getattr(one, name), getattr(chunked, name)), name


def _qkv(layer_type: str, batch: int, seq: int, dtype=torch.float32, device="cpu", seed=0):
    head_dim, kv_heads = SHAPES[layer_type]
    g = torch.Generator(device=device).manual_seed(seed)
    # Unit-RMS rows scaled by 0.5, as after Gemma 4's q/k norms with weights in 0.3-0.75: scores of a few units
    # (scale 1.0), a softmax that is neither flat nor one-hot.
    q = torch.randn(batch, HEADS, seq, head_dim, generator=g, device=device, dtype=dtype) * 0.5 / head_dim**0.25
    k = torch.randn(batch, kv_heads, seq, head_dim, generator=g, device=device, dtype=dtype) * 0.5 / head_dim**0.25
    v = torch.randn(batch, kv_heads, seq, head_dim, generator=g, device=device, dtype=dtype)
    return q, k, v


@pytest.mark.parametrize("layer_type", [SLIDING, FULL])
def test_flex_forward_equals_dense_at_both_head_shapes(layer_type):
    arch = _arch(8)
    segments, mm = _packed_rows(seq=80)
    dense_masks = build_attention_masks(arch, segments, mm)
    masks = build_flex_masks(arch, kernels_per_layer_type("flex"), segments, mm, block_size=16)
    index = SLIDING_INDEX if layer_type == SLIDING else FULL_INDEX
    q, k, v = _qkv(layer_type, 2, 80)
    with torch.no_grad():
        ref = dense_attention_kernel(q, k, v, dense_masks[index])
        out = flex_attention_kernel(q, k, v, masks.for_layer_type(layer_type))
    assert out.shape == ref.shape == (2, HEADS, 80, SHAPES[layer_type][0])
    diff = (out - ref).abs().max().item()
    assert diff <= 2e-6, f"{layer_type}: max |flex - dense| = {diff}"
    assert ref.abs().max().item() > 1.0  # outputs of unit scale, not near zero
    # GQA: query heads 0 and 1 share key/value head 0, so with equal queries they give equal outputs.
    q2 = q.clone()
    q2[:, 1] = q2[:, 0]
    with torch.no_grad():
        out2 = flex_attention_kernel(q2, k, v, masks.for_layer_type(layer_type))
    assert torch.equal(out2[:, 0], out2[:, 1])


def test_flex_on_cpu_refuses_backward_with_a_clear_error():
    arch = _arch(8)
    segments, mm = _packed_rows(seq=32)
    masks = build_flex_masks(arch, kernels_per_layer_type("flex"), segments, mm)
    q, k, v = _qkv(SLIDING, 2, 32)
    q.requires_grad_(True)
    with pytest.raises(NotImplementedError, match="trainer.attention_kernel=dense"):
        flex_attention_kernel(q, k, v, masks.for_layer_type(SLIDING))


def test_kernel_choices():
    assert kernels_per_layer_type("dense") == {SLIDING: "dense", FULL: "dense"}
    assert kernels_per_layer_type("flex") == {SLIDING: "flex", FULL: "flex"}
    assert kernels_per_layer_type("flex_sliding") == {SLIDING: "flex", FULL: "dense"}
    with pytest.raises(ValueError, match="'sdpa' is not one of"):
        kernels_per_layer_type("sdpa")
    segments, mm = _packed_rows(seq=16)
    masks = build_flex_masks(_arch(8), kernels_per_layer_type("flex_sliding"), segments, mm)
    assert isinstance(masks, FlexBlockMasks) and masks.full is None
    with pytest.raises(ValueError, match="no FlexAttention block mask was built for full_attention"):
        masks.for_layer_type(FULL)
    assert build_flex_masks(_arch(8), kernels_per_layer_type("dense"), segments, mm) is None


def test_kernel_options_tiles_divide_the_block_mask_tiles():
    """Every tile size in FLEX_KERNEL_OPTIONS divides FLEX_BLOCK_SIZE (the kernel walks the block mask's 128-token
    tiles in its own tiles), and every entry keeps the guard-free rows option."""
    for (dtype, head_dim), options in FLEX_KERNEL_OPTIONS.items():
        merged = flex_kernel_options(dtype, head_dim)
        assert merged["ROWS_GUARANTEED_SAFE"] is True
        blocks = {k: v for k, v in options.items() if "BLOCK" in k}
        assert blocks and all(FLEX_BLOCK_SIZE % v == 0 for v in blocks.values()), (dtype, head_dim, blocks)
    assert flex_kernel_options(torch.float32, 512)["fwd_num_stages"] == 1
    assert flex_kernel_options(torch.bfloat16, 256) == {"ROWS_GUARANTEED_SAFE": True}  # torch's tuned defaults


# ----------------------------------------------------------------------------------------------------- model level
def _packed_model_batch(config):
    """synthetic_batch with row 0 packed: samples [0, 14) and [14, 40) (positions restart), an image in each row."""
    from gemma4vl.testing.megatron_harness import synthetic_batch

    batch = synthetic_batch(config, seed=11, batch=2, seq=40, images=True, pad=5)
    batch.segment_ids[0, 14:] = 2
    batch.position_ids[0, 14:] = torch.arange(40 - 14)
    return batch


@pytest.fixture(scope="module")
def tiny_dense_and_flex(megatron_cpu, tmp_path_factory):
    from gemma4vl.testing.megatron_harness import load_megatron
    from gemma4vl.testing.pytest_fixtures import tiny_checkpoint

    info = tiny_checkpoint(tmp_path_factory, layout="released", dtype="float32")
    models = {kernel: load_megatron(info.path, attention_kernel=kernel)[1][0].eval()
              for kernel in ("dense", "flex", "flex_sliding")}
    # The training configuration on GPUs (conf/trainer/gpu.yaml): flex with full recompute of every layer, where the
    # block masks reach the layers by reference through Megatron-Core's checkpointed forward.
    models["flex, full recompute"] = load_megatron(
        info.path, attention_kernel="flex", recompute_granularity="full", recompute_method="uniform",
        recompute_num_layers=1)[1][0].eval()
    return info, models


def test_model_logits_flex_equal_dense_on_a_packed_batch_with_images(tiny_dense_and_flex):
    info, models = tiny_dense_and_flex
    batch = _packed_model_batch(info.config)
    assert batch.mm_token_type_ids.sum().item() == 8 and batch.segment_ids.max().item() == 2
    with torch.no_grad():
        logits = {kernel: model(**batch.model_kwargs()) for kernel, model in models.items()
                  if kernel != "flex, full recompute"}
    valid = batch.segment_ids > 0
    ref = logits["dense"][valid]
    assert ref.abs().max().item() > 1.0
    for kernel in ("flex", "flex_sliding"):
        diff = (logits[kernel][valid] - ref).abs().max().item()
        assert diff <= 2e-5, f"{kernel}: max |logit diff| vs dense = {diff}"
    # The layers really run the configured kernels.
    layers = models["flex_sliding"].language_model.decoder.layers
    assert [(l.layer_type, l.self_attention.kernel) for l in layers] == [
        (SLIDING, "flex"), (FULL, "dense"), (SLIDING, "flex"), (FULL, "dense")]


def test_model_flex_block_masks_reach_every_layer_under_full_recompute(tiny_dense_and_flex, monkeypatch):
    """In training mode with full recompute, Megatron-Core runs each layer through tensor_parallel.checkpoint with
    attention_mask among the saved tensors; the block masks travel in packed_seq_params instead. Run that path (no
    grad: the CPU has no flex backward; CUDA covers the backward) and count the checkpointed layers."""
    from megatron.core import tensor_parallel

    info, models = tiny_dense_and_flex
    batch = _packed_model_batch(info.config)
    model = models["flex, full recompute"]
    assert model.config.recompute_granularity == "full"
    calls = []
    checkpoint = tensor_parallel.checkpoint

    def counting_checkpoint(function, distribute_saved_activations, *args):
        calls.append(args[1])  # attention_mask: None when every layer runs flex
        return checkpoint(function, distribute_saved_activations, *args)

    monkeypatch.setattr(tensor_parallel, "checkpoint", counting_checkpoint)
    with torch.no_grad():
        ref = models["dense"](**batch.model_kwargs())
        model.train()
        try:
            logits = model(**batch.model_kwargs())
        finally:
            model.eval()
    assert calls == [None] * len(model.language_model.decoder.layers) == [None] * 4
    valid = batch.segment_ids > 0
    diff = (logits[valid] - ref[valid]).abs().max().item()
    assert diff <= 2e-5, f"flex under full recompute: max |logit diff| vs dense = {diff}"


def test_model_with_flex_refuses_cpu_training(tiny_dense_and_flex):
    info, models = tiny_dense_and_flex
    batch = _packed_model_batch(info.config)
    with pytest.raises(NotImplementedError, match="FlexAttention has no backward on CPU"):
        models["flex"](**batch.model_kwargs())


# ---------------------------------------------------------------------------------------------------------- config
def test_config_attention_kernel_is_validated_and_reaches_the_provider(tiny_ckpt_dir):
    import dataclasses

    from gemma4vl.bridge.hf_config import read_hf_config
    from gemma4vl.config.schema import RunConfig, TrainerConfig
    from gemma4vl.config.validate import ConfigError, validate

    hf = read_hf_config(tiny_ckpt_dir)
    cfg = RunConfig()
    assert TrainerConfig().attention_kernel == "dense"
    validate(cfg, 1, hf)
    with pytest.raises(ConfigError, match=r"trainer.attention_kernel='sdpa' is not one of \['dense', 'flex', "):
        validate(dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, attention_kernel="sdpa")), 1, hf)
    flex_on_cpu = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, attention_kernel="flex"))
    with pytest.raises(ConfigError, match=r"trainer.attention_kernel='flex' needs trainer.device='cuda'"):
        validate(flex_on_cpu, 1, hf)
    on_gpu = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, attention_kernel="flex",
                                                                  device="cuda", precision="bf16"))
    assert validate(on_gpu, 1, hf).data_parallel == 1

    from gemma4vl.bridge.provider import provider_from_hf_config
    from gemma4vl.config.container import configure_provider

    provider = provider_from_hf_config(hf)
    assert provider.attention_kernel == "dense"
    configure_provider(provider, on_gpu)
    assert provider.attention_kernel == "flex"



# ------------------------------------------------------------------------------------------------------------ slow
@pytest.mark.slow
@pytest.mark.parametrize("layer_type", [SLIDING, FULL])
def test_compiled_cpu_flex_reads_the_block_tables_and_equals_dense(layer_type):
    """torch.compile'd FlexAttention on CPU (inductor's C++ template) skips tiles by the block tables, unlike the
    eager reference: equal to dense means the tables are right as a kernel uses them (about 20 s of compile per
    head shape here)."""
    arch = _arch(8)
    segments, mm = _packed_rows(seq=80)
    dense_masks = build_attention_masks(arch, segments, mm)
    masks = build_flex_masks(arch, kernels_per_layer_type("flex"), segments, mm, block_size=16)
    index = SLIDING_INDEX if layer_type == SLIDING else FULL_INDEX
    q, k, v = _qkv(layer_type, 2, 80)
    compiled = torch.compile(torch.nn.attention.flex_attention.flex_attention, dynamic=False)
    with torch.no_grad():
        ref = dense_attention_kernel(q, k, v, dense_masks[index])
        out = compiled(q, k, v, block_mask=masks.for_layer_type(layer_type), scale=1.0, enable_gqa=True)
    diff = (out - ref).abs().max().item()
    assert diff <= 1e-4, f"{layer_type}: max |compiled flex - dense| = {diff}"


# ------------------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-3), (torch.bfloat16, 4e-2)])
@pytest.mark.parametrize("layer_type", [SLIDING, FULL])
def test_cuda_flex_forward_and_backward_equal_dense(layer_type, dtype, atol):
    """Compiled FlexAttention (the training kernel, with FLEX_KERNEL_OPTIONS) against dense SDPA on CUDA, forward
    and the gradients of q, k, v, on packed rows with images at 1024 tokens (8 x 8 tiles of 128) and window 256.
    The reference is computed in float64 on the same GPU; each kernel is compared with it. fp32 tolerances allow for
    TF32 in the kernels' matmuls."""
    arch = _arch(256)
    seq = 1024
    segments = torch.zeros(2, seq, dtype=torch.long)
    mm = torch.zeros(2, seq, dtype=torch.long)
    segments[0, :300], segments[0, 300:700], segments[0, 700:1000] = 1, 2, 3
    mm[0, 20:300] = 1  # an image longer than the window, ending its sample
    mm[0, 300:580] = 1  # the next sample starts with another
    segments[1, :900] = 1
    mm[1, 500:780] = 1
    segments, mm = segments.cuda(), mm.cuda()
    index = SLIDING_INDEX if layer_type == SLIDING else FULL_INDEX
    dense_mask = build_attention_masks(arch, segments, mm)[index]
    block_mask = build_flex_masks(arch, kernels_per_layer_type("flex"), segments, mm).for_layer_type(layer_type)
    q64, k64, v64 = (t.requires_grad_(True) for t in _qkv(layer_type, 2, seq, torch.float64, "cuda", seed=1))
    grad_out = torch.randn(q64.shape[:3] + (v64.shape[-1],), dtype=torch.float64, device="cuda")
    ref = dense_attention_kernel(q64, k64, v64, dense_mask)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), grad_out)
    valid = (segments > 0)[:, None, :, None]

    for name, fn, mask in (("flex", flex_attention_kernel, block_mask), ("dense", dense_attention_kernel, dense_mask)):
        q, k, v = (t.detach().to(dtype).requires_grad_(True) for t in (q64, k64, v64))
        out = fn(q, k, v, mask)
        grads = torch.autograd.grad(out, (q, k, v), grad_out.to(dtype))
        diff = ((out.double() - ref) * valid).abs().max().item()
        assert diff <= atol, f"{name} {layer_type} {dtype}: max |out - fp64 ref| = {diff}"
        for label, g, g_ref in zip("qkv", grads, ref_grads):
            scale = g_ref.abs().max().item()
            gdiff = (g.double() - g_ref).abs().max().item()
            assert gdiff <= atol * max(1.0, scale), f"{name} {layer_type} {dtype}: d{label} off by {gdiff} (max {scale})"


def _model_flex_vs_dense_on_cuda(hf_dir: str) -> dict:
    """In a fresh CUDA process: the tiny model with dense attention, with flex, and with flex under full recompute
    (the GPU training configuration), fp32, same weights and packed batch: per flex variant, max |logit diff| vs
    dense and the largest gradient difference relative to the gradient's max."""
    from gemma4vl.runtime.distributed import destroy_model_parallel, initialize_model_parallel
    from gemma4vl.testing.megatron_harness import load_megatron
    from gemma4vl.testing.fixtures import build_config

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    initialize_model_parallel("cuda")
    try:
        batch = _packed_model_batch(build_config("tiny-moe"))
        kwargs = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in batch.model_kwargs().items()}
        labels = torch.where(batch.segment_ids > 0, torch.roll(batch.input_ids, -1, 1), -100).cuda()
        recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
        variants = {"dense": dict(attention_kernel="dense"), "flex": dict(attention_kernel="flex"),
                    "flex, full recompute": dict(attention_kernel="flex", **recompute)}
        results = {}
        for name, fields in variants.items():
            model = load_megatron(hf_dir, **fields)[1][0].cuda().train()
            logits = model(**kwargs)
            loss = model(**kwargs, labels=labels).sum()
            loss.backward()
            results[name] = (logits.detach().cpu(), {n: p.grad.detach().cpu() for n, p in model.named_parameters()
                                                     if p.grad is not None})
            del model
        valid = batch.segment_ids > 0
        ref_logits, ref_grads = results.pop("dense")
        out = {"n_grads": len(ref_grads)}
        for name, (logits, grads) in results.items():
            out[name] = {
                "logit_diff": (logits - ref_logits)[valid].abs().max().item(),
                "grad_rel": max((grads[n] - g).abs().max().item() / max(g.abs().max().item(), 1e-12)
                                for n, g in ref_grads.items()),
                "n_grads": len(grads),
            }
        return out
    finally:
        destroy_model_parallel()


@pytest.mark.gpu
def test_cuda_model_flex_equals_dense_forward_and_backward(tiny_ckpt_dir):
    from gemma4vl.testing.distributed import run_distributed

    # A fresh process: this pytest process runs Megatron on CPU (one device per process).
    [result] = run_distributed(_model_flex_vs_dense_on_cuda, 1, str(tiny_ckpt_dir), backend=None, uses_cuda=True,
                               timeout=600)
    assert result["n_grads"] > 20
    for name in ("flex", "flex, full recompute"):
        assert result[name]["n_grads"] == result["n_grads"], result
        assert result[name]["logit_diff"] <= 1e-4, result
        assert result[name]["grad_rel"] <= 1e-3, result
