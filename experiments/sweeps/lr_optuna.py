"""TPE with asynchronous successive halving (ASHA) over clm_tiny's learning rate and warm-up.

  python -m launch.sweep --config experiments/clm_tiny.py \
      --sweep experiments/sweeps/lr_optuna.py --workdir runs/lr_optuna [--workers 2] \
      [--storage postgresql://USER@HOST/DB]

Trials evaluate every 80 steps; ASHA compares them at steps 80 and 240 (its rungs), after
the longest warm-up (60): a trial still warming up would be judged on a learning rate it
has not reached. A trial whose held-out loss falls out of the best third at a rung stops
there, its checkpoint written. The study is DIR/study.db unless --storage names a shared
database. Measured on this schedule in tokens (`python -m benchmarks.sweep`, three sampler
seeds): the median search within 0.008 nats of a 16-point grid's best, on 35-42% of the
grid's training steps (docs/scaling.md).
"""

from lmjax.sweep import IntUniform, LogUniform, Search


def get_sweep() -> Search:
  return Search(
      space={"optimizer.learning_rate": LogUniform(3e-4, 3e-2),
             "optimizer.warmup_steps": IntUniform(0, 60)},
      sampler="tpe", pruner="asha", num_trials=16, seed=0,
      sampler_options={"n_startup_trials": 5},
      pruner_options={"min_resource": 80, "reduction_factor": 3},
      fixed={"train.eval_every": 80, "train.checkpoint_every": 80})
