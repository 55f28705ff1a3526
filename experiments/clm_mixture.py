"""clm_tiny on a weighted mixture of three sources, the bundled plays split by genre.

  python -m launch.train --config experiments/clm_mixture.py --workdir runs/mixture
  python -m launch.train --config experiments/clm_mixture.py --workdir runs/mixture2 \
      --config.data.mixture.history.weight=0.6 --config.data.mixture_exhausted=stop

Sources (experiments/data/make_genre_corpora.py writes them): comedies, tragedies and
histories, each with its own held-out play, so metrics.jsonl and TensorBoard carry
`eval/comedy/loss`, `eval/tragedy/loss` and `eval/history/loss` beside the overall
`eval` (the three held-out plays together). The weights are 0.5 / 0.3 / 0.2 for the
first 200 steps; from step 200 (a second stage) the histories rise to 0.5 and the
comedies fall to 0.2. `data/<source>/share`, `epochs` and `wraps` say how much of each
was read. Every batch is a function of (seed, step): a resumed run, or one on another
number of hosts, reads the same rows.
"""

import os

import ml_collections

from experiments import clm_tiny

GENRES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "genres")


def source(genre: str, weight: float, stages: tuple = ()) -> dict:
  return {"train_files": (os.path.join(GENRES, f"{genre}_train.txt"),),
          "eval_files": (os.path.join(GENRES, f"{genre}_eval.txt"),),
          "weight": weight, "stages": stages}


def get_config(arg: str = "gpt2") -> ml_collections.ConfigDict:
  c = clm_tiny.get_config(arg)
  c.data.train_files = ()
  c.data.eval_files = ()  # the sources' own held-out plays, together
  c.data.mixture = {"comedy": source("comedy", 0.5, ((200, 0.2),)),
                    "tragedy": source("tragedy", 0.3),
                    "history": source("history", 0.2, ((200, 0.5),))}
  return c
