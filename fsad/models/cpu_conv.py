"""Faster CPU routes for two kinds of convolution, as drop-in `conv_general_dilated`s.

XLA's CPU convolution is slow on 2x2 maps and on grouped (depthwise) kernels.
Both routes below rewrite the conv as the k*k shifted windows of the padded
input, then combine them: one matmul for a small map, a per-channel weighted
sum for a depthwise kernel. Same sums up to summation order; every other case
goes to `jax.lax.conv_general_dilated`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def conv_windows(lhs, kernel_hw, window_strides, pads) -> list:
    """The kh*kw strided windows of the padded NHWC input, in (i, j) order.

    lhs: [B, H, W, C]; pads: ((top, bottom), (left, right)).
    Returns: kh*kw arrays [B, ho, wo, C], window (i, j) at index i*kw + j.
    """
    kh, kw = kernel_hw
    sh, sw = window_strides
    (pt, pb), (pl, pr) = pads
    x = jnp.pad(lhs, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    ho = (x.shape[1] - kh) // sh + 1
    wo = (x.shape[2] - kw) // sw + 1
    return [x[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw, :]
            for i in range(kh) for j in range(kw)]


def small_map_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                   dimension_numbers=None, feature_group_count=1, precision=None, **kw):
    """`lax.conv_general_dilated` that computes convs on maps of at most 2x2 pixels as
    shifted slices and one matmul (NHWC x HWIO, explicit padding).

    The same arithmetic up to summation order; it exists because XLA's CPU
    convolution is about 20x slower on 2x2 maps than on 3x3 ones (the last stage
    of a 64 px image, or the half scale of DRA's pyramid at 96 px).
    """
    plain = (lhs.shape[1] * lhs.shape[2] > 4 or feature_group_count != 1 or isinstance(padding, str)
             or any(d not in (None, 1, (1, 1)) for d in (lhs_dilation, rhs_dilation)))
    if plain:
        return jax.lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count, precision=precision, **kw)
    kh, kw_, cin, cout = rhs.shape
    cols = conv_windows(lhs, (kh, kw_), window_strides, padding)
    patches = jnp.concatenate(cols, axis=-1)  # [B, ho, wo, kh*kw*cin], (i, j, c) order
    return jnp.einsum("bhwk,ko->bhwo", patches, rhs.reshape(kh * kw_ * cin, cout),
                      precision=precision)


def depthwise_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                   dimension_numbers=None, feature_group_count=1, precision=None, **kw):
    """`lax.conv_general_dilated` whose depthwise case (NHWC x HWIO, groups = channels,
    "SAME" padding) runs as k*k shifted slices times per-channel weights on CPU.

    The same sums; it exists because XLA's CPU grouped convolution is about 10x
    slower (forward and backward) than the slices for Lite0's depthwise layers.
    Other backends, and every other conv, go to `small_map_conv`.
    """
    cin = lhs.shape[-1]
    plain = (jax.default_backend() != "cpu" or feature_group_count != cin
             or rhs.shape[2] != 1 or rhs.shape[3] != cin or padding != "SAME"
             or any(d not in (None, 1, (1, 1)) for d in (lhs_dilation, rhs_dilation)))
    if plain:
        return small_map_conv(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                              dimension_numbers, feature_group_count, precision, **kw)
    kh, kw_ = rhs.shape[:2]
    pads = jax.lax.padtype_to_pads(lhs.shape[1:3], (kh, kw_), window_strides, "SAME")
    windows = conv_windows(lhs, (kh, kw_), window_strides, pads)
    return sum(w * rhs[n // kw_, n % kw_, 0] for n, w in enumerate(windows))
