"""A ResNet stem's stride-2 convolution computed as space-to-depth (`model.stem`).

Of the DevNet step's 18.2 ms on an H100 (448 px, batch 48, bf16;
`benchmarks/profile_step.py`, 2026-12-05), the stem's 7x7 stride-2 convolution on the 3
input channels took 1.7 ms forward and 1.1 ms for its weight gradient: about 33 TFLOP/s,
against 140 for the whole step, since 3 channels fill little of a tensor core.
Space-to-depth, as MLPerf's ResNet on TPUs computes its stem, folds every 2x2 block of
the padded input into 12 channels and the 7x7 kernel (zero-padded to 8x8) into a 4x4 one
over those 12 channels: one stride-1 convolution at half the resolution with the same
products, summed in another order. The parameters keep their 7x7x3xC shape, so
checkpoints and torchvision weights load as before. Its speed on a GPU is not yet
measured: `model.stem=space_to_depth` is a row of the next GPU session's profile, and the
default stays the released convolution (on the 2-core CPU it ran at 0.89x).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fsad.models.cpu_conv import matmul_conv


def space_to_depth(x):
    """[B, H, W, C] (H, W even) -> [B, H/2, W/2, 4C], channel (p, q, c) holding
    x[:, 2i + p, 2j + q, c]."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h // 2, w // 2, 4 * c)


def kernel_to_depth(rhs):
    """[k, k, C, O] HWIO -> [k'/2, k'/2, 4C, O], k' = k rounded up to even (the kernel
    zero-padded at its end), input channel (p, q, c) holding rhs[2a + p, 2b + q, c]."""
    kh, kw, c, o = rhs.shape
    rhs = jnp.pad(rhs, ((0, kh % 2), (0, kw % 2), (0, 0), (0, 0)))
    kh, kw = rhs.shape[:2]
    rhs = rhs.reshape(kh // 2, 2, kw // 2, 2, c, o).transpose(0, 2, 1, 3, 4, 5)
    return rhs.reshape(kh // 2, kw // 2, 4 * c, o)


def space_to_depth_conv(lhs, rhs, window_strides, padding, lhs_dilation=None,
                        rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                        precision=None, **kw):
    """`lax.conv_general_dilated` for an NHWC x HWIO stride-2 convolution with explicit
    padding, as space-to-depth (module docstring); any other convolution (another stride,
    a string padding, dilation or groups) goes to `matmul_conv` as before.

    lhs: [B, H, W, C]; rhs: [k, k, C, O]; padding ((top, bottom), (left, right)).
    Returns [B, Ho, Wo, O], Ho = (H + top + bottom - k) // 2 + 1, as the convolution."""
    plain = (tuple(window_strides) != (2, 2) or isinstance(padding, str)
             or feature_group_count != 1 or any(d not in (None, (1, 1))
                                                for d in (lhs_dilation, rhs_dilation)))
    if plain:
        return matmul_conv(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                           rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                           feature_group_count=feature_group_count, precision=precision, **kw)
    (top, bottom), (left, right) = padding
    kh, kw_ = rhs.shape[:2]
    out_h = (lhs.shape[1] + top + bottom - kh) // 2 + 1
    out_w = (lhs.shape[2] + left + right - kw_) // 2 + 1
    # the padded input as long as the folded windows reach: 2 * (out + k'/2 - 1) pixels
    # (what the convolution's own padding leaves out is cut, what it lacks is zeros the
    # padded kernel's last row and column multiply)
    need_h, need_w = 2 * (out_h + (kh + 1) // 2 - 1), 2 * (out_w + (kw_ + 1) // 2 - 1)
    x = jnp.pad(lhs, ((0, 0), (top, max(0, need_h - lhs.shape[1] - top)),
                      (left, max(0, need_w - lhs.shape[2] - left)), (0, 0)))
    x = space_to_depth(x[:, :need_h, :need_w])
    return jax.lax.conv_general_dilated(x, kernel_to_depth(rhs), (1, 1), "VALID",
                                        dimension_numbers=dimension_numbers,
                                        precision=precision, **kw)


# the conv function of each route (`model.stem`), as cpu_conv's DEPTHWISE_CONVS
STEM_CONVS = {"conv": matmul_conv, "space_to_depth": space_to_depth_conv}
STEM_ROUTES = tuple(STEM_CONVS)
