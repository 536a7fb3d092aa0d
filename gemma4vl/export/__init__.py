"""Exporting trained models as Hugging Face checkpoints."""

from gemma4vl.export.hf_export import ExportReport, export_hf_checkpoint, source_dtype

__all__ = ["ExportReport", "export_hf_checkpoint", "source_dtype"]
