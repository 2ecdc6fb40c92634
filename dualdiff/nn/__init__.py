"""Neural-network building blocks shared by the dualdiff models."""
from dualdiff.nn.layers import (
    GroupNorm,
    SelfAttention2d,
    explicit_attention,
    forward_ad_active,
    jvp_safe,
    jvp_safe_enabled,
)

__all__ = ["GroupNorm", "SelfAttention2d", "explicit_attention", "forward_ad_active", "jvp_safe",
           "jvp_safe_enabled"]
