"""Training, as research code imports it: the pure steps (`lmjax.steps`), the loop and its
hooks (`lmjax.loop`) and the run builder (`lmjax.run`), under the names lmjax 0.1 used."""

from lmjax.loop import Hook, check_skips, train_loop
from lmjax.run import (AUTO_DTYPE_KEY, TrainingRun, build_run, check_experiment, dry_run,
                       train_and_evaluate)
from lmjax.sharding import unbox
from lmjax.steps import StepFns, TrainState, eval_step, init_state, jit_steps, step_fns, train_step

__all__ = ["AUTO_DTYPE_KEY", "Hook", "StepFns", "TrainState", "TrainingRun", "build_run",
           "check_experiment", "check_skips", "dry_run", "eval_step", "init_state", "jit_steps",
           "step_fns", "train_and_evaluate", "train_loop", "train_step", "unbox"]
