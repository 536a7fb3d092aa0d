"""Shared pytest setup.

`gpu`-marked tests need CUDA: where none is present they are skipped with that reason (they run where a GPU is
lent, through `make test-all`). `make test` deselects them and `slow` tests altogether.
"""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (none on this machine); run `make test-all` on a GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def megatron_cpu():
    """Megatron-Core model parallel state for one CPU process (TP = PP = EP = 1), shared by the session."""
    from megatron.core import parallel_state

    from gemma4vl.runtime.distributed import destroy_model_parallel, initialize_model_parallel

    if not parallel_state.model_parallel_is_initialized():
        initialize_model_parallel("cpu")
    yield
    destroy_model_parallel()


@pytest.fixture
def ckpt_copy(tmp_path_factory, tmp_path):
    """A private, writable copy of the tiny fp32 checkpoint (one safetensors file), for tests that damage it."""
    import shutil

    from gemma4vl.testing.pytest_fixtures import tiny_checkpoint

    src = tiny_checkpoint(tmp_path_factory, layout="released", dtype="float32").path
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="session")
def inputs(tmp_path_factory):
    """The tiny checkpoint (fp32, released layout) and a small demo dataset (240 training, 24 validation rows),
    shared by the session's training runs (tests/test_recipe.py, test_slurm.py, test_cpu_training_loop.py);
    read-only."""
    from gemma4vl.data.demo import write_demo_dataset
    from gemma4vl.testing.pytest_fixtures import tiny_checkpoint

    ckpt = tiny_checkpoint(tmp_path_factory, layout="released", dtype="float32").path
    data = tmp_path_factory.mktemp("demo-data")
    write_demo_dataset(data, num_train=240, num_val=24, overwrite=True)
    return ckpt, data


@pytest.fixture(scope="session")
def single_process_reference(megatron_cpu, tmp_path_factory):
    """The tiny fp32 checkpoint imported into a 1-process Megatron model: ``(hf_dir, model, logits, export)``,
    the logits of ``synthetic_batch(seed=11)`` and the model's HF export (tensors by name), for the parallel-layout
    tests to compare with (tests/test_bridge_parallel.py, test_grouped_experts.py). Read-only."""
    from transformers import AutoConfig

    from gemma4vl.export import export_hf_checkpoint
    from gemma4vl.testing.fixtures import load_checkpoint_tensors
    from gemma4vl.testing.megatron_harness import forward_logits, load_megatron, synthetic_batch
    from gemma4vl.testing.pytest_fixtures import tiny_checkpoint

    info = tiny_checkpoint(tmp_path_factory, layout="released", dtype="float32")
    bridge, model = load_megatron(info.path)
    logits = forward_logits(model, synthetic_batch(AutoConfig.from_pretrained(info.path), seed=11))
    out = tmp_path_factory.mktemp("reference") / "export"
    export_hf_checkpoint(bridge, model, out)
    return info.path, model, logits, load_checkpoint_tensors(out)
