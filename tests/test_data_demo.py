"""The synthetic VQA demo set: deterministic bytes, a closed answer vocabulary, learnable labels, a CLI."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from gemma4vl.data.demo import ANSWERS, COLOURS, NUMBER_WORDS, main, write_demo_dataset


def _digest(directory) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        h.update(path.relative_to(directory).as_posix().encode() + path.read_bytes())
    return h.hexdigest()


def test_demo_is_deterministic_and_consistent(tmp_path):
    a = write_demo_dataset(tmp_path / "a", num_train=60, num_val=20, seed=3)
    b = write_demo_dataset(tmp_path / "b", num_train=60, num_val=20, seed=3)
    assert _digest(a.path) == _digest(b.path)
    c = write_demo_dataset(tmp_path / "c", num_train=60, num_val=20, seed=4)
    assert _digest(a.path) != _digest(c.path)
    rows = [json.loads(line) for line in open(a.path / "train.jsonl")]
    val = [json.loads(line) for line in open(a.path / "validation.jsonl")]
    assert len(rows) == 60 and len(val) == 20
    assert all(len(r["messages"]) == 2 for r in val) and any(len(r["messages"]) == 4 for r in rows)
    for row in rows + val:
        answers = [m["content"][0]["text"] for m in row["messages"] if m["role"] == "assistant"]
        assert set(answers) <= set(ANSWERS)
        assert set(answers) <= {row["colour"], NUMBER_WORDS[row["count"]], row["shape"]}
        image = Image.open(a.path / row["messages"][0]["content"][0]["image"])
        assert image.size == (64, 64)
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3).astype(int)
        # the named colour is really there: some pixel is within 40 of it per channel
        assert (np.abs(pixels - COLOURS[row["colour"]]).max(axis=1) <= 40).any()


def test_demo_refuses_to_overwrite_and_cli(tmp_path, capsys):
    write_demo_dataset(tmp_path / "d", num_train=5, num_val=5)
    with pytest.raises(FileExistsError, match="not empty"):
        write_demo_dataset(tmp_path / "d", num_train=5, num_val=5)
    assert main(["--out", str(tmp_path / "d"), "--num-train", "5", "--num-val", "5"]) == 2
    assert main(["--out", str(tmp_path / "e"), "--num-train", "7", "--num-val", "3"]) == 0
    assert "wrote 7 train + 3 validation rows" in capsys.readouterr().out
    out = subprocess.run([sys.executable, "-m", "gemma4vl.data.demo", "--out", str(tmp_path / "f"),
                          "--num-train", "4", "--num-val", "2"], capture_output=True, text=True, check=True)
    assert "wrote 4 train + 2 validation rows" in out.stdout and "RuntimeWarning" not in out.stderr
