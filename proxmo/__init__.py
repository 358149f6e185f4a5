"""ProxMO, GiGPO and GRPO advantage estimators and PPO-style policy losses.

A pure library: it imports only numpy, scikit-learn, torch and the standard library.
Entry points: ``compute_advantages(AdvantageInputs, AdvantageConfig) -> AdvantageOutputs``
and ``proxmo.losses.policy_loss``.
"""

from proxmo.batch import AdvantageInputs, AdvantageOutputs
from proxmo.config import AdvantageConfig, LossConfig
from proxmo.estimators import compute_advantages, get_estimator, list_estimators, register_estimator
from proxmo.proximity import register_featurizer

__all__ = [
    "AdvantageConfig",
    "AdvantageInputs",
    "AdvantageOutputs",
    "LossConfig",
    "compute_advantages",
    "get_estimator",
    "list_estimators",
    "register_estimator",
    "register_featurizer",
]
