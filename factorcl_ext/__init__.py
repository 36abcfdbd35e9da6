"""factorcl-ext: fused pairwise-critic kernels for Factorized Contrastive Learning.

Public API (DESIGN.md): the critic statistics and fused losses, the MI bounds, drop-in modules
in :mod:`factorcl_ext.nn`, and the materialising oracle in :mod:`factorcl_ext.reference`.
"""

from . import reference
from ._backends import available_backends, build_info
from .ops import (
    CriticStats,
    concat_critic_loss,
    concat_critic_stats,
    infonce_lower_bound,
    nce_club_upper_bound,
    pair_dot_loss,
    pair_dot_stats,
    pair_mlp_loss,
    pair_mlp_stats,
    separable_critic_loss,
    separable_critic_stats,
)

__version__ = "0.1.0"

__all__ = [
    "CriticStats",
    "available_backends",
    "build_info",
    "concat_critic_loss",
    "concat_critic_stats",
    "infonce_lower_bound",
    "nce_club_upper_bound",
    "pair_dot_loss",
    "pair_dot_stats",
    "pair_mlp_loss",
    "pair_mlp_stats",
    "reference",
    "separable_critic_loss",
    "separable_critic_stats",
]
