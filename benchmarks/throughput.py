"""Training throughput (images/s) of the jitted DevNet step.

Compares, in one run, fsad's step (training images on the device, batch
sampled inside the jitted function) against the conventional host-fed step
(batch sampled with NumPy and copied to the devices every step), and reports
the ratio. Same model, optimiser, batch and devices.

    python benchmarks/throughput.py --img_size 224 --batch 48 --steps 50
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs.devnet import get_config  # noqa: E402
from fsad.methods import build_method  # noqa: E402
from fsad.train import (batch_sharded, init_state, make_host_fed_step, make_mesh,  # noqa: E402
                        make_train_step, put_train_data)


def time_steps(run_step, state, steps: int, warmup: int = 3) -> tuple[float, object]:
    for i in range(warmup):
        state = run_step(state, i)
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for i in range(steps):
        state = run_step(state, warmup + i)
    jax.block_until_ready(state)
    return time.perf_counter() - t0, state


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--img_size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--n_normal", type=int, default=1131)
    ap.add_argument("--backbone", default="resnet18",
                    help="config.model.backbone, e.g. efficientnet_lite0")
    ap.add_argument("--json", default="", help="also write the figures here")
    args = ap.parse_args(argv)

    config = get_config()
    config.batch_size = args.batch
    config.model.backbone = args.backbone
    method = build_method(config)
    mesh = make_mesh()
    tx = method.optimizer(config.steps_per_epoch)
    rng = np.random.default_rng(0)
    shape = (args.img_size, args.img_size, 3)
    normal = rng.integers(0, 256, (args.n_normal, *shape), dtype=np.uint8)
    anomaly = rng.integers(0, 256, (10, *shape), dtype=np.uint8)
    key = jax.random.key(0)

    # fsad: device-resident data, sampling inside the step
    data = put_train_data(normal, anomaly, mesh)
    step = make_train_step(method, tx, mesh, args.batch)
    state = init_state(method, key, data, tx, mesh)
    t_dev, _ = time_steps(lambda s, i: step(s, data, jax.random.fold_in(key, i))[0], state,
                          args.steps)

    # baseline: host sampling + transfer each step
    host_step = make_host_fed_step(method, tx, mesh)
    shard = batch_sharded(mesh)
    half = args.batch // 2

    def host_run(s, i):
        r = np.random.default_rng(i)
        idx_n = r.integers(0, len(normal), args.batch - half)
        idx_a = r.integers(0, len(anomaly), half)
        batch = {"images": np.concatenate([normal[idx_n], anomaly[idx_a]]),
                 "labels": np.repeat(np.array([0, 1], np.int32), [args.batch - half, half])}
        batch = jax.device_put(batch, shard)
        return host_step(s, batch, jax.random.fold_in(key, i))[0]

    state = init_state(method, key, data, tx, mesh)
    t_host, _ = time_steps(host_run, state, args.steps)

    n_img = args.steps * args.batch
    out = {"backend": jax.default_backend(), "devices": len(jax.local_devices()),
           "backbone": args.backbone,
           "img_size": args.img_size, "batch": args.batch, "steps": args.steps,
           "device_sampled_img_per_s": n_img / t_dev, "host_fed_img_per_s": n_img / t_host,
           "speedup_vs_host_fed": t_host / t_dev}
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
