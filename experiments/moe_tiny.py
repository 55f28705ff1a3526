"""`clm_tiny` as a mixture of experts: the same data, budget and active parameters.

  python -m launch.train --config experiments/moe_tiny.py --workdir runs/moe_tiny
  python -m launch.train --config experiments/moe_tiny.py:llama --workdir runs/moe_llama

Every MLP becomes 8 experts of half clm_tiny's width, each token routed to 2 of them: a
token meets the same matmul parameters as in clm_tiny (plus an 8-way router), the model
holds four times the MLP parameters. Variants (after the colon): `gpt2` (default) and
`llama`, clm_tiny's own (`llama` exports as Mixtral); `capacity` is `gpt2` with one-hot
dispatch and 1.25x capacity, tokens over it dropped (docs/moe.md compares them).
"""

import ml_collections

from experiments import clm_tiny


def get_config(arg: str = "gpt2") -> ml_collections.ConfigDict:
  if arg not in ("gpt2", "llama", "capacity"):
    raise ValueError(f"moe_tiny variants are gpt2, llama and capacity, got {arg!r}")
  c = clm_tiny.get_config("llama" if arg == "llama" else "gpt2")
  c.model.moe.update(
      num_experts=8, experts_per_token=2,
      d_ff=c.model.d_ff // 2,  # top-2 of half-width experts: clm_tiny's active MLP
      balance_loss=0.01, z_loss=0.001)
  if arg == "capacity":
    c.model.moe.update(dispatch="capacity", capacity_factor=1.25)
  return c
