"""Faster CPU routes for two kinds of convolution, as drop-in `conv_general_dilated`s.

XLA's CPU convolution is slow on 2x2 maps, on non-overlapping strided windows and
on grouped (depthwise) kernels. Both routes below rewrite the conv as the k*k
shifted windows of the padded input, then combine them: one matmul for a small
map or non-overlapping windows (string paddings made explicit first), a per-channel
weighted sum for a depthwise kernel (its gradient written out, `depthwise_slices`).
Same sums up to summation order; every other case goes to
`jax.lax.conv_general_dilated`. benchmarks/conv_routes.py times both against XLA.
The depthwise route can be asked for on any backend (`model.depthwise_conv`,
`DEPTHWISE_CONVS`): XLA's grouped convolution is reported slow on GPUs too, above
all its gradient (jax-ml/jax#13800, #23713), which benchmarks/profile_step.py
measures.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from fsad.precision import accumulation_dtype


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
    if isinstance(padding, str) and jax.default_backend() == "cpu":
        # "SAME" / "VALID" as the explicit pads XLA would use: EfficientNet-Lite0's 1x1
        # convs then go to the matmul too (`routed_pads`)
        padding = routed_pads(lhs, rhs, window_strides, padding)
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


def routed_pads(lhs, rhs, window_strides, padding: str) -> tuple:
    """A string padding ("SAME", "VALID") of an NHWC x HWIO conv as the explicit
    ((top, bottom), (left, right)) pads `lax.conv_general_dilated` uses for it."""
    return tuple(jax.lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides,
                                         padding))


# how a depthwise conv is computed (`model.depthwise_conv`): "auto" as slices on CPU and
# as XLA's grouped convolution elsewhere, or either on every backend
DEPTHWISE_ROUTES = ("auto", "slices", "grouped")


def depthwise_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                   dimension_numbers=None, feature_group_count=1, precision=None,
                   route: str = "auto", **kw):
    """`lax.conv_general_dilated` whose depthwise case (NHWC x HWIO, groups = channels,
    no dilation) runs as k*k shifted slices times per-channel weights
    (`depthwise_slices`) where `route` (one of DEPTHWISE_ROUTES) asks for them: "auto"
    on CPU only, "slices" on every backend, "grouped" never.

    The same sums; it exists because XLA's CPU grouped convolution is about 10x
    slower (forward and backward) than the slices for Lite0's depthwise layers.
    Every other conv goes to `matmul_conv`.
    """
    cin = lhs.shape[-1]
    slices = route == "slices" or (route == "auto" and jax.default_backend() == "cpu")
    routed = (slices and feature_group_count == cin
              and rhs.shape[2] == 1 and rhs.shape[3] == cin
              and _undilated(lhs_dilation, rhs_dilation))
    if not routed:
        return matmul_conv(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                           dimension_numbers, feature_group_count, precision, **kw)
    if isinstance(padding, str):
        padding = routed_pads(lhs, rhs, window_strides, padding)
    return depthwise_slices(lhs, rhs, tuple(window_strides),
                            tuple(tuple(p) for p in padding))


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def depthwise_slices(x, w, strides: tuple, pads: tuple):
    """Depthwise conv as the k*k shifted windows of the padded input times the kernel's
    per-channel weights, summed: one pass over the input.

    x: [B, H, W, C]; w: [kh, kw, 1, C]; strides (sh, sw); pads ((top, bottom), (left,
    right)). Returns [B, ho, wo, C] in x's dtype: bfloat16 products are summed in float32
    and rounded once, as a convolution kernel sums them (the input gradient too).

    Its gradient is written out (`_depthwise_bwd`) rather than left to autodiff, whose
    transpose of the slices kept every window as an array of its own in the forward
    pass (for the weight gradient) and padded each window's gradient back apart. On a
    2-core CPU the Lite0 trunk's gradient at 96 px, batch 48, went from 1.87 to 1.70 s
    (medians of 5, timed in turn in one process), and with Lite0's 1x1 convs as
    matmuls too (`routed_pads`), the `:quick,lite0` DevNet train step from 2.23 to 1.81 s.
    Equal to XLA's grouped conv's gradients, second order included
    (`tests/test_efficientnet.py`; to 1e-13 in float64). Reverse mode only: a
    custom_vjp has no forward-mode derivative (jax.jvp).
    """
    kh, kw = w.shape[:2]
    acc = accumulation_dtype(x.dtype)
    windows = conv_windows(x, (kh, kw), strides, pads)
    return sum(win.astype(acc) * w[n // kw, n % kw, 0].astype(acc)
               for n, win in enumerate(windows)).astype(x.dtype)


def _depthwise_fwd(x, w, strides, pads):
    return depthwise_slices(x, w, strides, pads), (x, w)


def _depthwise_bwd(strides, pads, residuals, g):
    """(dL/dx, dL/dw) from g = dL/dy [B, ho, wo, C].

    dx: y[o] = sum_i xp[s*o + i] w[i], so dxp[p] = sum_i gd[p - i] w[i], with gd the
    gradient dilated by the stride (zeros between its entries): the k*k windows of gd
    padded by k - 1, each times its flipped weight, summed in one pass, cropped to x.
    dw[i, j] = sum over (b, o) of the window (i, j) of the padded input times g.
    """
    x, w = residuals
    kh, kw = w.shape[:2]
    (sh, sw), ((pt, _), (pl, _)) = strides, pads
    _, height, width, channels = x.shape
    ho, wo = g.shape[1:3]
    # gd, padded so that dx[h] = sum_i gdp[h + pt + kh - 1 - i] w[i] reads inside it
    low_h, low_w = kh - 1, kw - 1
    high_h = height + pt - 1 - ((ho - 1) * sh)
    high_w = width + pl - 1 - ((wo - 1) * sw)
    gdp = jax.lax.pad(g, jnp.zeros((), g.dtype),
                      ((0, 0, 0), (low_h, high_h, sh - 1), (low_w, high_w, sw - 1), (0, 0, 0)))
    acc = accumulation_dtype(g.dtype)
    dx = sum(gdp[:, pt + kh - 1 - i:pt + kh - 1 - i + height,
                 pl + kw - 1 - j:pl + kw - 1 - j + width, :].astype(acc) * w[i, j, 0].astype(acc)
             for i in range(kh) for j in range(kw))
    dw = jnp.stack([jnp.sum(win.astype(acc) * g.astype(acc), axis=(0, 1, 2))
                    for win in conv_windows(x, (kh, kw), strides, pads)])
    return dx.astype(x.dtype), dw.reshape(kh, kw, 1, channels).astype(w.dtype)


depthwise_slices.defvjp(_depthwise_fwd, _depthwise_bwd)


# `depthwise_conv` for each route, made once: a module's conv function is part of its
# identity
DEPTHWISE_CONVS = {route: partial(depthwise_conv, route=route) for route in DEPTHWISE_ROUTES}
