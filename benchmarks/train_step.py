"""One training step of the same model in lmjax and in Hugging Face `transformers` (PyTorch).

Shapes: GPT-2-style decoders (CLM) and BERT-style encoders (MLM), d_model with
d_model/64 heads (unless given) and a 4x MLP, no dropout, AdamW. Each candidate runs `steps`
steps per repeat; the caller interleaves candidates and keeps min and median.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable

import jax
import numpy as np

from lmjax import train as train_lib
from lmjax.data.tokenizer import SpecialTokens
from lmjax.metrics import flops_per_token
from lmjax.model import TransformerConfig
from lmjax import objectives
from lmjax.optim import OptimizerConfig

SPECIAL = SpecialTokens(pad=0, unk=1, bos=2, eos=3, mask=4, cls=5, sep=6)


@dataclasses.dataclass(frozen=True)
class Shape:
  objective: str  # clm | mlm
  d_model: int
  layers: int
  seq_len: int
  batch: int
  vocab: int = 4096
  heads: int = 0  # 0: d_model / 64

  @property
  def num_heads(self) -> int:
    return self.heads or max(self.d_model // 64, 1)

  def model(self) -> TransformerConfig:
    common = dict(vocab_size=self.vocab, max_len=self.seq_len, d_model=self.d_model,
                  num_layers=self.layers, num_heads=self.num_heads, d_ff=4 * self.d_model,
                  # Unrolled, as one would set for 2-4 layers: on CPU the scanned loop spends
                  # ~15% of the step stacking residuals; scanning pays off in compile time at
                  # depth (the compile section). float32 like the peers' float32 columns
                  # (`auto` may pick a bfloat16 mode on a CPU with bfloat16 units).
                  scan_layers=False, dtype="float32")
    if self.objective == "clm":
      return TransformerConfig(family="decoder", **common)
    return TransformerConfig(family="encoder", norm_position="post", embedding_norm=True,
                             activation="gelu_exact", norm_eps=1e-12, type_vocab_size=2, **common)

  @property
  def flops_per_step(self) -> float:
    predictions = objectives.objective_class(self.objective).config_class(
        kind=self.objective).predictions(self.seq_len)
    return flops_per_token(self.model(), self.seq_len, predictions) * self.batch * self.seq_len


def _batch(shape: Shape) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  tokens = rng.integers(10, shape.vocab, size=(shape.batch, shape.seq_len)).astype(np.int32)
  return {"tokens": tokens, "segment_ids": np.ones_like(tokens),
          "positions": np.broadcast_to(np.arange(shape.seq_len), tokens.shape).astype(np.int32)}


def lmjax_step(shape: Shape, steps: int, model_cfg: TransformerConfig | None = None
               ) -> Callable[[], None]:
  """A callable that runs `steps` compiled lmjax train steps (state donated, on device)."""
  cfg = model_cfg or shape.model()
  opt = OptimizerConfig(warmup_steps=0)
  cls = objectives.objective_class(shape.objective).config_class
  fns = train_lib.step_fns(cfg, objectives.build(cls(kind=shape.objective), SPECIAL,
                                                 cfg.vocab_size), opt, 1000)
  state = jax.jit(lambda: train_lib.unbox(train_lib.init_state(fns, 0, (1, 8))))()
  step = jax.jit(functools.partial(train_lib.train_step, fns), donate_argnums=(0,))
  batch = jax.device_put(_batch(shape))
  box = [state]

  def run():
    for _ in range(steps):
      box[0], metrics = step(box[0], batch)
    jax.block_until_ready(metrics)
  return run


def torch_step(shape: Shape, steps: int, bf16: bool) -> Callable[[], None]:
  """The same step in `transformers` PyTorch: GPT2LMHeadModel or BertForMaskedLM + AdamW."""
  import torch
  import transformers as T
  torch.manual_seed(0)
  d, h = shape.d_model, shape.num_heads
  if shape.objective == "clm":
    model = T.GPT2LMHeadModel(T.GPT2Config(
        vocab_size=shape.vocab, n_positions=shape.seq_len, n_embd=d, n_layer=shape.layers,
        n_head=h, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
  else:
    model = T.BertForMaskedLM(T.BertConfig(
        vocab_size=shape.vocab, hidden_size=d, num_hidden_layers=shape.layers,
        num_attention_heads=h, intermediate_size=4 * d, max_position_embeddings=shape.seq_len,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
  tokens = torch.tensor(_batch(shape)["tokens"], dtype=torch.long)
  labels = tokens.clone()
  if shape.objective == "mlm":  # loss on 15% of the tokens, as the lmjax step
    labels[torch.rand(labels.shape, generator=torch.Generator().manual_seed(0)) > 0.15] = -100

  def run():
    for _ in range(steps):
      with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(input_ids=tokens, labels=labels).loss
      loss.backward()
      torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
      opt.step()
      opt.zero_grad(set_to_none=True)
  return run


def time_interleaved(candidates: dict[str, Callable[[], None]], repeats: int
                     ) -> dict[str, tuple[float, float]]:
  """(min, median) seconds per call of each candidate, after one warm-up call each."""
  for fn in candidates.values():
    fn()
  times: dict[str, list[float]] = {name: [] for name in candidates}
  for _ in range(repeats):
    for name, fn in candidates.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return {name: (min(t), float(np.median(t))) for name, t in times.items()}
