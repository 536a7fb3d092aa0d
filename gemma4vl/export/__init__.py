"""Exporting trained models as Hugging Face checkpoints (merged) or PEFT adapters."""

from gemma4vl.export.adapter_export import AdapterReport, export_hf_adapter
from gemma4vl.export.hf_export import ExportReport, export_hf_checkpoint, source_dtype

__all__ = ["AdapterReport", "ExportReport", "export_hf_adapter", "export_hf_checkpoint", "source_dtype"]
