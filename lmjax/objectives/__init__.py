"""Objectives as plug-ins: the interface (`Objective`), the registry (`register`), lmjax's
own objectives (clm, mlm; classification, regression, qa; sft, dpo) and the losses they share."""

from lmjax.objectives.base import (Batch, Dataset, Objective, ObjectiveConfig, build,
                                   objective_class, register, registered)
from lmjax.objectives.losses import (clm_targets, cross_entropy_sums, fused_cross_entropy_sums,
                                     max_predictions, mlm_mask, summarize,
                                     target_logprobs)
from lmjax.objectives.pretraining import CLM, MLM, LanguageModelling
from lmjax.objectives.tasks import QA, Classification, Regression, Task, TaskConfig
from lmjax.objectives.chat import DPO, SFT, ChatObjective, DPOConfig, DPOOptions  # noqa: E402  (after the tasks: TaskConfig)

__all__ = [
    "Batch", "CLM", "ChatObjective", "DPO", "DPOConfig", "DPOOptions", "SFT", "Classification", "Dataset", "LanguageModelling", "MLM", "Objective",
    "ObjectiveConfig", "QA", "Regression", "Task", "TaskConfig", "build", "clm_targets",
    "cross_entropy_sums", "fused_cross_entropy_sums", "max_predictions", "mlm_mask",
    "objective_class", "register", "registered", "summarize", "target_logprobs",
]
