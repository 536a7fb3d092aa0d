"""Run configuration: Hydra group schemas, cross-field validation, and Megatron-Bridge's ConfigContainer."""

from gemma4vl.config.schema import RunConfig, register_configs

__all__ = ["RunConfig", "register_configs"]
