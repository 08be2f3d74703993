"""Time of DRA's residual head: XLA's convolution vs the slices-and-matmul route.

The residual head is a 3x3 conv (released: stride 1, padding 1; AHL: stride 3,
padding 0) over the (reference - input) feature map. One run times, for each
map size, the head's gradient and a two-step second-order MAML gradient (AHL's
inner loop), once with `jax.lax.conv_general_dilated` and once with
`fsad.models.cpu_conv.im2col_conv`, and prints the ratio. Same parameters,
inputs and devices. `matmul_conv` routes a conv to im2col on CPU where this
benchmark measured it faster (`SMALL_MAP`, non-overlapping windows).

    python benchmarks/conv_routes.py --batch 48 --channels 512 --maps 2 3 7 14 \\
        --stride 1 --padding 1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fsad.models.cpu_conv import im2col_conv  # noqa: E402
from fsad.losses import topk_mean  # noqa: E402


class ResidualHead(nn.Module):
    """DRA's residual head without BN, its conv routed through `conv`. [B,h,w,C] -> [B]."""

    channels: int
    conv: object
    stride: int = 1
    padding: int = 1

    @nn.compact
    def __call__(self, feats, ref_mean):
        p = self.padding
        x = nn.Conv(self.channels, (3, 3), strides=(self.stride, self.stride),
                    padding=((p, p), (p, p)), conv_general_dilated=self.conv,
                    name="conv")(ref_mean[None] - feats)
        return topk_mean(nn.Conv(1, (1, 1), name="score")(nn.relu(x))[..., 0], 0.1, True)


def seconds_per_call(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile
    t0 = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(fn(*args))
    return (time.perf_counter() - t0) / repeats


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--channels", type=int, default=1280)
    ap.add_argument("--maps", type=int, nargs="+", default=[3, 2])
    ap.add_argument("--stride", type=int, default=1)
    ap.add_argument("--padding", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default="", help="also write the figures here")
    args = ap.parse_args(argv)
    rows = []
    for hw in args.maps:
        feats = jax.random.normal(jax.random.key(0), (args.batch, hw, hw, args.channels))
        ref = feats[0]
        times = {}

        def im2col(lhs, rhs, strides, padding, **kw):
            return im2col_conv(lhs, rhs, strides, padding)

        for name, conv in (("xla", jax.lax.conv_general_dilated), ("matmul", im2col)):
            head = ResidualHead(args.channels, conv, args.stride, args.padding)
            params = head.init(jax.random.key(1), feats, ref)

            def loss(p, f, head=head):
                return jnp.mean(head.apply(p, f, ref) ** 2)

            def maml(p, f, loss=loss):
                for _ in range(2):
                    g = jax.grad(loss)(p, f)
                    p = jax.tree.map(lambda a, b: a - 1e-3 * b, p, g)
                return loss(p, f)

            times[name] = {
                "grad": seconds_per_call(jax.jit(jax.grad(loss)), params, feats,
                                         repeats=args.repeats),
                "maml2": seconds_per_call(jax.jit(jax.grad(maml)), params, feats,
                                          repeats=args.repeats)}
        for kind in ("grad", "maml2"):
            row = {"map": hw, "stride": args.stride, "padding": args.padding, "kind": kind,
                   "xla_ms": 1e3 * times["xla"][kind],
                   "matmul_ms": 1e3 * times["matmul"][kind],
                   "speedup": times["xla"][kind] / times["matmul"][kind]}
            rows.append(row)
            print(f"{hw}x{hw} map, stride {args.stride}, {kind:5s}: XLA conv "
                  f"{row['xla_ms']:8.1f} ms, matmul "
                  f"{row['matmul_ms']:7.1f} ms, speedup x{row['speedup']:.1f} "
                  f"(batch {args.batch}, C {args.channels}, {jax.default_backend()})", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"backend": jax.default_backend(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
