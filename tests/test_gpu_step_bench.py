"""bench/gpu_step.py works: its dry run (CPU, toy sizes) runs every section and reports sound numbers; a failing
section leaves the others' rows and the table; its model-FLOPs formula gives the issue's 26B-A4B figures.

The GPU numbers themselves come from running the script on a GPU (docs/performance.md); none are asserted here.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_step.py"


def _bench_module():
    spec = importlib.util.spec_from_file_location("gpu_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _run(tmp_path, *args, timeout=300):
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--json", str(out), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    return proc, (json.loads(out.read_text()) if out.exists() else None)


def test_model_flops_formula_gives_the_issue_figures():
    """N = 3.822B active parameters and F = 6N + 3A(S) = 25 GFLOP/token at 4k for gemma-4-26B-A4B (issue 15)."""
    bench = _bench_module()
    _, config = bench.text_dict_real(num_layers=30)
    text = config["text_config"]
    assert text["layer_types"].count("full_attention") == 5
    assert bench.active_params(text) == 3_821_830_144
    # 25 sliding layers: 4 * 16 * 256 * 896.125 keys; 5 full layers: 4 * 16 * 512 * 2048.5 keys.
    a = bench.attention_flops_per_token(text, 4096)
    assert a == pytest.approx(25 * 4 * 16 * 256 * (1024 * 1025 / 2 + 3072 * 1024) / 4096 + 5 * 4 * 16 * 512 * 2048.5)
    assert a / 1e9 == pytest.approx(0.7027, abs=1e-4)
    assert bench.model_flops_per_token(text, 4096) / 1e9 == pytest.approx(25.039, abs=1e-3)
    # The 4-layer proxy of section (b): 3 sliding + 1 full layer, the same widths.
    _, proxy = bench.text_dict_real(num_layers=4)
    assert proxy["text_config"]["layer_types"] == ["sliding_attention"] * 3 + ["full_attention"]
    assert bench.active_params(proxy["text_config"]) == 3 * 100_384_768 + 114_802_688 + 738_197_504


def test_section_b_takes_the_faster_kernel_per_layer_type_from_section_a():
    from types import SimpleNamespace

    bench = _bench_module()

    def choose(sliding_ms, full_ms, kernel=None, dry_run=False):
        a = {"sliding_attention": {"ms": sliding_ms}, "full_attention": {"ms": full_ms}}
        return bench.choose_kernel(SimpleNamespace(kernel=kernel, dry_run=dry_run, results={"a": a}))[0]

    assert choose({"flex": 1.0, "dense sdpa": 5.0}, {"flex": 2.0, "dense sdpa": 3.0}) == "flex"
    assert choose({"flex": 1.0, "dense sdpa": 5.0}, {"flex": 4.0, "dense sdpa": 3.0}) == "flex_sliding"
    assert choose({"flex": 1.0, "dense sdpa": 5.0}, {"dense sdpa": 3.0}) == "flex_sliding"  # full flex failed
    assert choose({"dense sdpa": 5.0}, {"flex": 2.0, "dense sdpa": 3.0}) == "dense"
    assert choose({"flex": 1.0, "dense sdpa": 5.0}, {"flex": 2.0}, kernel="dense") == "dense"
    assert choose({}, {}, dry_run=True) == "dense"
    assert bench.choose_kernel(SimpleNamespace(kernel=None, dry_run=False, results={}))[0] == "flex"


def test_dry_run_runs_every_section_and_reports_sound_numbers(tmp_path):
    proc, result = _run(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert result["failed"] == [] and result["sections"] == ["a", "b", "c", "d"] and result["complete"] is True
    assert "DRY RUN" in proc.stdout and proc.stdout.count("\n") > 20
    sections_in_table = {row["section"] for row in result["rows"]}
    assert sections_in_table == {"a", "b", "c", "d"}
    r = result["results"]

    # (a) flex (eager CPU forward) equals dense SDPA on the packed 256-token row, and visits fewer pairs.
    for layer_type in ("sliding_attention", "full_attention"):
        assert r["a"][layer_type]["max_abs_diff[flex]"] <= 1e-5
    sliding, full = r["a"]["sliding_attention"], r["a"]["full_attention"]
    assert 0 < sliding["allowed_pair_fraction"] < full["allowed_pair_fraction"] < 0.5
    assert r["a"]["mode"] == "fwd"

    # (b) 1 warm-up + 2 timed steps of 256 tokens; losses finite, starting at ln(vocab) (random init), going down
    # under the SGD update; model FLOPs by the formula.
    b = r["b"]
    assert b["tokens_per_step"] == 256 and b["steps_timed"] == 2 and len(b["losses"]) == 3
    assert all(math.isfinite(x) for x in b["losses"])
    assert abs(b["losses"][0] - b["ln_vocab"]) < 0.05
    assert b["losses"][-1] < b["losses"][0]
    bench = _bench_module()
    _, toy = bench.text_dict_toy()
    assert b["flops_per_token"] == pytest.approx(bench.model_flops_per_token(toy["text_config"], 256))
    assert b["tokens_per_s"] == pytest.approx(256 / b["step_s"])
    assert b["tflops"] == pytest.approx(b["tokens_per_s"] * b["flops_per_token"] / 1e12)

    # (c) transformers on the same batch: its loss starts at ln(vocab) too; the ratio is ours / theirs.
    c = r["c"]
    assert abs(c["losses"][0] - b["ln_vocab"]) < 0.05
    assert c["ours_over_transformers"] == pytest.approx(b["tokens_per_s"] / c["tokens_per_s"])

    # (d) the flex model's logits and loss equal the dense reference's (fp32, same weights).
    d = r["d"]
    assert d["flex fp32"]["max_logit_diff"] <= 1e-5
    assert d["flex fp32"]["loss"] == pytest.approx(d["ref_loss"], rel=1e-6)
    assert math.isfinite(d["ref_loss"]) and d["logit_range"] > 0.1


def test_a_failing_section_leaves_the_others_and_the_table(tmp_path):
    # 20 tokens cannot hold the toy 16-token images in 3 samples: (a) fails, (d) (its own input) still runs.
    proc, result = _run(tmp_path, "--seq", "20", "--sections", "a,d")
    assert proc.returncode == 1
    assert result["failed"] == ["a"]
    assert "cannot hold a 16-token image" in result["results"]["a"]["error"]
    assert result["results"]["d"]["flex fp32"]["max_logit_diff"] <= 1e-5
    assert "section (a) FAILED" in proc.stdout and "flex fp32 vs dense fp32" in proc.stdout


def test_unknown_section_is_refused():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--sections", "a,e"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--sections: unknown ['e']" in proc.stderr


def test_gpu_check_script_runs_the_gpu_tests_then_the_bench_in_its_budget(tmp_path):
    """bench/gpu_check.sh on this CPU machine: versions recorded, the gpu-marked attention tests collected and
    skipped (exit 0), then the bench refuses to run without CUDA (exit 2), which the script passes on; the time
    left for the bench is the 470 s budget minus what the tests took, its deadline 100 s before that."""
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), str(out), sys.executable], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_step.log", "gpu_tests.log", "versions.txt"]
    assert "no CUDA device" in (out / "versions.txt").read_text()
    assert re.search(r"\b5 skipped, \d+ deselected", (out / "gpu_tests.log").read_text())  # the 5 gpu tests
    assert "== tests: exit status 0 after" in proc.stdout
    left = int(proc.stdout.split("== bench/gpu_step.py (at most ")[1].split(" s;")[0])
    deadline = int(proc.stdout.split("sections not started by ")[1].split(" s ")[0])
    assert 300 <= left <= 470 and deadline == left - 100
    assert "no CUDA device: run with --dry-run" in (out / "gpu_step.log").read_text()
