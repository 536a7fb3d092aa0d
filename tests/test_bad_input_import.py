"""Bad checkpoints at import (issue 14, part 2): every case fails before training with a message naming the file
or tensor, and leaves the checkpoint byte-identical.

Before: weights that were a dangling symlink (an HF cache snapshot with a missing blob), a symlink loop, or named
other than Megatron-Bridge's rule (model.safetensors, model.safetensors.index.json, model-*-of-*.safetensors)
made Megatron-Bridge skip the import silently; the run trained from uninitialised memory and died with a NaN loss
naming nothing. A NaN / Inf inside a tensor gave the same symptom."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gemma4vl.bridge import CheckpointError, precheck_hf_checkpoint, read_hf_config
from gemma4vl.bridge.checkpoint import weight_files
from gemma4vl.testing.megatron_harness import load_megatron

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = "model.safetensors"
L0 = "model.language_model.layers.0."


def snapshot(root: Path) -> dict:
    """Every entry under ``root``: a symlink's target, a file's sha256."""
    out = {}
    for p in sorted(root.rglob("*")):
        key = str(p.relative_to(root))
        out[key] = ("link", os.readlink(p)) if p.is_symlink() else (
            ("file", hashlib.sha256(p.read_bytes()).hexdigest()) if p.is_file() else ("dir",))
    return out


# ------------------------------------------------------------------ damage makers: (what the message must name)
def dangling(ckpt_copy):
    """An HF cache snapshot whose blob is missing."""
    (ckpt_copy / WEIGHTS).unlink()
    (ckpt_copy / WEIGHTS).symlink_to("../../blobs/0123abcd")
    return [str(ckpt_copy / WEIGHTS), "../../blobs/0123abcd", "incomplete download / HF cache blob missing"]


def loop(ckpt_copy):
    (ckpt_copy / WEIGHTS).unlink()
    (ckpt_copy / WEIGHTS).symlink_to("shard.link")
    (ckpt_copy / "shard.link").symlink_to(WEIGHTS)
    return [str(ckpt_copy / WEIGHTS), "symlink loop", "ELOOP"]


def sharded_dangling(ckpt_copy):
    """An index whose second shard is a dangling symlink."""
    tensors = load_file(ckpt_copy / WEIGHTS)
    (ckpt_copy / WEIGHTS).unlink()
    names = sorted(tensors)
    half = len(names) // 2
    files = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for file, keys in files.items():
        save_file({k: tensors[k] for k in keys}, ckpt_copy / file, metadata={"format": "pt"})
    (ckpt_copy / "model-00002-of-00002.safetensors").unlink()
    (ckpt_copy / "model-00002-of-00002.safetensors").symlink_to("/nonexistent/blobs/feed")
    index = {"metadata": {}, "weight_map": {k: f for f, keys in files.items() for k in keys}}
    (ckpt_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    return ["model-00002-of-00002.safetensors", "/nonexistent/blobs/feed", "HF cache blob missing"]


def index_lists_missing_shard(ckpt_copy):
    keys = load_file(ckpt_copy / WEIGHTS).keys()
    index = {"metadata": {}, "weight_map": {k: "model-00001-of-00002.safetensors" for k in keys}}
    (ckpt_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    return ["model.safetensors.index.json", "model-00001-of-00002.safetensors", "does not exist"]


def renamed_for_peft(ckpt_copy):
    (ckpt_copy / WEIGHTS).rename(ckpt_copy / "weights.safetensors")
    return ["weights.safetensors", "Megatron-Bridge", "model-*-of-*.safetensors"]


# (case, damage, megatron_bridge_names): the pre-check fails, no weight read, no model built
PRECHECK_CASES = [
    ("dangling-symlink", dangling, False),
    ("symlink-loop", loop, False),
    ("sharded-dangling-symlink", sharded_dangling, False),
    ("index-lists-missing-shard", index_lists_missing_shard, False),
    ("renamed-weights-with-peft", renamed_for_peft, True),
]


@pytest.mark.parametrize("case,damage,mb_names", PRECHECK_CASES, ids=[c[0] for c in PRECHECK_CASES])
def test_precheck_names_the_file(ckpt_copy, case, damage, mb_names):
    culprits = damage(ckpt_copy)
    before = snapshot(ckpt_copy)
    with pytest.raises(CheckpointError) as e:
        precheck_hf_checkpoint(read_hf_config(ckpt_copy), megatron_bridge_names=mb_names)
    for culprit in culprits:
        assert culprit in str(e.value), str(e.value)
    assert snapshot(ckpt_copy) == before


def test_renamed_weights_pass_the_precheck_for_full_finetuning(ckpt_copy):
    renamed_for_peft(ckpt_copy)
    cfg = read_hf_config(ckpt_copy)
    precheck_hf_checkpoint(cfg)  # our reader: every *.safetensors; raises on any problem
    assert cfg.path == ckpt_copy / "config.json" and weight_files(ckpt_copy) == (None, ["weights.safetensors"])


# ------------------------------------------------------------------ at import: non-finite values, unwritten params
def _poke(ckpt_copy, name, index, value):
    tensors = load_file(ckpt_copy / WEIGHTS)
    tensors[name][index] = value
    save_file(tensors, ckpt_copy / WEIGHTS, metadata={"format": "pt"})


# (case, HF tensor, index poked, value, what the message names)
NONFINITE_CASES = [
    ("nan-in-attention", L0 + "self_attn.q_proj.weight", (3, 5), float("nan"), [L0 + "self_attn.q_proj.weight"]),
    ("inf-in-norm", "model.language_model.norm.weight", (7,), float("inf"), ["model.language_model.norm.weight"]),
    ("inf-in-grouped-expert", L0 + "experts.down_proj", (2, 3, 4), float("-inf"),
     [L0 + "experts.down_proj -> Megatron parameter", "mlp.experts.fc2_weight [expert 2]"]),
]


@pytest.mark.parametrize("case,name,index,value,culprits", NONFINITE_CASES, ids=[c[0] for c in NONFINITE_CASES])
def test_non_finite_weight_names_the_tensor(megatron_cpu, ckpt_copy, case, name, index, value, culprits):
    _poke(ckpt_copy, name, index, value)
    before = snapshot(ckpt_copy)
    with pytest.raises(CheckpointError) as e:
        load_megatron(ckpt_copy)
    assert "non-finite" in str(e.value)
    for culprit in culprits:
        assert culprit in str(e.value), str(e.value)
    assert snapshot(ckpt_copy) == before


def test_unwritten_parameter_is_an_error(megatron_cpu, ckpt_copy, monkeypatch):
    """A conversion task that writes nothing (its mapping returns no tensor): the import fails naming the
    parameter instead of leaving it at its initial value."""
    from gemma4vl.bridge.gemma4vl_bridge import Gemma4VLBridge

    build = Gemma4VLBridge.build_conversion_tasks

    def dropping(self, *args, **kwargs):
        tasks = build(self, *args, **kwargs)
        for task in tasks:
            if task is not None and task.global_param_name.endswith("final_layernorm.weight"):
                monkeypatch.setattr(task.mapping, "hf_to_megatron", lambda *a, **k: None)
        return tasks

    monkeypatch.setattr(Gemma4VLBridge, "build_conversion_tasks", dropping)
    with pytest.raises(CheckpointError) as e:
        load_megatron(ckpt_copy)
    assert "wrote no value into 1 Megatron parameter(s)" in str(e.value)
    assert "language_model.decoder.final_layernorm.weight" in str(e.value)


# ------------------------------------------------------------------ the recipe: full SFT without Megatron-Bridge's rule
def test_full_finetuning_imports_weights_megatron_bridge_would_skip(ckpt_copy, tmp_path):
    """weights.safetensors (not a name Megatron-Bridge recognises): full finetuning imports it through our
    pre-wrap hook. With lr = 0 the one step leaves the weights as imported, so the export must equal the
    checkpoint tensor for tensor; before, the run died with a NaN loss."""
    from gemma4vl.data.demo import write_demo_dataset

    (ckpt_copy / WEIGHTS).rename(ckpt_copy / "weights.safetensors")
    data = tmp_path / "data"
    write_demo_dataset(data, num_train=16, num_val=4, overwrite=True)
    before = snapshot(ckpt_copy)
    run_dir = tmp_path / "run"
    args = [f"hydra.run.dir={run_dir}", f"model.hf_path={ckpt_copy}", f"data.path={data}",
            "data.seq_length=512", "data.num_workers=0", "data.persistent_workers=false",
            "trainer.train_iters=1", "trainer.global_batch_size=2", "trainer.log_interval=1",
            "trainer.eval_interval=null", "checkpoint.save_interval=1", "checkpoint.keep_last=null",
            "optim.lr=0", "optim.min_lr=0", "optim.warmup_iters=0"]
    proc = subprocess.run([sys.executable, "-m", "recipes.finetune", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert len(losses) == 1 and 0.0 < losses[0] < 20.0
    source = load_file(ckpt_copy / "weights.safetensors")
    exported = {}
    for shard in sorted((run_dir / "hf_export").glob("*.safetensors")):
        exported.update(load_file(shard))
    assert sorted(exported) == sorted(source)
    assert [k for k in source if not torch.equal(source[k], exported[k])] == []
    assert snapshot(ckpt_copy) == before
