"""Every config composes and validates; every experiment builds Megatron-Bridge's ConfigContainer; malformed
overrides and inconsistent layouts fail with messages that name the fields and the arithmetic."""

import json
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from gemma4vl.config import register_configs
from gemma4vl.config.compose import TargetNotAllowed, to_run_config
from gemma4vl.config.validate import ConfigError, validate

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = ["model", "parallel", "data", "optim", "peft", "trainer", "logger", "checkpoint", "export"]
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
DEBUGS = sorted(p.stem for p in (CONF / "debug").glob("*.yaml"))
WORLD = {"single": 1, "tp2": 2, "ep2": 2, "pp2": 2, "h100x8_sft": 8, "h100x4_lora": 4}

register_configs()


def compose_run(overrides, run_dir="/tmp/gemma4vl-test-run"):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
        cfg.hydra.runtime.output_dir = str(run_dir)
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
        return cfg


@pytest.fixture(scope="module")
def hf_configs(tmp_path_factory):
    """config.json files (no weights) of the tiny model and of the full 26B-A4B shape, keyed by model option."""
    from gemma4vl.testing._checkpoint_fixture import build_config, config_dict

    out = {}
    for option, variant, layers in (("gemma4_tiny", "tiny-moe", None), ("gemma4_26b_a4b", "real-width", 30),
                                    ("gemma4_real_width_proxy", "real-width", 4)):
        d = tmp_path_factory.mktemp(option)
        cfg = build_config(variant, num_layers=layers)
        import torch

        (d / "config.json").write_text(json.dumps(config_dict(cfg, "released", torch.bfloat16, 280)))
        out[option] = d
    return out


def _group_options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def _run_value(run, dotted: str):
    value = run
    for name in dotted.split("."):
        value = getattr(value, name)
    return value


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _group_options(g)])
def test_every_group_option_composes(group, option):
    """Every key of the option's YAML reaches the typed group with the YAML's value: interpolations resolved
    against the run (``${run_dir}/hf_export``), the two data paths as overridden here."""
    overrides = {"data.processor_path": "x", "data.path": "y"}
    run = to_run_config(compose_run([f"{group}={option}", *(f"{k}={v}" for k, v in overrides.items())]))
    declared = OmegaConf.to_container(OmegaConf.load(CONF / group / f"{option}.yaml"), resolve=False)
    assert declared, f"{group}/{option}.yaml sets nothing"
    composed = getattr(run, group)
    for key, value in declared.items():
        expected = overrides.get(f"{group}.{key}", value)
        if isinstance(expected, str):
            expected = re.sub(r"\$\{([\w.]+)\}", lambda m: str(_run_value(run, m.group(1))), expected)
        assert getattr(composed, key) == expected, f"{group}={option}: {group}.{key}"


@pytest.mark.parametrize("debug", DEBUGS)
def test_every_debug_config_composes(debug):
    run = to_run_config(compose_run([f"debug={debug}"]))
    assert run.trainer.train_iters <= 4


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_validates_and_builds_a_config_container(experiment, hf_configs, tmp_path):
    from gemma4vl.bridge import read_hf_config

    cfg = compose_run([f"experiment={experiment}"], run_dir=tmp_path)
    parallel_option = next(o for o in WORLD if (CONF / "parallel" / f"{o}.yaml").read_text()
                           and _parallel_matches(cfg, o))
    model_dir = hf_configs[cfg.model.name]
    with open_dict(cfg):
        cfg.model.hf_path = str(model_dir)
        cfg.data.processor_path = str(model_dir)
        cfg.data.path = str(tmp_path / "data")
    run = to_run_config(cfg)
    hf = read_hf_config(model_dir)
    # fused_adam: the GPU nodes' Adam, as recipes.plan assumes (this machine has neither TE nor Apex)
    dp = validate(run, WORLD[parallel_option], hf, fused_adam=True).data_parallel
    assert run.trainer.global_batch_size % (run.trainer.micro_batch_size * dp) == 0

    from megatron.bridge import AutoBridge

    from gemma4vl.config.container import build_config_container

    container = build_config_container(run, AutoBridge.from_hf_pretrained(str(model_dir)), resume=False)
    assert container.model.tensor_model_parallel_size == run.parallel.tensor
    assert container.model.expert_model_parallel_size == run.parallel.expert
    assert container.model.num_moe_experts == hf.num_experts
    assert container.train.global_batch_size == run.trainer.global_batch_size
    assert container.optimizer.lr == run.optim.lr
    assert container.checkpoint.save == str(Path(run.run_dir) / "checkpoints")
    assert container.dataset.data is run.data and container.dataset.seq_length == run.data.seq_length
    assert container.dataset.dataloader_type == run.data.dataloader_type
    assert (container.peft is not None) == (run.peft.method == "lora")
    # Megatron's parallel groups wait as long as the default process group (a large save keeps ranks apart).
    assert container.dist.distributed_timeout_minutes == run.trainer.distributed_timeout_minutes == 90
    assert container.train.exit_signal_handler_for_dataloader == run.trainer.exit_on_signal


def _parallel_matches(cfg, option):
    import yaml

    expected = yaml.safe_load((CONF / "parallel" / f"{option}.yaml").read_text())
    return all(getattr(cfg.parallel, k) == v for k, v in expected.items())


def test_malformed_override_names_the_key():
    from hydra.errors import ConfigCompositionException

    from gemma4vl.config.compose import UnknownConfigKey

    with pytest.raises(ConfigCompositionException, match="trainer.train_iterz"):
        compose_run(["trainer.train_iterz=3"])
    with pytest.raises(UnknownConfigKey, match="unknown config key 'trainer.train_iterz'"):
        to_run_config(compose_run(["+trainer.train_iterz=3"]))
    with pytest.raises(Exception, match="trainer.train_iters"):
        to_run_config(compose_run(["trainer.train_iters=many"]))


def test_target_outside_allowlist_is_refused():
    with pytest.raises(TargetNotAllowed, match="optim._target_='os.system'"):  # noqa: the schema allows the key
        to_run_config(compose_run(["+optim._target_=os.system"]))


@pytest.mark.parametrize("overrides,world,messages", [
    (["parallel.expert=3"], 3, ["parallel.expert=3 does not divide the 4 experts"]),
    (["parallel.tensor=4", "parallel.sequence_parallel=true"], 4,
     ["parallel.tensor=4 does not divide the full-attention layers' 2 KV heads"]),
    (["trainer.global_batch_size=5"], 2,
     ["trainer.global_batch_size=5 is not divisible by trainer.micro_batch_size * DP = 1 * 2 = 2"]),
    (["parallel.tensor=2"], 2, ["needs parallel.sequence_parallel=true"]),
    (["parallel.pipeline=3"], 3, ["4 layers do not split into parallel.pipeline"]),
    (["parallel.pipeline=2"], 3, ["parallel.* on 3 processes: world size 3 is not divisible by TP 1 * PP 2 * CP 1 = 2: "
                                  "DP = world 3 / 2 = 1.5 is not an integer"]),
    (["trainer.precision=bf16"], 1, ["the CPU backend trains in fp32"]),
    (["trainer.device=tpu"], 1, ["trainer.device='tpu' is not one of ['cpu', 'cuda']"]),
    (["export.format=lora"], 1, ["export.format='lora' is not one of ['merged', 'adapter', 'both']"]),
    (["export.format=both"], 1, ["export.format='both' writes a LoRA adapter: it needs peft.method=lora"]),
    (["peft=lora", "peft.target_modules=[linear_qkv,linear_fc1,linear_fc2]"], 1,
     ["peft.target_modules entry 'linear_fc1' would adapt the routed experts, which are grouped parameters",
      "entry 'linear_fc2' would adapt the routed experts", "'*.shared_experts.linear_fc1'"]),
])
def test_invalid_layouts_fail_before_loading_weights(hf_configs, overrides, world, messages):
    from gemma4vl.bridge import read_hf_config

    run = to_run_config(compose_run(overrides))
    with pytest.raises(ConfigError) as e:
        validate(run, world, read_hf_config(hf_configs["gemma4_tiny"]))
    for message in messages:
        assert message in str(e.value)
