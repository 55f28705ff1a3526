"""lmjax: MLM and CLM pretraining in JAX/Flax."""

__version__ = "0.1.0"
