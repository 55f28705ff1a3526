"""Hyperparameter sweeps over config overrides: a `Sweep` fixed up front (a grid and/or
seeded random draws) or a `Search` on Optuna that learns from finished trials. Every
trial is an ordinary `launch.train` run in DIR/<trial>/, so an interrupted one resumes.

A sweep file is Python with `get_sweep()` returning one of them:

    from lmjax.sweep import Choice, IntUniform, LogUniform, Search, Sweep, Uniform

Modules, each named for what it owns:
  space     the distributions: LogUniform, Uniform, IntUniform, Choice
  grid      Sweep and its trials
  search    Search: its checks, samplers seeded per trial, pruners
  seeding   the sampler that reseeds itself for every trial (imports Optuna)
  study     the study in its database: storage, queue, heartbeats, lost trials
  worker    a search's worker: takes trials and trains them until the study is done
  trials    one trial as a training process: arguments, directory lock, log
  reporter  launch.train's side of a search trial (TrialReporter)
  report    a trial's metrics read back, summary.csv/.md and the PNG plots
  files     the loader of sweep and experiment files
  run       running a sweep file (launch.sweep's body)
"""

from lmjax.sweep.files import load_sweep
from lmjax.sweep.grid import Sweep, Trial
from lmjax.sweep.search import Search
from lmjax.sweep.space import Choice, IntUniform, LogUniform, Uniform

__all__ = ["Choice", "IntUniform", "LogUniform", "Search", "Sweep", "Trial", "Uniform",
           "load_sweep"]
