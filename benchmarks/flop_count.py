"""The floating-point operations of a jitted step, counted from its jaxpr.

XLA's own count (`Compiled.cost_analysis()`) leaves out every operation that a backend
hands to a library: on a GPU, the convolutions that become cuDNN calls. On an H100 it
gave fsad's DevNet step 0.69 GFLOP per image at 448 px where the CPU's count of the same
step is 51.5, so its TFLOP/s were about 1/75 of the real rate (2026-12-05). The count
here is the convention of model-FLOP utilisation: 2 operations per multiply-add of every
convolution and matrix product in the traced program (forward, backward and optimizer,
as the step's jaxpr has them), the same on every backend and before any device splits
the work; the elementwise rest is left out. Operations inside a `scan` count `length`
times, a `cond` its costliest branch, a `while` loop's body once (its trip count is
not in the program), and a `shard_map` body once per device of its manual mesh axes.
The count is of what the program computes: a depthwise conv that `model.depthwise_conv`
routes to shifted slices is elementwise work it does not see, and the space-to-depth
stem's folded kernel has zero taps it does; `benchmarks/throughput.py`'s `model_flops`
therefore counts a step with both routes as the plain model has them.
"""
from __future__ import annotations

import math

import jax
from jax.extend import core as jex_core


def sub_jaxprs(value):
    """The jaxprs in one equation parameter (a jaxpr, a closed one, or a tuple of them)."""
    if isinstance(value, jex_core.ClosedJaxpr):
        return [value.jaxpr]
    if isinstance(value, jex_core.Jaxpr):
        return [value]
    if isinstance(value, (tuple, list)):
        return [j for v in value for j in sub_jaxprs(v)]
    return []


def conv_flops(eqn) -> float:
    """2 x the multiply-adds of one `conv_general_dilated` equation: every output
    element sums over the kernel's input features (of its group) and spatial taps, which
    is the kernel's size over its output-feature dimension; this holds for the grouped
    convolutions and for the batch-grouped ones of their weight gradients. Taps on the
    zeros that an input dilation inserts (the input gradient of a strided convolution)
    are not counted, so that gradient counts as its forward convolution; taps on the
    padding are, as in the usual count of a layer's operations."""
    out, kernel = eqn.outvars[0].aval, eqn.invars[1].aval
    out_feature_dim = eqn.params["dimension_numbers"].rhs_spec[0]
    taps = math.prod(kernel.shape) // kernel.shape[out_feature_dim]
    inserted = math.prod(eqn.params["lhs_dilation"] or (1,))
    return 2.0 * math.prod(out.shape) * taps / inserted


def dot_flops(eqn) -> float:
    """2 x the multiply-adds of one `dot_general` equation."""
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval
    depth = math.prod(lhs.shape[d] for d in lhs_contract)
    return 2.0 * math.prod(eqn.outvars[0].aval.shape) * depth


def manual_devices(params) -> int:
    """How many copies of a `shard_map` body run: the product of its manual mesh axes
    (all of them unless the equation names fewer; jax names them `newly_manual_axes`,
    older versions `manual_axes` or the complement, `auto`)."""
    mesh = params["mesh"]
    manual = params.get("newly_manual_axes", params.get("manual_axes"))
    if manual is None:
        manual = set(mesh.axis_names) - set(params.get("auto", ()))
    return math.prod(mesh.shape[a] for a in manual)


def jaxpr_flops(jaxpr) -> float:
    """The convolution and matmul operations of a jaxpr (a `Jaxpr` or `ClosedJaxpr`),
    nested programs included (module docstring)."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "conv_general_dilated":
            total += conv_flops(eqn)
        elif name == "dot_general":
            total += dot_flops(eqn)
        elif name == "cond":
            total += max((jaxpr_flops(b) for b in eqn.params["branches"]), default=0.0)
        else:
            inner = sum(jaxpr_flops(j) for v in eqn.params.values() for j in sub_jaxprs(v))
            if name == "scan":
                inner *= eqn.params["length"]
            elif name == "shard_map":
                inner *= manual_devices(eqn.params)
            total += inner
    return total


def step_flops(fn, *args) -> float | None:
    """The operations of one call `fn(*args)` (`jaxpr_flops` of its trace; None where it
    has no convolution or matmul). Tracing reads only the arguments' shapes and types, so
    it may come before or after a compile, not after donated arguments are consumed."""
    flops = jaxpr_flops(jax.make_jaxpr(fn)(*args))
    return flops or None
