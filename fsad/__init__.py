"""fsad: few-shot and open-set supervised anomaly detection in JAX/Flax.

The pure pieces researchers compose:

    from fsad import sample_prior, deviation_loss, topk_mean
"""

from fsad.losses import (binary_cross_entropy, deviation, deviation_loss, focal_loss,
                         gaussian_p_value, sample_prior, topk_count, topk_mean)

__version__ = "0.1.0"

__all__ = ["binary_cross_entropy", "deviation", "deviation_loss", "focal_loss",
           "gaussian_p_value", "sample_prior", "topk_count", "topk_mean"]
