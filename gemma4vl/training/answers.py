"""The model's answers to a few validation questions, shown at each evaluation (wandb table, and stdout).

Greedy decoding with the Megatron model itself: the prompt (every message before the last assistant turn, then
the generation prompt, exactly as the data pipeline renders it for inference) is run through the full model once
per new token (no KV cache: answers are a few tokens). Every tensor-parallel / expert-parallel rank takes part;
with pipeline parallelism the stages would need the schedule, so answers are skipped there (said once).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from gemma4vl.data.batch import Batch
from gemma4vl.data.images import to_pixel_values


@dataclass
class Probe:
    """One validation question prepared for decoding."""

    prompt_ids: np.ndarray
    """Prompt token ids (images expanded to their soft tokens)."""

    pixel_values: torch.Tensor | None
    """The prompt's images, as the model takes them."""

    image_position_ids: torch.Tensor | None
    """Patch positions of those images."""

    question: str
    """The last user message's text."""

    reference: str
    """The reference answer."""

    image: object
    """The first image (uint8 HWC tensor) for display, or None."""

    def batch(self, image_token_id: int) -> Batch:
        """The prompt as the model's one-row input (:meth:`Batch.from_prompt`)."""
        return Batch.from_prompt(self.prompt_ids, image_token_id, self.pixel_values, self.image_position_ids)


def load_probes(data_cfg, count: int) -> list[Probe]:
    """The first ``count`` questions of the validation split (nothing when there is no validation split)."""
    if count <= 0 or data_cfg.validation_split is None:
        return []
    rows, _ = data_cfg.pipeline("validation")
    probes = []
    for index in range(min(count, len(rows.reader))):
        conv = rows.conversation(index)
        ids, images, answer = rows.encoder.encode_prompt(conv, rows.loader)
        pixels = positions = None
        if images:
            pixels, positions = to_pixel_values(images, rows.encoder.settings)
        last_user = [m for m in conv.messages if m["role"] == "user"][-1]["content"]
        question = last_user if isinstance(last_user, str) else " ".join(
            p.get("text", "") for p in last_user if p.get("type") == "text")
        probes.append(Probe(ids, pixels, positions, question.strip(), answer.strip(),
                            images[0].pixels if images else None))
    return probes


@torch.no_grad()
def greedy_answer(model, probe: Probe, image_token_id: int, stop_ids: set[int], max_new_tokens: int = 8) -> list[int]:
    """Token ids the model generates for ``probe`` (greedy, up to a stop id or ``max_new_tokens``)."""
    prompt = probe.batch(image_token_id).to(next(model.parameters()).device)
    generated: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(**prompt.model_kwargs(), runtime_gather_output=True)
        token = int(logits[0, -1].argmax())
        if token in stop_ids:
            break
        generated.append(token)
        ids = torch.cat([prompt.input_ids[0], prompt.input_ids.new_tensor([token])])
        prompt = Batch.from_prompt(ids, image_token_id, prompt.pixel_values, prompt.image_position_ids)
    return generated
