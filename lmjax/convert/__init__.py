"""Hugging Face interop: GPT-2, BERT and LLaMA weights in and out, as safetensors."""

from lmjax.convert.hf import export_hf, import_hf

__all__ = ["export_hf", "import_hf"]
