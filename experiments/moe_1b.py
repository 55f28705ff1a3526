"""A mixture of experts with ~1.1B active parameters (llama_1b's) for accelerators.

  python -m launch.compile --config experiments/moe_1b.py:ep8 --topology v5e:4x4
  python -m launch.train --config experiments/moe_1b.py --workdir runs/moe1b \
      --config.data.tokenizer=spm32k.model --config.data.train_files="('corpus.jsonl',)"

llama_1b's attention and width (d_model 2048, 16 layers, GQA 32/8 heads) with every MLP
routed: 8 experts of 4096 (half llama_1b's 8192), top-2, so a token meets llama_1b's
parameters; 3.6B in all. Full rematerialisation, 64 rows of 2048 per step. The default
shards every parameter over all devices (`mesh.fsdp=-1`, experts by their width); variant
`:ep8` puts the experts on an `expert` mesh axis of 8 (tokens travel to them by
all-to-all) and the rest over fsdp, the batch over both; `:capacity` is `:ep8` with
one-hot dispatch and capacity factor 1.25. docs/moe.md has what `launch.compile`
reports for v5e:4x4.
"""

import ml_collections

from experiments import llama_1b


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  if arg not in ("", "ep8", "capacity"):
    raise ValueError(f"moe_1b variants: ep8, capacity; got {arg!r}")
  c = llama_1b.get_config("fsdp")
  c.model.moe.update(num_experts=8, experts_per_token=2, d_ff=4096, balance_loss=0.01,
                     z_loss=0.001)
  c.model.remat_policy = "full"
  c.train.batch_size = 64
  if arg in ("ep8", "capacity"):
    c.mesh.update(data=1, fsdp=-1, expert=8)
  if arg == "capacity":
    c.model.moe.update(dispatch="capacity", capacity_factor=1.25)
  return c
