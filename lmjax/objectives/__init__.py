"""Objectives as plug-ins: the interface (`Objective`), the registry (`register`), lmjax's
own objectives (clm, mlm; sft, dpo; classification, regression, qa) and the losses they
share. Each objective's options are its own config class (`objective.*`)."""

from lmjax.objectives.base import (Batch, Dataset, Objective, ObjectiveConfig, build,
                                   objective_class, register, registered)
from lmjax.objectives.losses import (clm_targets, cross_entropy_sums, fused_cross_entropy_sums,
                                     max_predictions, mlm_mask, target_logprobs, token_metrics)
from lmjax.objectives.pretraining import CLM, MLM, LanguageModelling, LMConfig, MLMConfig
from lmjax.objectives.task_heads import QA, Classification, QAConfig, Regression, Task
from lmjax.objectives.chat import DPO, SFT, ChatObjective, DPOConfig, SFTConfig

__all__ = [
    "Batch", "CLM", "ChatObjective", "Classification", "DPO", "DPOConfig", "Dataset",
    "LMConfig", "LanguageModelling", "MLM", "MLMConfig", "Objective", "ObjectiveConfig", "QA",
    "QAConfig", "Regression", "SFT", "SFTConfig", "Task", "build", "clm_targets",
    "cross_entropy_sums", "fused_cross_entropy_sums", "max_predictions", "mlm_mask",
    "objective_class", "register", "registered", "target_logprobs", "token_metrics",
]
