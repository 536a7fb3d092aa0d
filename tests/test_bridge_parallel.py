"""Import and export under tensor, pipeline and expert parallelism (2 gloo processes on CPU).

Each layout must give the single-process logits (1e-5, fp32) and an export bit-identical to the single-process
export, tensor for tensor.
"""

import pytest
import torch

from gemma4vl.testing.distributed import run_distributed
from gemma4vl.testing.fixtures import load_checkpoint_tensors
from gemma4vl.testing.megatron_harness import forward_logits, load_megatron, synthetic_batch


def _import_export(hf_dir, out_dir, parallel: dict):
    """Runs on every rank: import with ``parallel`` sizes, logits of a fixed batch, export to ``out_dir``."""
    import torch.distributed as dist
    from transformers import AutoConfig

    from gemma4vl.export import export_hf_checkpoint
    from gemma4vl.runtime.distributed import initialize_model_parallel

    initialize_model_parallel("cpu", **parallel)
    bridge, model = load_megatron(hf_dir)
    logits = forward_logits(model, synthetic_batch(AutoConfig.from_pretrained(hf_dir), seed=11))
    export_hf_checkpoint(bridge, model, out_dir)
    return logits if dist.get_rank() == 0 else None


@pytest.mark.parametrize(
    "parallel",
    [
        {"tensor_model_parallel_size": 2},
        {"pipeline_model_parallel_size": 2},
        {"expert_model_parallel_size": 2},
    ],
    ids=["tp2", "pp2", "ep2"],
)
def test_parallel_import_and_export_match_single_process(single_process_reference, tmp_path, parallel):
    hf_dir, _, ref_logits, ref_export = single_process_reference
    out = tmp_path / "export"
    results = run_distributed(_import_export, 2, hf_dir, out, parallel, timeout=600)
    logits = results[0]
    assert logits.shape == ref_logits.shape
    diff = (logits - ref_logits).abs().max().item()
    assert diff <= 1e-5, f"{parallel}: max |logit diff| vs 1 process {diff}"
    exported = load_checkpoint_tensors(out)
    assert sorted(exported) == sorted(ref_export)
    differing = [k for k in ref_export if not torch.equal(exported[k], ref_export[k])]
    assert differing == []
