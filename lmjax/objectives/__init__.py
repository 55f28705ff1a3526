"""Objectives as plug-ins: the interface (`Objective`), the registry (`register`), lmjax's
own objectives (clm, mlm; sft, dpo, grpo; classification, regression, qa) and the losses they
share. Each objective's options are its own config class (`objective.*`)."""

from lmjax.objectives.base import (Batch, Dataset, Objective, ObjectiveConfig, build,
                                   objective_class, register, registered)
from lmjax.objectives.losses import (clm_targets, cross_entropy_sums, fused_cross_entropy_sums,
                                     max_predictions, mlm_mask, target_logprobs, token_metrics)
from lmjax.objectives.pretraining import CLM, MLM, LanguageModelling, LMConfig, MLMConfig
from lmjax.objectives.task_heads import QA, Classification, QAConfig, Regression, Task
from lmjax.objectives.chat import DPO, SFT, ChatObjective, DPOConfig, SFTConfig
from lmjax.objectives.grpo import GRPO, GRPOConfig
from lmjax.objectives.rewards import Completion, register_reward, registered_rewards

__all__ = [
    "Batch", "CLM", "ChatObjective", "Classification", "Completion", "DPO", "DPOConfig",
    "Dataset", "GRPO", "GRPOConfig",
    "LMConfig", "LanguageModelling", "MLM", "MLMConfig", "Objective", "ObjectiveConfig", "QA",
    "QAConfig", "Regression", "SFT", "SFTConfig", "Task", "build", "clm_targets",
    "cross_entropy_sums", "fused_cross_entropy_sums", "max_predictions", "mlm_mask",
    "objective_class", "register", "register_reward", "registered", "registered_rewards",
    "target_logprobs", "token_metrics",
]
