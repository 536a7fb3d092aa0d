"""Optional end-of-run check that the exported checkpoint computes what the trained model computes.

On a validation prompt (with its image), the trained Megatron model's logits are compared with those of the
export reloaded in ``transformers`` (on the host, in float32). Off by default (``export.verify_logits``): the
reload needs the whole model in host memory, which suits the tiny and small models of tests and demos.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from gemma4vl.training.answers import Probe
from gemma4vl.training.metrics import MetricsLog


@torch.no_grad()
def megatron_logits(model, probe: Probe, image_token_id: int) -> torch.Tensor:
    """Full-vocabulary logits [1, s, V] of the prompt of ``probe`` (every rank takes part)."""
    batch = probe.batch(image_token_id).to(next(model.parameters()).device)
    model.eval()
    return model(**batch.model_kwargs(), runtime_gather_output=True).float().cpu()


@torch.no_grad()
def hf_logits(export_dir: str | Path, probe: Probe, image_token_id: int,
              adapter_dir: str | Path | None = None) -> torch.Tensor:
    """The same logits from the export, reloaded with transformers (float32, eager attention); with
    ``adapter_dir``: ``export_dir`` is the base checkpoint and the PEFT adapter is loaded onto it."""
    from transformers import Gemma4ForConditionalGeneration

    model = Gemma4ForConditionalGeneration.from_pretrained(str(export_dir), dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    return model(**probe.batch(image_token_id).hf_kwargs()).logits.float()


def verify_export_logits(model, probe, image_token_id: int, export_dir, metrics: MetricsLog, step: int,
                         atol: float, adapter_dir=None) -> float | None:
    """Compare (see module docstring); rank 0 records ``{"step", "export_max_logit_diff", ...}`` (with
    ``adapter_dir``: ``adapter_max_logit_diff``, the PEFT adapter loaded onto the base checkpoint ``export_dir``) in
    ``metrics`` for the exported ``step`` and raises if the difference exceeds ``atol``. Returns the difference on rank 0, None elsewhere."""
    ours = megatron_logits(model, probe, image_token_id)
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    theirs = hf_logits(export_dir, probe, image_token_id, adapter_dir=adapter_dir)
    diff = (ours - theirs).abs().max().item()
    kind, what = ("adapter", f"the PEFT adapter {adapter_dir} on {export_dir}") if adapter_dir else (
        "export", f"the export in {export_dir}")
    metrics.append({"step": step, f"{kind}_max_logit_diff": diff, f"{kind}_logit_scale": theirs.abs().max().item()})
    print(f"{kind} check: max |logit difference| between the trained model and {what}: {diff:.3g} "
          f"(tolerance {atol:g})", flush=True)
    if diff > atol:
        raise RuntimeError(f"{what} does not reproduce the trained model: max |logit difference| "
                           f"{diff:.3g} > {atol:g}")
    return diff


def synthetic_probe(hf_dir: str | Path, seed: int = 0, text_tokens: int = 24) -> tuple[Probe, int]:
    """(probe, image token id): a deterministic prompt for checking an export without the run's data: random text
    tokens around one random image (a square of ``2k x 2k`` patches, so 4 soft tokens with pooling ``k``)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(hf_dir))
    vision = config.vision_config
    p, k = vision.patch_size, vision.pooling_kernel_size
    side = 2 * k
    g = torch.Generator().manual_seed(seed)
    special = {config.image_token_id, config.boi_token_id, config.eoi_token_id, config.video_token_id,
               config.audio_token_id, config.text_config.pad_token_id}
    ids = torch.randint(4, config.text_config.vocab_size, (text_tokens,), generator=g)
    for token in special:
        ids[ids == token] = 5
    image = [config.boi_token_id] + [config.image_token_id] * (side * side // (k * k)) + [config.eoi_token_id]
    prompt = torch.cat([ids[:4], torch.tensor(image), ids[4:]])
    pixels = torch.rand(1, side * side, 3 * p * p, generator=g)
    yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    positions = torch.stack([xx.flatten(), yy.flatten()], -1)[None]
    return Probe(prompt.numpy(), pixels, positions, question="", reference="", image=None), config.image_token_id
