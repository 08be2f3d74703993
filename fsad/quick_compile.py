"""Programs a run calls once whose optimised compile costs far more than their run (a
model's init, AHL's fresh heads and psi's init), compiled without XLA's backend
optimisations.

Measured on a 2-core AMD EPYC CPU, DRA's ResNet-18 init (`Method.init`, compile and
first call): 13.6 s optimised against 3.5 s without, at 448 px and at 64 px alike (the
call alone: 0.2 s against 1.0 s). Not for image operations, even those run once: DRA's
test reference set (CutPaste and rotation of 5 images, compile and call) took 4.1 s
unoptimised against 3.4 s at 448 px, and a CutPaste of 64 images ran for 19 s against
2 s. The options are the ones JAX_DISABLE_MOST_OPTIMIZATIONS=1 sets for every program
(jax._src.compiler), here for these programs only; the persistent compilation cache
keys them apart from an optimised compile of the same function.
"""

from __future__ import annotations

from typing import Callable

import jax

UNOPTIMIZED = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def quick_jit(fn: Callable, **jit_kwargs) -> Callable:
    """jax.jit(fn, **jit_kwargs), compiled without XLA's backend optimisations."""
    return jax.jit(fn, compiler_options=UNOPTIMIZED, **jit_kwargs)
