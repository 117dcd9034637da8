"""UTS, uncertainty-guided token sampling: which samples and which of their visual tokens go to the cloud."""

from device.uts.budget import BudgetGate, GateConfig
from device.uts.sampler import UncertaintyTokenSampler, UTSConfig, UTSResult, frame_bytes, jpeg_bytes
from device.uts.tokens import SourceFeatureStats, select_tokens, token_priority
from device.uts.uncertainty import AnswerUncertainty, answer_uncertainty, uncertainty_score

__all__ = [
    "AnswerUncertainty",
    "BudgetGate",
    "GateConfig",
    "SourceFeatureStats",
    "UTSConfig",
    "UTSResult",
    "UncertaintyTokenSampler",
    "answer_uncertainty",
    "frame_bytes",
    "jpeg_bytes",
    "select_tokens",
    "token_priority",
    "uncertainty_score",
]
