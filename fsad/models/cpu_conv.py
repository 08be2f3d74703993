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


def im2col_conv(lhs, rhs, window_strides, padding, precision=None):
    """A conv (NHWC x HWIO, explicit padding, no dilation or groups) as its k*k shifted
    windows concatenated on channels and one matmul. [B, H, W, Cin] -> [B, ho, wo, Cout]."""
    kh, kw_, cin, cout = rhs.shape
    cols = conv_windows(lhs, (kh, kw_), window_strides, padding)
    patches = jnp.concatenate(cols, axis=-1)  # [B, ho, wo, kh*kw*cin], (i, j, c) order
    return jnp.einsum("bhwk,ko->bhwo", patches, rhs.reshape(kh * kw_ * cin, cout),
                      precision=precision)


# Largest map (h * w) that `matmul_conv` takes for overlapping windows on CPU. For a
# 3x3 stride-1 conv (DRA's residual head; batch 48, 512 channels) benchmarks/conv_routes.py
# measured the slices-and-matmul route x20 (gradient) and x33 (second-order MAML) faster
# than XLA's CPU conv on 2x2 maps, and within x0.6 to x1.7 of it on 3x3 to 14x14 maps.
SMALL_MAP = 4


def matmul_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                dimension_numbers=None, feature_group_count=1, precision=None,
                max_map: int | None = SMALL_MAP, **kw):
    """`lax.conv_general_dilated` that, on CPU only, computes two kinds of conv (NHWC x
    HWIO, explicit padding) as shifted slices and one matmul (`im2col_conv`):

    - maps of at most `SMALL_MAP` = 4 pixels (the half-scale pyramid level at 96 px,
      the last ResNet stage at 64 px), where XLA's CPU convolution is 20-40x slower;
    - windows that do not overlap (stride >= kernel: AHL's stride-3 residual head; a
      ResNet's 1x1 stride-2 shortcut), where the slices hold no more numbers than the
      input (benchmarks/conv_routes.py).

    The same arithmetic up to summation order. Every other conv, and every conv on
    GPU/TPU (whose convolution kernels are the fast path), goes to
    `jax.lax.conv_general_dilated`. max_map: the largest map routed for overlapping
    windows; None routes every size (`cpu_matmul_conv`).
    """
    kh, kw_, cin, cout = rhs.shape
    small = max_map is None or lhs.shape[1] * lhs.shape[2] <= max_map
    tiled = window_strides[0] >= kh and window_strides[1] >= kw_
    routed = (jax.default_backend() == "cpu" and (small or tiled) and feature_group_count == 1
              and not isinstance(padding, str) and _undilated(lhs_dilation, rhs_dilation))
    if not routed:
        return jax.lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count, precision=precision, **kw)
    return im2col_conv(lhs, rhs, window_strides, padding, precision)


def cpu_matmul_conv(*args, **kw):
    """`matmul_conv` at every map size: on CPU every conv of it (NHWC x HWIO, explicit
    padding, no dilation or groups) is slices and one matmul. For AHL's meta-step, whose
    second-order gradient through DRA's residual head XLA's CPU convolution made 5x
    (3x3 maps) to 7x (7x7 maps) slower (`python benchmarks/throughput.py --methods ahl
    --img_size 96 --torch`: 12.5 s a step against PyTorch's 2.4 s; 2.5 s this way)."""
    return matmul_conv(*args, max_map=None, **kw)


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
