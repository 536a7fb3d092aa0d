"""Optional end-of-run check that the exported checkpoint computes what the trained model computes.

On a validation prompt (with its image), the trained Megatron model's logits are compared with those of the
export reloaded in ``transformers`` (on the host, in float32). Off by default (``export.verify_logits``): the
reload needs the whole model in host memory, which suits the tiny and small models of tests and demos.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist


@torch.no_grad()
def megatron_logits(model, probe, image_token_id: int) -> torch.Tensor:
    """Full-vocabulary logits [1, s, V] of the prompt of ``probe`` (every rank takes part)."""
    device = next(model.parameters()).device
    ids = torch.as_tensor(probe.prompt_ids, dtype=torch.long, device=device)[None]
    model.eval()
    logits = model(input_ids=ids, position_ids=torch.arange(ids.shape[1], device=device)[None],
                   segment_ids=torch.ones_like(ids), mm_token_type_ids=(ids == image_token_id).long(),
                   pixel_values=None if probe.pixel_values is None else probe.pixel_values.to(device),
                   image_position_ids=None if probe.image_position_ids is None else probe.image_position_ids.to(device),
                   runtime_gather_output=True)
    return logits.float().cpu()


@torch.no_grad()
def hf_logits(export_dir: str | Path, probe, image_token_id: int) -> torch.Tensor:
    """The same logits from the export, reloaded with transformers (float32, eager attention)."""
    from transformers import Gemma4ForConditionalGeneration

    model = Gemma4ForConditionalGeneration.from_pretrained(str(export_dir), dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    ids = torch.as_tensor(probe.prompt_ids, dtype=torch.long)[None]
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=(ids == image_token_id).long())
    if probe.pixel_values is not None:
        kwargs.update(pixel_values=probe.pixel_values, image_position_ids=probe.image_position_ids)
    return model(**kwargs).logits.float()


def verify_export_logits(model, probe, image_token_id: int, export_dir, run_dir, atol: float) -> float | None:
    """Compare (see module docstring); rank 0 records ``{"export_max_logit_diff": ...}`` in metrics.jsonl and
    raises if the difference exceeds ``atol``. Returns the difference on rank 0, None elsewhere."""
    ours = megatron_logits(model, probe, image_token_id)
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    theirs = hf_logits(export_dir, probe, image_token_id)
    diff = (ours - theirs).abs().max().item()
    with (Path(run_dir) / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"export_max_logit_diff": diff, "export_logit_scale": theirs.abs().max().item()}) + "\n")
    print(f"export check: max |logit difference| between the trained model and the reloaded export: {diff:.3g} "
          f"(tolerance {atol:g})", flush=True)
    if diff > atol:
        raise RuntimeError(f"the export in {export_dir} does not reproduce the trained model: max |logit "
                           f"difference| {diff:.3g} > {atol:g}")
    return diff
