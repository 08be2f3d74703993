"""Faster CPU routes for two kinds of convolution, as drop-in `conv_general_dilated`s.

XLA's CPU convolution is slow on 2x2 maps, on non-overlapping strided windows and
on grouped (depthwise) kernels. Both routes below rewrite the conv as the k*k
shifted windows of the padded input, then combine them: one matmul for a small
map or non-overlapping windows, a per-channel weighted sum for a depthwise
kernel. Same sums up to summation order; every other case goes to
`jax.lax.conv_general_dilated`. benchmarks/conv_routes.py times both against XLA.
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


def _undilated(lhs_dilation, rhs_dilation) -> bool:
    return all(d in (None, 1, (1, 1)) for d in (lhs_dilation, rhs_dilation))


def matmul_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                dimension_numbers=None, feature_group_count=1, precision=None, **kw):
    """`lax.conv_general_dilated` that computes two kinds of conv (NHWC x HWIO, explicit
    padding) as shifted slices and one matmul:

    - maps of at most 2x2 pixels (the last ResNet stage of a 64 px image, DRA's half
      scale at 96 px), where XLA's CPU convolution is about 20x slower than on 3x3;
    - windows that do not overlap (stride >= kernel: DRA's residual head, 3x3 stride
      3; a ResNet's 1x1 stride-2 shortcut), where the slices hold no more numbers than
      the input, and the matmul is 4x (3x3 map) to 40x (2x2 map) faster than XLA's
      CPU conv forward and backward, second order included (benchmarks/conv_routes.py).

    The same arithmetic up to summation order; every other conv goes to
    `jax.lax.conv_general_dilated`.
    """
    kh, kw_, cin, cout = rhs.shape
    small = lhs.shape[1] * lhs.shape[2] <= 4
    tiled = window_strides[0] >= kh and window_strides[1] >= kw_
    routed = ((small or tiled) and feature_group_count == 1 and not isinstance(padding, str)
              and _undilated(lhs_dilation, rhs_dilation))
    if not routed:
        return jax.lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count, precision=precision, **kw)
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
    Other backends, and every other conv, go to `matmul_conv`.
    """
    cin = lhs.shape[-1]
    routed = (jax.default_backend() == "cpu" and feature_group_count == cin
              and rhs.shape[2] == 1 and rhs.shape[3] == cin and padding == "SAME"
              and _undilated(lhs_dilation, rhs_dilation))
    if not routed:
        return matmul_conv(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                           dimension_numbers, feature_group_count, precision, **kw)
    kh, kw_ = rhs.shape[:2]
    pads = jax.lax.padtype_to_pads(lhs.shape[1:3], (kh, kw_), window_strides, "SAME")
    windows = conv_windows(lhs, (kh, kw_), window_strides, pads)
    return sum(w * rhs[n // kw_, n % kw_, 0] for n, w in enumerate(windows))
