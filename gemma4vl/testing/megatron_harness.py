"""Test harness: a Megatron Gemma 4 VL model imported from a Hugging Face checkpoint through the bridge, and
forward passes that work for any tensor / pipeline / expert parallel layout (also in a single process).

Used by the bridge, export and training tests; not by the library itself.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from gemma4vl.data.batch import Batch


def synthetic_batch(config, *, seed: int = 0, batch: int = 2, seq: int = 24, images: bool = True,
                    pad: int = 3) -> Batch:
    """A batch in processor format with random text, one image per row (16x16 pixels worth of patches, so
    ``(16/p)^2 / k^2`` soft tokens each) and ``pad`` padding tokens at the end of row 1."""
    g = torch.Generator().manual_seed(seed)
    text = config.text_config
    # Placeholder ids of every modality (the reference embeds video/audio placeholders as padding too).
    special = {config.image_token_id, config.boi_token_id, config.eoi_token_id, config.video_token_id,
               config.audio_token_id, config.boa_token_id, config.eoa_token_index, text.pad_token_id}
    ids = torch.randint(4, text.vocab_size, (batch, seq), generator=g)
    for tok in special:
        ids[ids == tok] = 5
    mm = torch.zeros_like(ids)
    segment = torch.ones_like(ids)
    pv = pos = None
    if images:
        vision = config.vision_config
        p, k = vision.patch_size, vision.pooling_kernel_size
        side = 16 // p
        num_soft = side * side // (k * k)
        pv = torch.rand(batch, side * side, 3 * p * p, generator=g)
        yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        pos = torch.stack([xx.flatten(), yy.flatten()], -1).expand(batch, -1, 2).clone()
        for row in range(batch):
            start = 2 + 3 * row
            ids[row, start - 1] = config.boi_token_id
            ids[row, start:start + num_soft] = config.image_token_id
            ids[row, start + num_soft] = config.eoi_token_id
            mm[row, start:start + num_soft] = 1
    if pad:
        segment[-1, seq - pad:] = 0
        ids[-1, seq - pad:] = text.pad_token_id
    positions = torch.arange(seq).expand(batch, seq).clone()
    return Batch(input_ids=ids, position_ids=positions, segment_ids=segment, mm_token_type_ids=mm,
                 pixel_values=pv, image_position_ids=pos)


def load_megatron(hf_dir: str | Path, *, params_dtype: torch.dtype = torch.float32, vision_attn: str = "eager",
                  **parallel) -> tuple[object, list]:
    """(AutoBridge, model chunks) for ``hf_dir`` with the current Megatron parallel state (initialise it first,
    e.g. with :func:`gemma4vl.runtime.distributed.initialize_model_parallel`); ``parallel`` holds provider
    fields such as ``tensor_model_parallel_size``."""
    import gemma4vl.bridge  # noqa: F401  (registers the bridge)
    from megatron.bridge import AutoBridge
    from megatron.core import parallel_state as ps

    bridge = AutoBridge.from_hf_pretrained(str(hf_dir))
    provider = bridge.to_megatron_provider(load_weights=True)
    provider.tensor_model_parallel_size = ps.get_tensor_model_parallel_world_size()
    provider.pipeline_model_parallel_size = ps.get_pipeline_model_parallel_world_size()
    provider.expert_model_parallel_size = ps.get_expert_model_parallel_world_size()
    provider.expert_tensor_parallel_size = ps.get_expert_tensor_parallel_world_size()
    provider.sequence_parallel = provider.tensor_model_parallel_size > 1
    for key, value in parallel.items():
        setattr(provider, key, value)
    provider.params_dtype = provider.pipeline_dtype = provider.autocast_dtype = params_dtype
    provider.bf16 = params_dtype == torch.bfloat16
    provider.vision_attn_implementation = vision_attn
    provider.finalize()
    model = provider.provide_distributed_model(wrap_with_ddp=False, use_cpu_initialization=True,
                                               mixed_precision_wrapper=None)
    return bridge, model


def forward_logits(model: list, batch: Batch) -> torch.Tensor:
    """Full-vocabulary logits [b, s, V] of ``batch`` on every rank (pipeline stages run through Megatron's
    schedule; the last stage's result is broadcast)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for chunk in model:
        chunk.eval()
    config = model[0].config
    b, s = batch.input_ids.shape

    def step(data_iterator, chunk):
        data = next(data_iterator)
        out = chunk(**data.model_kwargs(), runtime_gather_output=True)
        return out, lambda output, non_loss_data=True: output

    if ps.get_pipeline_model_parallel_world_size() == 1:
        with torch.no_grad():
            return model[0](**batch.model_kwargs(), runtime_gather_output=True)
    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter([batch]), model=model, num_microbatches=1,
            seq_length=s, micro_batch_size=b, forward_only=True, collect_non_loss_data=True,
        )
    logits = outputs[0] if ps.is_pipeline_last_stage() else None
    if ps.get_pipeline_model_parallel_world_size() > 1:
        holder = [logits]
        src = ps.get_pipeline_model_parallel_last_rank()
        dist.broadcast_object_list(holder, src=src, group=ps.get_pipeline_model_parallel_group())
        logits = holder[0]
    del config
    return logits


def hf_model(hf_dir: str | Path, dtype: torch.dtype = torch.float32):
    """The reference: transformers' model from ``hf_dir``, eager attention and experts (float64-capable)."""
    from transformers import Gemma4ForConditionalGeneration

    return Gemma4ForConditionalGeneration.from_pretrained(
        str(hf_dir), dtype=dtype, attn_implementation="eager", experts_implementation="eager"
    ).eval()
