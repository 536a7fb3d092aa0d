"""Nothing lost, nothing silent: each class of bad input, interruption or misconfiguration gives a clear error that
names the key / path / row (before any weight is read), and no input file is changed (issue 14).

Library-level checks here; the recipe-level ones (exit status, message, input files byte-identical) at the end run
``python -m recipes.finetune`` in a subprocess. docs/training.md has the table of what each bad input gives.
"""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from gemma4vl.config.validate import ConfigError, parse_size, validate
from gemma4vl.testing.pytest_fixtures import tiny_checkpoint

from test_bad_input_import import snapshot as tree_digest  # every file's sha256 and link target under a dir
from test_config import compose_run, hf_configs  # noqa: F401  (hf_configs: a fixture)

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("override,message", [
    ("trainer.micro_batch_size=0", "trainer.micro_batch_size=0 must be >= 1"),
    ("trainer.global_batch_size=0", "trainer.global_batch_size=0 must be >= 1"),
    ("trainer.train_iters=0", "trainer.train_iters=0 must be >= 1"),
    ("trainer.log_interval=0", "trainer.log_interval=0 must be >= 1"),
    ("trainer.eval_interval=0", "trainer.eval_interval=0 must be >= 1, or null"),
    ("trainer.eval_iters=0", "trainer.eval_iters=0 must be >= 1"),
    ("optim.lr=-1e-4", "optim.lr=-0.0001 must be >= 0"),
    ("optim.min_lr=-1e-6", "optim.min_lr=-1e-06 must be in [0, optim.lr=0.002]"),
    ("optim.min_lr=0.5", "optim.min_lr=0.5 must be in [0, optim.lr=0.002]"),
    ("optim.weight_decay=-0.1", "optim.weight_decay=-0.1 must be >= 0"),
    ("optim.adam_beta2=1.0", "optim.adam_beta2=1.0 must be in [0, 1)"),
    ("optim.adam_eps=0", "optim.adam_eps=0.0 must be > 0"),
    ("optim.clip_grad=-1", "optim.clip_grad=-1.0 must be >= 0"),
    ("optim.warmup_iters=-1", "optim.warmup_iters=-1 must be >= 0"),
    ("optim.decay_iters=0", "optim.decay_iters=0 must be >= 1"),
    ("checkpoint.save_interval=0", "checkpoint.save_interval=0 must be >= 1, or null"),
    ("checkpoint.keep_last=0", "checkpoint.keep_last=0 must be >= 1"),
    ("logger.val_image_samples=-1", "logger.val_image_samples=-1 must be >= 0"),
    ("export.max_shard_size=5 parsecs", "export.max_shard_size='5 parsecs': expected bytes or a size"),
    ("export.max_shard_size=0", "export.max_shard_size='0': must be at least 1 byte"),
])
def test_out_of_range_values_are_refused_naming_the_key(hf_configs, override, message):  # noqa: F811
    from gemma4vl.bridge import read_hf_config
    from gemma4vl.config.compose import to_run_config

    run = to_run_config(compose_run([override]))
    with pytest.raises(ConfigError) as e:
        validate(run, 1, read_hf_config(hf_configs["gemma4_tiny"]))
    assert message in str(e.value)


def test_lora_values_are_checked(hf_configs):  # noqa: F811
    from gemma4vl.bridge import read_hf_config
    from gemma4vl.config.compose import to_run_config

    run = to_run_config(compose_run(["peft=lora", "peft.rank=0", "peft.dropout=1.0"]))
    with pytest.raises(ConfigError) as e:
        validate(run, 1, read_hf_config(hf_configs["gemma4_tiny"]))
    assert "peft.rank=0 must be >= 1" in str(e.value) and "peft.dropout=1.0 must be in [0, 1)" in str(e.value)


@pytest.mark.parametrize("text,expected", [
    ("5GB", 5 * 10**9), ("5GiB", 5 * 2**30), ("500MB", 500 * 10**6), ("512MiB", 512 * 2**20), ("1.5gb", 1_500_000_000),
    ("300KB", 300_000), ("2kib", 2048), ("12345", 12345), (4096, 4096), ("1 GB", 10**9), ("7B", 7),
])
def test_sizes_parse_in_both_unit_systems(text, expected):
    assert parse_size(text) == expected


def test_validation_parses_the_shard_size_once_and_hands_the_config_on(hf_configs):  # noqa: F811
    from gemma4vl.bridge import read_hf_config
    from gemma4vl.config.compose import to_run_config

    hf = read_hf_config(hf_configs["gemma4_tiny"])
    checked = validate(to_run_config(compose_run(["export.max_shard_size=1.5GiB"])), 1, hf)
    assert (checked.max_shard_bytes, checked.data_parallel, checked.hf) == (int(1.5 * 2**30), 1, hf)
    assert validate(to_run_config(compose_run(["export.enabled=false", "export.max_shard_size=lots"])), 1,
                    hf).max_shard_bytes is None  # not exported: not parsed, not refused


def test_experiments_keep_their_own_name_and_optimizer():
    from gemma4vl.config.compose import to_run_config

    demo = to_run_config(compose_run([]))
    assert (demo.name, demo.optim.weight_decay, demo.optim.adam_beta2) == ("demo", 0.0, 0.98)
    for experiment, lr in (("gemma4_26b_sft", 1e-5), ("gemma4_26b_lora", 2e-4)):
        run = to_run_config(compose_run([f"experiment={experiment}", "data.path=x"]))
        assert run.name == experiment
        assert (run.optim.lr, run.optim.weight_decay, run.optim.adam_beta2, run.optim.warmup_iters) == (lr, 0.01,
                                                                                                        0.95, 10)
    assert to_run_config(compose_run(["experiment=tiny_ep2"])).name == "tiny_ep2"
    assert to_run_config(compose_run(["experiment=gemma4_26b_sft", "data.path=x", "name=mine"])).name == "mine"


# ------------------------------------------------------------------------------------------------ data files
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory, layout="released", dtype="float32").path


@pytest.fixture(scope="module")
def demo_rows(tmp_path_factory):
    from gemma4vl.data.demo import write_demo_dataset

    d = tmp_path_factory.mktemp("demo-rows")
    write_demo_dataset(d, num_train=40, num_val=8, overwrite=True)
    return d


def test_malformed_jsonl_line_is_named_or_skipped_and_counted(demo_rows, tmp_path):
    from gemma4vl.data.sources import load_source

    lines = (demo_rows / "train.jsonl").read_text().splitlines()
    bad = tmp_path / "data"
    bad.mkdir()
    (bad / "train.jsonl").write_text("\n".join(lines[:6] + ['{"messages": [trunc', "[1, 2]"] + lines[6:10]) + "\n")
    before = tree_digest(bad)
    with pytest.raises(ValueError) as e:
        load_source(str(bad), "train")
    assert f"{bad / 'train.jsonl'}:7: not valid JSON" in str(e.value)
    assert f"{bad / 'train.jsonl'}:8: a JSON list, expected an object" in str(e.value)
    assert "data.bad_rows=skip" in str(e.value)
    source = load_source(str(bad), "train", bad_rows="skip")
    assert len(source) == 10
    assert [s.split(": ")[0] for s in source.skipped_lines] == [f"{bad / 'train.jsonl'}:7", f"{bad / 'train.jsonl'}:8"]
    assert tree_digest(bad) == before


def test_empty_data_file_is_an_error_naming_it(tmp_path):
    from gemma4vl.data.sources import load_source
    from gemma4vl.training.preflight import check_data

    (tmp_path / "train.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"train.jsonl'\] are empty \(no rows\)"):
        load_source(str(tmp_path), "train")
    run = compose_run([f"data.path={tmp_path}", "data.processor_path=x", "data.validation_split=null"])
    from gemma4vl.config.compose import to_run_config

    with pytest.raises(ConfigError, match=rf"data.path={tmp_path} \(split 'train'\): the data files"):
        check_data(to_run_config(run).data)
    with pytest.raises(ConfigError, match=r"data.path=outputs/no/such/dir \(split 'train'\): dataset path .* does not "
                                          "exist"):
        check_data(to_run_config(compose_run(["data.path=outputs/no/such/dir", "data.processor_path=x"])).data)


def test_overlong_error_policy_names_the_row(demo_rows, ckpt):
    from gemma4vl.data.config import Gemma4VLDataConfig

    cfg = Gemma4VLDataConfig(processor_path=str(ckpt), path=str(demo_rows), split="train", max_soft_tokens=70,
                             seq_length=96, overlong="error", cache_dir=str(demo_rows.parent / "plans-overlong"))
    with pytest.raises(Exception) as e:
        cfg.build_split("train")
    assert "row 0: too_long" in str(e.value) and "data.overlong=error" in str(e.value)
    with pytest.raises(ValueError, match="data.overlong must be one of"):
        Gemma4VLDataConfig(processor_path="x", path="y", overlong="shorten")


# ------------------------------------------------------------------------------------------------ bad rows in training
def test_bad_row_monitor_counts_and_stops_at_the_ceiling(caplog):
    from gemma4vl.data.batch import RowReport
    from gemma4vl.training.bad_rows import BadRowMonitor, TooManyBadRows

    m = BadRowMonitor(max_skipped_fraction=0.1, log_limit=2)
    # 100 rows, 4 refused by the length pass: the ceiling is 10 rows, so 6 may fail while training.
    m.record(RowReport(bad_rows=[(3, "corrupt_image", "row 3: corrupt_image: truncated")], row_stats=(100, 4)))
    m.record(RowReport(bad_rows=[(5, "corrupt_image", "row 5: corrupt_image: truncated")], row_stats=(100, 4)))
    with caplog.at_level("WARNING", logger="gemma4vl.data"):
        m.step_end(1)
    assert m.total == 2 and [r.getMessage() for r in caplog.records] == [
        "step 1: skipping bad row: row 3: corrupt_image: truncated",
        "step 1: skipping bad row: row 5: corrupt_image: truncated"]
    m.record(RowReport(bad_rows=[(i, "corrupt_image", f"row {i}") for i in (7, 8, 9, 10)], row_stats=(100, 4)))
    m.step_end(2)  # 4 + 6 = 10, not above 10
    assert m.total == 6
    m.record(RowReport(bad_rows=[(11, "missing_image", "row 11")], row_stats=(100, 4)))
    with pytest.raises(TooManyBadRows, match=r"step 3: 7 rows failed while training and 4 were refused by the "
                                             r"length pass, 11 of 100 rows > data.max_skipped_fraction=0.1"):
        m.step_end(3)


def test_metrics_log_is_strict_json_when_a_step_has_no_loss(tmp_path):
    from gemma4vl.training.metrics import MetricsLog

    log = MetricsLog(tmp_path)
    log.append({"step": 1, "loss": float("nan"), "grad_norm": float("inf"), "lr": 1e-3})
    log.append({"step": 2, "loss": 2.5})
    log.append({"step": 2, "export_max_logit_diff": 0.0})
    text = (tmp_path / "metrics.jsonl").read_text()
    assert text == ('{"step": 1, "loss": null, "grad_norm": null, "lr": 0.001}\n{"step": 2, "loss": 2.5}\n'
                    '{"step": 2, "export_max_logit_diff": 0.0}\n')
    with pytest.raises(ValueError, match="needs an int 'step'"):
        log.append({"export_max_logit_diff": 0.0})
    log.truncate_after(1)  # a resume from step 1: later records (export checks included) go
    assert log.read() == [{"step": 1, "loss": None, "grad_norm": None, "lr": 0.001}]


# ------------------------------------------------------------------------------------------------ outputs / resume
def _run(overrides, run_dir):
    from gemma4vl.config.compose import to_run_config

    return to_run_config(compose_run(overrides, run_dir=run_dir))


def test_outputs_must_be_writable_and_outside_the_inputs(tmp_path, ckpt):
    from gemma4vl.training.preflight import check_outputs, check_outputs_apart_from_inputs

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=rf"checkpoint.dir={blocker}/ckpt: not writable"):
        check_outputs(_run([f"checkpoint.dir={blocker}/ckpt"], tmp_path / "run"))
    with pytest.raises(ConfigError, match=r"export.dir \(its parent\)=.*: not writable"):
        check_outputs(_run([f"export.dir={blocker}/sub/export"], tmp_path / "run"))
    data = tmp_path / "data"
    data.mkdir()
    base = [f"model.hf_path={ckpt}", f"data.path={data}"]
    for key, value, message in (
            ("export.dir", ckpt, f"export.dir={ckpt} is inside the input model.hf_path={ckpt}"),
            ("checkpoint.dir", data / "ckpt", f"checkpoint.dir={data / 'ckpt'} is inside the input data.path={data}"),
            ("export.dir", tmp_path, f"export.dir={tmp_path} contains the input"),
    ):
        with pytest.raises(ConfigError) as e:
            check_outputs_apart_from_inputs(_run(base + [f"{key}={value}"], tmp_path / "run"), ckpt)
        assert message in str(e.value)
    check_outputs_apart_from_inputs(_run(base, tmp_path / "run"), ckpt)  # the defaults are fine
    # A LoRA run's PEFT adapter (export.format=both) is an export too: replaced whole, checked the same way.
    lora = base + ["peft=lora", "export.format=both"]
    with pytest.raises(ConfigError, match=r"export.adapter_dir \(its parent\)=.*: not writable"):
        check_outputs(_run(lora + [f"export.adapter_dir={blocker}/sub/adapter"], tmp_path / "run"))
    with pytest.raises(ConfigError) as e:
        check_outputs_apart_from_inputs(_run(lora + [f"export.adapter_dir={tmp_path}"], tmp_path / "run"), ckpt)
    assert f"export.adapter_dir={tmp_path} contains the input" in str(e.value)
    check_outputs_apart_from_inputs(_run(lora, tmp_path / "run"), ckpt)


def _fake_checkpoint(ckpt_dir: Path, step: int, run):
    """The tracker and the part of Megatron-Bridge's run_config.yaml that a resume is checked against, as a run
    with ``run``'s values writes them."""
    it = ckpt_dir / f"iter_{step:07d}"
    it.mkdir(parents=True)
    t, o = run.trainer, run.optim
    cfg = {"train": {"global_batch_size": t.global_batch_size, "train_iters": t.train_iters},
           "scheduler": {"lr_decay_iters": t.train_iters, "lr_warmup_iters": o.warmup_iters,
                         "lr_decay_style": o.decay_style},
           "optimizer": {"lr": o.lr, "min_lr": o.min_lr, "weight_decay": o.weight_decay}}
    (it / "run_config.yaml").write_text(yaml.safe_dump(cfg))
    (ckpt_dir / "latest_checkpointed_iteration.txt").write_text(str(step))


def test_resume_refuses_a_changed_schedule_and_resume_false_over_checkpoints(tmp_path):
    from gemma4vl.training.preflight import check_resume

    run_dir = tmp_path / "run"
    _fake_checkpoint(run_dir / "checkpoints", 20, _run(["trainer.train_iters=100", "trainer.global_batch_size=8"],
                                                       run_dir))
    run = ["trainer.global_batch_size=8"]
    assert check_resume(_run(run + ["trainer.train_iters=100"], run_dir)) == 20
    with pytest.raises(ConfigError, match=r"checkpoint.resume=false, but checkpoint.dir=.* already holds this run's "
                                          r"checkpoints \(up to step 20\)"):
        check_resume(_run(run + ["checkpoint.resume=false", "trainer.train_iters=100"], run_dir))
    with pytest.raises(ConfigError) as e:
        check_resume(_run(run + ["trainer.train_iters=200"], run_dir))
    assert ("learning-rate decay iterations from trainer.train_iters (optim.decay_iters=null): 200 now, 100 in the "
            "checkpoint") in str(e.value)
    assert "add optim.decay_iters=100 and raise trainer.train_iters" in str(e.value)
    assert check_resume(_run(run + ["trainer.train_iters=200", "optim.decay_iters=100"], run_dir)) == 20
    with pytest.raises(ConfigError, match=r"trainer.global_batch_size: 16 now, 8 in the checkpoint"):
        check_resume(_run(["trainer.global_batch_size=16", "trainer.train_iters=100"], run_dir))
    with pytest.raises(ConfigError, match=r"optim.lr: 0.001 now, 0.002 in the checkpoint"):
        check_resume(_run(run + ["optim.lr=1e-3", "trainer.train_iters=100"], run_dir))
    with pytest.raises(ConfigError, match=r"trainer.train_iters=10 is below the checkpoint's step 20"):
        check_resume(_run(run + ["trainer.train_iters=10", "optim.decay_iters=100"], run_dir))


def test_interrupted_export_leftovers_are_restored_or_removed(tmp_path):
    from gemma4vl.export.hf_export import recover_interrupted_export

    out = tmp_path / "hf_export"
    dead = 2**22 + 12345  # above the default pid_max: no such process
    (tmp_path / f".hf_export.partial-{dead}").mkdir()
    (tmp_path / f".hf_export.partial-{dead}" / "model.safetensors").write_bytes(b"x" * 1000)
    old = tmp_path / f".hf_export.old-{dead}"
    old.mkdir()
    (old / "config.json").write_text("{}")
    (tmp_path / f".hf_export.unverified-{dead}").mkdir()  # recipes.export's staged copy, before verification
    alive = tmp_path / f".hf_export.partial-{os.getppid()}"  # a running process's export: left alone
    alive.mkdir()
    touched = recover_interrupted_export(out)
    assert sorted(p.name for p in touched) == [f".hf_export.old-{dead}", f".hf_export.partial-{dead}",
                                               f".hf_export.unverified-{dead}"]
    assert (out / "config.json").read_text() == "{}"  # the previous complete export is back
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hf_export.partial-" + str(os.getppid()), "hf_export"]
    (tmp_path / f".hf_export.old-{dead}").mkdir()  # with hf_export present the old copy is removed
    recover_interrupted_export(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hf_export.partial-" + str(os.getppid()), "hf_export"]


def test_wandb_auto_without_network_falls_back_to_offline_quickly(monkeypatch):
    from gemma4vl.training.finetune import wandb_mode

    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # discard port: nothing listens
    t0 = time.perf_counter()
    assert wandb_mode("auto") == "offline"
    assert time.perf_counter() - t0 < 6.0
    assert wandb_mode("online") == "online"
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.setenv("HOME", "/nonexistent")
    assert wandb_mode("auto") == "offline"


# ------------------------------------------------------------------------------------------------ generated inputs
def test_demo_inputs_are_generated_only_at_their_own_paths(tmp_path):
    from recipes.inputs import prepare_demo_inputs

    fixture, demo = tmp_path / "fixture", tmp_path / "demo"
    user_ckpt = tmp_path / "user-ckpt"  # an incomplete copy: weights, no config.json
    user_ckpt.mkdir()
    (user_ckpt / "model.safetensors").write_bytes(b"\0" * 64)
    user_data = tmp_path / "user-data"
    before = tree_digest(tmp_path)
    run = _run([f"model.fixture_dir={fixture}", f"model.hf_path={user_ckpt}", f"data.demo_dir={demo}",
                f"data.path={user_data}"], tmp_path / "run")
    prepare_demo_inputs(run)
    assert tree_digest(tmp_path) == before and not fixture.exists() and not demo.exists() and not user_data.exists()
    run = _run([f"model.fixture_dir={fixture}", f"data.demo_dir={demo}"], tmp_path / "run")
    assert run.model.hf_path == str(fixture) and run.data.path == str(demo)
    prepare_demo_inputs(run)
    assert json.loads((fixture / "config.json").read_text())["model_type"] == "gemma4"
    assert len((demo / "train.jsonl").read_text().splitlines()) == 2000
    assert not [p.name for p in tmp_path.iterdir() if ".generating-" in p.name]
    digest = tree_digest(fixture)
    prepare_demo_inputs(run)  # exists: untouched
    assert tree_digest(fixture) == digest


def test_generation_is_atomic_and_happens_once_under_concurrency(tmp_path):
    from recipes.inputs import generate_once

    calls = []

    def write(out: Path):
        calls.append(out)
        time.sleep(0.3)
        (out / "done").write_text("ok")

    results = []
    threads = [threading.Thread(target=lambda: results.append(generate_once(tmp_path / "x", write, "thing")))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False, False, True] and len(calls) == 1
    assert (tmp_path / "x" / "done").read_text() == "ok"

    def fail(out: Path):
        (out / "half").write_text("x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate_once(tmp_path / "y", fail, "thing")
    assert not (tmp_path / "y").exists() and not [p for p in tmp_path.iterdir() if ".generating-" in p.name]


# ------------------------------------------------------------------------------------------------ the recipe
def _recipe(args, timeout=600):
    proc = subprocess.run([sys.executable, "-m", "recipes.finetune", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def _base(run_dir, ckpt, data, *extra):
    return [f"hydra.run.dir={run_dir}", f"model.hf_path={ckpt}", f"data.path={data}", "data.seq_length=512",
            "data.num_workers=0", "data.persistent_workers=false", "trainer.train_iters=2",
            "trainer.global_batch_size=2", "trainer.log_interval=1", "trainer.eval_interval=null",
            "checkpoint.save_interval=null", *extra]


def _case_inputs(tmp: Path, demo_rows: Path) -> dict[str, Path]:
    """Paths the table's cases refer to: a run dir with a checkpoint, a file blocking a directory, bad data."""
    import shutil

    done = tmp / "done-run"
    run = _run(_base(done, "x", "y"), done)
    _fake_checkpoint(done / "checkpoints", 2, run)
    (tmp / "blocker").write_text("a file, not a directory")
    (tmp / "empty").mkdir()
    (tmp / "empty" / "train.jsonl").write_text("")
    shutil.copytree(demo_rows, tmp / "badjson")
    lines = (tmp / "badjson" / "train.jsonl").read_text().splitlines()
    (tmp / "badjson" / "train.jsonl").write_text("\n".join(lines[:2] + ["{oops"] + lines[2:]) + "\n")
    return {"done": done, "blocker": tmp / "blocker", "empty": tmp / "empty", "badjson": tmp / "badjson"}


# (overrides, expected message) per class of bad input found before training ({name}: paths from _case_inputs).
# Every out-of-range value is covered by the library-level table above; these show the recipe's exit path.
RECIPE_CASES = [
    (["trainer.micro_batch_size=0"], "trainer.micro_batch_size=0 must be >= 1"),
    (["optim.lr=-1e-4", "optim.min_lr=-1e-6"], "optim.lr=-0.0001 must be >= 0"),
    (["checkpoint.save_interval=0"], "checkpoint.save_interval=0 must be >= 1, or null"),
    (["hydra.run.dir={done}", "trainer.train_iters=4"],
     "learning-rate decay iterations from trainer.train_iters (optim.decay_iters=null): 4 now, 2 in the checkpoint"),
    (["hydra.run.dir={done}", "checkpoint.resume=false"], "checkpoint.resume=false, but checkpoint.dir="),
    (["checkpoint.dir={blocker}/ckpt", "checkpoint.save_interval=1"], "checkpoint.dir={blocker}/ckpt: not writable"),
    (["export.dir={blocker}/sub/hf_export"], "export.dir (its parent)={blocker}/sub: not writable"),
    (["data.path={empty}"], "data.path={empty} (split 'train'): the data files"),
    (["data.path={badjson}"], "data.path={badjson} (split 'train'): 1 line(s) of the data are not JSON rows: "
                              "{badjson}/train.jsonl:3: not valid JSON"),
]


def test_recipe_refuses_bad_input_before_training(demo_rows, ckpt, tmp_path):
    """Each row: exit status 1, `error: <message naming the key / file>` (no traceback), inputs unchanged, no
    weight read (the runs stop in validation)."""
    from concurrent.futures import ThreadPoolExecutor

    paths = _case_inputs(tmp_path, demo_rows)
    inputs = [ckpt, demo_rows, paths["empty"], paths["badjson"], paths["done"] / "checkpoints"]
    before = [tree_digest(p) for p in inputs] + [paths["blocker"].read_text()]

    def one(k):
        extra, _ = RECIPE_CASES[k]
        args = _base(tmp_path / f"run{k}", ckpt, demo_rows, "checkpoint.save_interval=2")
        return _recipe(args + [e.format(**paths) for e in extra])

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(one, range(len(RECIPE_CASES))))
    for (extra, message), (status, out) in zip(RECIPE_CASES, results):
        assert status == 1, (extra, out[-2000:])
        assert f"error: " in out and message.format(**paths) in out, (extra, out[-2000:])
        assert "Traceback" not in out.split("error: ")[-1], extra
    assert [tree_digest(p) for p in inputs] + [paths["blocker"].read_text()] == before


def test_a_fresh_run_starts_a_clean_metrics_log_and_clears_export_leftovers(demo_rows, ckpt, tmp_path):
    """Killed before the first checkpoint, the next run starts over: metrics.jsonl holds each step once, and the
    partial export a killed export left behind is removed."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 9.0}\n')
    partial = run_dir / f".hf_export.partial-{2**22 + 777}"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\0" * 1000)
    status, out = _recipe(_base(run_dir, ckpt, demo_rows))
    assert status == 0, out[-3000:]
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2]
    assert not partial.exists() and (run_dir / "hf_export" / "config.json").is_file()
    assert "removed" in out and partial.name in out


def test_recipe_never_writes_into_a_named_input(demo_rows, ckpt, tmp_path):
    """An incomplete checkpoint directory and a mistyped data path: errors naming the key; nothing written there."""
    user = tmp_path / "user"
    (user / "ckpt").mkdir(parents=True)
    (user / "ckpt" / "model.safetensors").write_bytes(os.urandom(4096))
    (user / "ckpt" / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    before = tree_digest(user)
    status, out = _recipe(_base(tmp_path / "run", user / "ckpt", demo_rows))  # default model group: tiny fixture
    assert status == 1, out[-3000:]
    assert f"model.hf_path={user / 'ckpt'}: the directory has no config.json" in out
    assert tree_digest(user) == before
    status, out = _recipe(_base(tmp_path / "run2", ckpt, user / "typo" / "data"))
    assert status == 1, out[-3000:]
    assert f"data.path={user / 'typo' / 'data'} (split 'train'): dataset path" in out and "does not exist" in out
    assert tree_digest(user) == before and not (user / "typo").exists()


def test_recipe_stops_when_too_many_rows_fail_while_training(demo_rows, ckpt, tmp_path):
    """Images with a valid header and a truncated body pass the length pass and fail when decoded: under
    bad_rows=skip each is logged with its reason and the run stops once max_skipped_fraction is exceeded."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(demo_rows, data)
    images = sorted((data / "images").iterdir())
    for image in images[::2]:
        image.write_bytes(image.read_bytes()[:120])  # PNG header + IHDR intact, body cut
    before = tree_digest(data)
    status, out = _recipe(_base(tmp_path / "run", ckpt, data, "data.bad_rows=skip",
                                f"data.cache_dir={tmp_path / 'plans'}", "trainer.global_batch_size=8"))
    assert status == 1, out[-3000:]
    assert "skipping bad row: dataset" in out and "corrupt_image: image data does not decode" in out
    assert "TooManyBadRows: step 1:" in out and "> data.max_skipped_fraction=0.1" in out
    assert tree_digest(data) == before
    metrics = (tmp_path / "run" / "metrics.jsonl")
    assert not metrics.exists() or all(json.loads(line) for line in metrics.read_text().splitlines())
