"""Settings of the advantage estimators and the policy loss (pure dataclasses).

The service's config tree (services/config.py) embeds these two classes as its
``algorithm`` and ``loss`` sections, so there is one definition of each field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class AdvantageConfig:
    estimator: str = "proxmo"  # grpo | gigpo | proxmo | proxmo_modulation_only | proxmo_soft_only
    gamma: float = 0.95  # discount of step returns
    invalid_penalty: float = 0.1  # subtracted from episode score and step return of invalid rows
    norm_by_std: bool = False  # episode term (S - mean) / (std + 1e-6); GiGPO's step term likewise
    stats_over: str = "rows"  # group statistics over step rows (reference) or over trajectories
    alpha: float = 4.0  # modulation exponent
    beta: float | None = None  # modulation strength; None: derived from target_range
    target_range: float = 0.05  # beta = target_range / (sigmoid(1) - 1/2)
    success_threshold: float = 0.5  # trajectory counts as a success when its score > threshold
    reference_success_rate: bool = False  # p = clip(mean row score, 0, 1) as the reference code
    temperature: float = 0.1  # proximity softmax temperature tau
    step_weight: float = 1.0  # omega in A = A_E + omega * A_S
    featurizer: str = "tfidf"  # tfidf | minilm | "module:attr"
    tfidf_max_features: int = 1024
    similarity_threshold: float = 0.95  # GiGPO similarity clustering (difflib ratio)

    @property
    def resolved_beta(self) -> float:
        if self.beta is not None:
            return self.beta
        return self.target_range / (1.0 / (1.0 + math.exp(-1.0)) - 0.5)


@dataclass(frozen=True)
class LossConfig:
    clip_ratio: float = 0.2
    clip_ratio_high: float | None = None  # None: symmetric clip
    dual_clip: float = 3.0  # dual-clip constant c > 1 for negative advantages
    kl_coef: float = 0.01  # k3 estimator to the reference policy
    entropy_coef: float = 0.001
    agg: str = "token-mean"  # token-mean | seq-mean-token-mean | seq-mean-token-sum
