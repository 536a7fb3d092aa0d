"""The CPU demo (`make demo`): finetune the tiny Gemma 4 VL model on the synthetic VQA set and show that its
answers to held-out questions improve.

    python -m recipes.demo [hydra overrides for recipes.finetune ...]

1. writes (first time only) the tiny random checkpoint and the demo dataset the default config points at;
2. answers held-out questions with the untrained checkpoint (transformers ``generate``, greedy);
3. runs the real recipe, ``python -m recipes.finetune`` (Megatron-Core model, Megatron-Bridge training loop,
   checkpoints, HF export at the end);
4. reloads the export in transformers, answers the same questions, prints both answer sets, the accuracy before
   and after, and where everything is.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

NUM_QUESTIONS = 24


def compose(overrides: list[str]):
    """The recipe's composed config (to find its paths), without running it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from gemma4vl.config import register_configs
    from gemma4vl.config.compose import to_run_config

    register_configs()
    import gemma4vl.conf

    conf = Path(gemma4vl.conf.__file__).parent  # conf/ of the checkout, or the installed package's copy
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = hydra_compose("config", overrides=overrides, return_hydra_config=True)
        cfg.hydra.runtime.output_dir = cfg.hydra.run.dir
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
        return to_run_config(cfg)


def held_out_questions(data_dir: Path, n: int) -> list[dict]:
    """The first ``n`` validation conversations: image path, question, reference answer."""
    rows = []
    for line in (data_dir / "validation.jsonl").read_text().splitlines()[:n]:
        row = json.loads(line)
        user = next(m for m in row["messages"] if m["role"] == "user")
        image = next(p for p in user["content"] if p["type"] == "image")
        question = next(p["text"] for p in user["content"] if p["type"] == "text")
        answer = next(m for m in row["messages"] if m["role"] == "assistant")["content"]
        answer = answer if isinstance(answer, str) else "".join(p.get("text", "") for p in answer)
        rows.append({"image": str(data_dir / image["image"]),
                     "question": question, "answer": answer.strip()})
    return rows


def answer_questions(model_dir: Path, questions: list[dict]) -> list[str]:
    """Greedy answers of the HF checkpoint in ``model_dir`` (max 8 new tokens, up to the end of turn)."""
    from PIL import Image
    from transformers import AutoProcessor, Gemma4ForConditionalGeneration

    processor = AutoProcessor.from_pretrained(str(model_dir))
    model = Gemma4ForConditionalGeneration.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    answers = []
    for q in questions:
        messages = [{"role": "user", "content": [{"type": "image", "image": Image.open(q["image"]).convert("RGB")},
                                                 {"type": "text", "text": q["question"]}]}]
        inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                               return_dict=True, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        text = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        answers.append(text.strip())
    return answers


def accuracy(answers: list[str], questions: list[dict]) -> float:
    return sum(a.lower() == q["answer"].lower() for a, q in zip(answers, questions)) / len(questions)


def main(argv: list[str] | None = None) -> int:
    overrides = list(sys.argv[1:] if argv is None else argv)
    cfg = compose(overrides)
    from recipes.inputs import prepare_demo_inputs

    start = time.time()
    prepare_demo_inputs(cfg)
    model_dir, data_dir = Path(cfg.model.hf_path), Path(cfg.data.path)
    questions = held_out_questions(data_dir, NUM_QUESTIONS)
    print(f"[demo] tiny checkpoint: {model_dir}\n[demo] demo dataset: {data_dir}", flush=True)
    print(f"[demo] answering {len(questions)} held-out questions with the untrained model ...", flush=True)
    before = answer_questions(model_dir, questions)

    print(f"[demo] finetuning: python -m recipes.finetune {' '.join(overrides)}", flush=True)
    proc = subprocess.run([sys.executable, "-m", "recipes.finetune", *overrides])
    if proc.returncode != 0:
        print(f"[demo] the finetuning run failed (exit status {proc.returncode})", file=sys.stderr)
        return proc.returncode
    export_dir = Path(cfg.export.dir)
    print(f"[demo] answering the same questions with the exported model ({export_dir}) ...", flush=True)
    after = answer_questions(export_dir, questions)

    width = max(len(q["question"]) for q in questions)
    print(f"\n{'question':<{width}}  {'expected':<9} {'before':<22} after")
    for q, b, a in zip(questions, before, after):
        mark = "ok" if a.lower() == q["answer"].lower() else ""
        print(f"{q['question']:<{width}}  {q['answer']:<9} {b[:20]!r:<22} {a!r} {mark}")
    acc_before, acc_after = accuracy(before, questions), accuracy(after, questions)
    from gemma4vl.training.metrics import read_metrics

    metrics = [m for m in read_metrics(cfg.run_dir) if "loss" in m]
    val = [m for m in read_metrics(cfg.run_dir) if "val_loss" in m]
    print(f"\n[demo] held-out accuracy: {acc_before:.0%} before -> {acc_after:.0%} after finetuning")
    if metrics:
        print(f"[demo] training loss: {metrics[0]['loss']:.3f} (step 1) -> {metrics[-1]['loss']:.3f} "
              f"(step {metrics[-1]['step']})")
    if val:
        print(f"[demo] validation loss: {val[0]['val_loss']:.3f} (step {val[0]['step']}) -> "
              f"{val[-1]['val_loss']:.3f} (step {val[-1]['step']})")
    print(f"[demo] run directory: {cfg.run_dir} (config.yaml, metrics.jsonl, checkpoints/, hf_export/)")
    print(f"[demo] done in {time.time() - start:.0f} s")
    return 0 if acc_after > acc_before else 1


if __name__ == "__main__":
    sys.exit(main())
