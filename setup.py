"""lmjax: MLM and CLM pretraining in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="lmjax",
    version="0.1.0",
    description="Readable, fast MLM and CLM pretraining in JAX/Flax",
    python_requires=">=3.11",
    packages=find_packages(include=["lmjax", "lmjax.*", "launch", "launch.*"]),
    package_data={"lmjax": ["assets/shakespeare/*"]},
    install_requires=[
        "jax>=0.10",
        "flax>=0.12,<0.13",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "sentencepiece>=0.2",
        "absl-py>=2.0",
        "ml_collections>=1.0",
        "numpy>=1.26",
        "tensorboardX>=2.6",
        "safetensors>=0.4",
        "tokenizers>=0.19",  # Hugging Face tokenizers of imported models
        "matplotlib>=3.7",  # sweep loss curves
        "pyarrow>=14",  # parquet corpora
        "zstandard>=0.22",  # .jsonl.zst corpora
        "jinja2>=3.1.6",  # chat templates (Hugging Face's semantics; older versions are unsafe)
    ],
    extras_require={
        "ray": ["ray>=2.9"],  # launch.prepare_data --engine ray
        "eval": ["lm-eval>=0.4.5"],  # launch.lm_eval, train.lm_eval_tasks
        "serve": ["fastapi>=0.110", "uvicorn>=0.29"],  # launch.serve
        # launch.sweep with a Search; psycopg: PostgreSQL studies (MySQL: add pymysql)
        "search": ["optuna>=4.0", "optuna-dashboard>=0.15", "psycopg[binary]>=3.1"],
        "tpu": ["jax[tpu]>=0.10"],  # TPU VMs, and launch.compile anywhere (libtpu matched to jax)
        "gpu": ["jax[cuda12]>=0.10"],  # NVIDIA GPUs (CUDA 12 wheels matched to jax)
        "gcs": ["gcsfs>=2024.2"],  # gs:// run directories and token stores
        "s3": ["s3fs>=2024.2"],  # s3:// run directories and token stores
        # accelerate: lm-eval's own `hf` model, the reference the adapter is tested against
        "test": ["pytest>=8", "pytest-xdist>=3.5", "transformers>=4.40", "torch==2.13.0",
                 "ray>=2.9", "lm-eval[api]>=0.4.5", "accelerate>=0.26", "jax[tpu]>=0.10",
                 "s3fs>=2024.2", "gcsfs>=2024.2", "moto[server]>=5.0",  # bucket tests
                 "trl>=1.0",  # SFT and DPO parity
                 "peft>=0.13",  # LoRA adapters: the reference that loads lmjax's exports
                 "fastapi>=0.110", "uvicorn>=0.29", "openai>=1.30", "httpx>=0.27",  # serving
                 # searches: a PostgreSQL server from pip for the shared-study test
                 "optuna>=4.0", "optuna-dashboard>=0.15", "psycopg[binary]>=3.1",
                 "pgserver>=0.1.4"],
        # s3fs + moto: benchmarks.data_path --bucket times S3 against a local server
        "bench": ["transformers>=4.40", "torch==2.13.0", "s3fs>=2024.2", "moto[server]>=5.0",
                  "fastapi>=0.110", "uvicorn>=0.29", "httpx>=0.27"],  # + benchmarks.serve
    },
)
