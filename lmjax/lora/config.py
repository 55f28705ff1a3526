"""The `lora` config section: which dense layers get low-rank adapters, and how.

`targets` holds regular expressions searched in lmjax's dense-layer names (a kernel's
path without `/kernel`, e.g. `transformer/stack/layers/attention/query`) or the names of
presets. A layer matches when any entry matches it.
"""

from __future__ import annotations

import dataclasses
import re

from lmjax.errors import check_ranges

PRESETS = {
    "attention": (r"/attention/(query|key|value|out)$",),
    "attention_mlp": (r"/attention/(query|key|value|out)$", r"/mlp/(gate|up|wi|wo)$"),
    "all": (r".",),  # every dense layer of the backbone (the vocabulary head is not one)
}
BASE_DTYPES = ("float", "int8", "nf4")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  enabled: bool = False  # train low-rank adapters on a frozen base instead of every weight
  rank: int = 16  # r: the adapters' inner width
  alpha: float = 16.0  # the update is scaled by alpha / rank (alpha / sqrt(rank): rslora)
  dropout: float = 0.0  # dropout on the adapters' input while training (PEFT's lora_dropout)
  rslora: bool = False  # rank-stabilised scaling alpha / sqrt(rank) (Kalajdzievski, 2023)
  targets: tuple[str, ...] = ("attention",)  # presets (attention, attention_mlp, all) or regexes
  base_dtype: str = "float"  # float | int8 | nf4: the frozen base kept quantized (QLoRA)
  init_from: str = ""  # a PEFT adapter directory to start from (implies enabled)

  def __post_init__(self):
    check_ranges("lora", self, positive=("alpha",), fractions=("dropout",))
    if self.base_dtype not in BASE_DTYPES:
      raise ValueError(f"lora.base_dtype must be one of {', '.join(BASE_DTYPES)}, "
                       f"got {self.base_dtype!r}")
    if self.active and self.rank < 1:
      raise ValueError(f"lora.rank must be >= 1, got {self.rank}")
    for pattern in self.patterns():
      try:
        re.compile(pattern)
      except re.error as e:
        raise ValueError(f"lora.targets: {pattern!r} is not a regular expression ({e})") from None

  @property
  def active(self) -> bool:
    return self.enabled or bool(self.init_from)

  @property
  def scale(self) -> float:
    return self.alpha / (self.rank ** 0.5 if self.rslora else self.rank)

  def patterns(self) -> tuple[str, ...]:
    return tuple(p for t in self.targets for p in PRESETS.get(t, (t,)))

  def matches(self, layer: str) -> bool:
    return any(re.search(p, layer) for p in self.patterns())
