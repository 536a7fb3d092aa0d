"""`pip install .` into a fresh virtual environment outside the checkout, then a tiny finetune run from another
directory: the Hydra configs (gemma4vl/conf) and the recipes come from the installed package, not the checkout.

The pinned dependency set is reused from the running environment (a .pth file pointing at its site-packages) and
the package installed with --no-deps --no-build-isolation: no network. That pyproject's dependency list matches
requirements/ is checked line by line."""

import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from gemma4vl.testing.pytest_fixtures import tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _pins(path):
    return {line.split("#")[0].strip() for line in path.read_text().splitlines() if line.split("#")[0].strip()}


def test_pyproject_dependencies_are_the_requirement_pins():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = set(project["dependencies"])
    reqs = _pins(ROOT / "requirements" / "torch.txt") | _pins(ROOT / "requirements" / "base.txt")
    # Not runtime: wandb is the [wandb] extra, pytest [dev], setuptools the build backend.
    assert reqs - deps == {"wandb==0.29.0", "pytest==9.2.0", "setuptools==84.2.1"}
    assert deps - reqs == {"huggingface_hub==2.4.0"}  # used directly (hub downloads), pinned to what transformers takes
    from importlib.metadata import version

    assert version("huggingface_hub") == "2.4.0"
    assert project["optional-dependencies"] == {"wandb": ["wandb==0.29.0"], "dev": ["pytest==9.2.0", "wandb==0.29.0"]}
    assert _pins(ROOT / "requirements" / "no-deps.txt") == {"megatron-bridge==0.6.2"}


def test_installed_package_runs_a_finetune_from_another_directory(tmp_path_factory, tmp_path):
    from gemma4vl.data.demo import write_demo_dataset

    ckpt = tiny_checkpoint(tmp_path_factory, layout="released", dtype="float32").path
    data = tmp_path / "data"
    write_demo_dataset(data, num_train=16, num_val=4, overwrite=True)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "pinned.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # pip of the pinned environment, installing into the fresh venv's interpreter (no checkout on its path).
    install = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                              "--no-index", str(ROOT)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
    assert (site / "gemma4vl" / "conf" / "config.yaml").is_file() and (site / "recipes" / "finetune.py").is_file()
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = subprocess.run([str(py), "-c", "import gemma4vl, recipes; print(gemma4vl.__file__, recipes.__file__)"],
                           cwd=work, capture_output=True, text=True, check=True).stdout.split()
    assert all(Path(p).is_relative_to(site) for p in where), where
    run_dir = work / "run"
    proc = subprocess.run([str(py), "-m", "recipes.finetune", f"hydra.run.dir={run_dir}", f"model.hf_path={ckpt}",
                           f"data.path={data}", "data.seq_length=512", "data.num_workers=0", "data.persistent_workers=false",
                           "trainer.train_iters=2", "trainer.global_batch_size=2", "trainer.log_interval=1",
                           "trainer.eval_interval=null", "checkpoint.save_interval=2", "optim.warmup_iters=1",
                           "export.verify_logits=false"],
                          cwd=work, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = re.findall(r"step (\d+)/2 \| loss ([\d.]+)", (run_dir / "finetune.log").read_text())
    assert [s for s, _ in lines] == ["1", "2"] and all(0 < float(v) < 20 for _, v in lines)
    assert (run_dir / "hf_export" / "config.json").is_file()
    # The export's model card: from what, on what, with which config (not the base model's card copied over).
    card = (run_dir / "hf_export" / "README.md").read_text()
    assert f"Finetuned with gemma4vl from `{ckpt}` for 2 steps (full finetuning) on `{data}` split `train` " \
           "(format `messages`)." in card
    assert "  train_iters: 2\n" in card and f"  path: {data}\n" in card
    # README "Use your export": the transformers pipeline call, on CPU in fp32 (the README's is bf16 on GPU).
    code = f"""
from transformers import pipeline
pipe = pipeline("image-text-to-text", model={str(run_dir / "hf_export")!r}, dtype="float32", device_map="cpu")
messages = [{{"role": "user", "content": [{{"type": "image", "image": "images/train_00000.png"}},
                                         {{"type": "text", "text": "Which shape is in the picture?"}}]}}]
out = pipe(text=messages, max_new_tokens=4)[0]["generated_text"][-1]
print("ANSWER", out["role"], type(out["content"]).__name__)
"""
    used = subprocess.run([str(py), "-c", code], cwd=data, capture_output=True, text=True, timeout=300)
    assert "ANSWER assistant str" in used.stdout, used.stdout[-2000:] + used.stderr[-2000:]
