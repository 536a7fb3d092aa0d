"""Bad input to the bridge and the exporter: every case fails with a message that names the problem."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from gemma4vl.testing.megatron_harness import load_megatron

L1 = "model.language_model.layers.1."
L2 = "model.language_model.layers.2."


def _edit_weights(path, edit):
    f = path / "model.safetensors"
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def _load_error(path, megatron_cpu):
    with pytest.raises(ValueError) as e:
        load_megatron(path)
    return str(e.value)


def test_missing_tensor(megatron_cpu, ckpt_copy):
    _edit_weights(ckpt_copy, lambda t: t.pop(L1 + "self_attn.k_norm.weight"))
    msg = _load_error(ckpt_copy, megatron_cpu)
    assert "missing tensor" in msg and L1 + "self_attn.k_norm.weight" in msg


def test_extra_tensor(megatron_cpu, ckpt_copy):
    # Layer 1 is a full-attention K=V layer: a v_proj there is not part of the architecture.
    _edit_weights(ckpt_copy, lambda t: t.__setitem__(L1 + "self_attn.v_proj.weight", torch.zeros(32, 64)))
    msg = _load_error(ckpt_copy, megatron_cpu)
    assert "unexpected tensor" in msg and L1 + "self_attn.v_proj.weight" in msg


def test_wrong_shape(megatron_cpu, ckpt_copy):
    _edit_weights(ckpt_copy, lambda t: t.__setitem__(L2 + "router.scale", torch.ones(63)))
    msg = _load_error(ckpt_copy, megatron_cpu)
    assert L2 + "router.scale" in msg and "[63]" in msg and "[64]" in msg


def test_truncated_safetensors(megatron_cpu, ckpt_copy):
    f = ckpt_copy / "model.safetensors"
    size = f.stat().st_size
    with f.open("r+b") as fh:
        fh.truncate(size - 1000)
    msg = _load_error(ckpt_copy, megatron_cpu)
    assert "model.safetensors" in msg and "truncated" in msg and str(size - 1000) in msg


def test_corrupt_safetensors_header(megatron_cpu, ckpt_copy):
    f = ckpt_copy / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"\xff" * 32  # garbage where the JSON header starts
    f.write_bytes(bytes(data))
    msg = _load_error(ckpt_copy, megatron_cpu)
    assert "model.safetensors" in msg and "corrupt" in msg


def test_config_that_does_not_match_the_weights(megatron_cpu, ckpt_copy):
    cfg = json.loads((ckpt_copy / "config.json").read_text())
    cfg["text_config"]["moe_intermediate_size"] = 48  # the checkpoint's experts are 32 wide
    (ckpt_copy / "config.json").write_text(json.dumps(cfg))
    msg = _load_error(ckpt_copy, megatron_cpu)
    assert "experts.gate_up_proj" in msg and "the config implies [4, 96, 64]" in msg


def test_missing_config_field_is_an_error_not_a_default(megatron_cpu, ckpt_copy):
    cfg = json.loads((ckpt_copy / "config.json").read_text())
    del cfg["text_config"]["global_head_dim"]
    (ckpt_copy / "config.json").write_text(json.dumps(cfg))
    msg = _load_error(ckpt_copy, megatron_cpu)
    assert "config.json" in msg and "'global_head_dim'" in msg


def test_zero_divisor_in_fusion(megatron_cpu, ckpt_copy):
    def zero(t):
        w = t[L2 + "pre_feedforward_layernorm_2.weight"]
        w[5] = 0.0
    _edit_weights(ckpt_copy, zero)
    msg = _load_error(ckpt_copy, megatron_cpu)
    assert "layer 2" in msg and "pre_feedforward_layernorm_2" in msg and "[5]" in msg


def test_export_with_non_finite_weights_leaves_nothing(megatron_cpu, ckpt_copy, tmp_path):
    from gemma4vl.bridge.checkpoint import CheckpointError
    from gemma4vl.export import export_hf_checkpoint

    bridge, model = load_megatron(ckpt_copy)
    with torch.no_grad():
        model[0].language_model.decoder.layers[3].post_mlp_layernorm.weight[0] = float("nan")
    out = tmp_path / "export"
    with pytest.raises(CheckpointError, match="non-finite"):
        export_hf_checkpoint(bridge, model, out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [ckpt_copy]  # no partial directory left behind either


KILLED_EXPORT = textwrap.dedent("""
    import os, signal, sys
    from gemma4vl.runtime.distributed import initialize_model_parallel
    from gemma4vl.testing.megatron_harness import load_megatron
    from gemma4vl.export import export_hf_checkpoint
    initialize_model_parallel("cpu")
    bridge, model = load_megatron(sys.argv[1])
    stream = bridge.export_hf_weights

    def dying_stream(*args, **kwargs):  # the process dies after 40 tensors, as on a node failure
        for i, item in enumerate(stream(*args, **kwargs)):
            if i == 40:
                os.kill(os.getpid(), signal.SIGKILL)
            yield item

    bridge.export_hf_weights = dying_stream
    export_hf_checkpoint(bridge, model, sys.argv[2], max_shard_bytes=20_000)
""")


def test_killed_export_leaves_no_complete_looking_directory(ckpt_copy, tmp_path):
    out = tmp_path / "exports" / "hf_export"
    proc = subprocess.run([sys.executable, "-c", KILLED_EXPORT, str(ckpt_copy), str(out)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not out.exists()
    leftovers = list(out.parent.iterdir())
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".hf_export.partial-")
    shards = sorted(p.name for p in leftovers[0].iterdir())
    assert shards and "config.json" not in shards and "model.safetensors.index.json" not in shards
