"""Hugging Face interop: GPT-2, BERT and LLaMA weights in and out, as safetensors
(`lmjax.pretrained.load` reads a Hugging Face directory with its tokenizer)."""

from lmjax.convert.hf import export_hf, read_hf

__all__ = ["export_hf", "read_hf"]
