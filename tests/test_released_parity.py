"""fsad's Flax models against PyTorch re-implementations of the released code.

The same weights (a seeded PyTorch init, copied into fsad) and the same batch go
through `benchmarks/torch_released.py` (the released DevNet / DRA training step,
written anew) and through fsad's models, losses and optimiser. Compared: head
outputs, losses (same prior vectors on both sides), every parameter's gradient,
BatchNorm running statistics after the step, parameters after one released-style
Adam step, eval-mode scores, the released learning-rate schedules, and AHL's CDL
meta-step (on DevNet's head and on DRA's heads). 64 px images, small batches: the whole
file runs in about a minute on 2 CPU cores.

Tolerances are stated as measured maxima relative to the compared quantity's scale
(see `rel_err`); run with -s to print every measured figure.

Gradients and ReLU near-ties. A ReLU whose input lies within float32 rounding of 0
(|x| ~ 1e-6; a 64 px DRA batch has 1 to 3 such cells among its ~3 million ReLU
inputs) can take the other branch on one side. The gradient then differs by one
upstream entry at that cell, which a train-mode BatchNorm spreads over the layer: a
1e-3 to 1e-1 relative difference in every gradient below it, while both sides stay
within 1e-5 of a float64 PyTorch reference everywhere else (seen: a pre-activation
of +2.7e-6 in float64 came out -8.7e-7 in fsad's float32 and +2e-6 in torch's). So
the torch forward takes fsad's branch at every ReLU (`follow_fsad_branches`, from
the intermediates of the very fsad computation whose gradient is compared), the
test asserts that the cells where this changed torch's branch are near-ties
(|x| < 1e-4), and the gradients are then compared at 1e-4.
"""

import copy
import importlib
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import traverse_util  # noqa: E402

from benchmarks import torch_released as tr  # noqa: E402
from conftest import tiny_config  # noqa: E402
from fsad.losses import deviation_loss  # noqa: E402
from fsad.methods import build_method  # noqa: E402
from fsad.methods.devnet import DevNetModel  # noqa: E402
from fsad.methods.dra import DRAModel  # noqa: E402
from fsad.models.resnet import normalize_uint8  # noqa: E402
from fsad.optim import clip_grad_norm, make_optimizer, step_decay  # noqa: E402

# the modules (fsad.methods exports functions of the same names)
from fsad.methods import ahl as fsad_ahl  # noqa: E402
from fsad.methods import devnet as fsad_devnet  # noqa: E402
from fsad.methods import dra as fsad_dra  # noqa: E402
fsad_ahl_heads = importlib.import_module("fsad.methods.ahl.heads")  # its sample_prior

SIZE = 64
N_REF = 5
MEASURED = {}  # name -> measured figure, printed at the end (pytest -s)
# DRA's train-mode head outputs against PyTorch's: XLA's and PyTorch's float32
# convolutions sum in different orders, and train-mode BatchNorm over 6 images amplifies
# the difference. Measured 6e-6 to 1.2e-5 (the residual head, a difference of two
# feature maps, the largest) on an AMD EPYC host with AVX2, below 1e-5 on the host before.
DRA_TRAIN_HEADS_RTOL = 5e-5


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """One intra-op thread: on a shared 2-core machine OpenMP's spinning threads slow
    PyTorch down 20x when the other core is busy."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
    for k, v in MEASURED.items():
        print(f"{k}: {v:.3g}")


def rel_err(got, want) -> float:
    """max |got - want| / max |want| (want's scale; 1 when want is all zero)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    scale = np.abs(want).max() if want.size else 1.0
    return float(np.abs(got - want).max() / (scale if scale > 0 else 1.0))


def flat(tree) -> dict:
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def randomise_batch_norm(model, seed=1):
    """BN affine and running statistics off their init values (as a trained checkpoint's),
    so that the eval-mode and running-statistics checks mean something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(0.1 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))


def fixed_prior(seed):
    v = torch.randn(5000, generator=torch.Generator().manual_seed(seed))
    return v, jnp.asarray(v.numpy())


def uint8_batch(n, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), np.uint8)


def assert_same_tree(converted, model, *args):
    """The converted variables have exactly the Flax model's paths and shapes."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *args))
    want = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(dict(shapes)).items()}
    got = {k: np.shape(v) for k, v in traverse_util.flatten_dict(converted).items()}
    assert got == want


def compare_grads(name, g_fsad, g_torch, rtol=1e-4, exact_zero=("residual/conv/bias",)):
    """Leaf by leaf: max |diff| <= rtol * (the leaf's max |g|), except for leaves whose
    gradient is zero in exact arithmetic (`exact_zero` suffixes: DRA's residual conv bias
    right before a train-mode BN, which subtracts it again): there both sides hold
    rounding noise, compared against rtol times the largest gradient of the model."""
    a, b = flat(g_fsad), flat(g_torch)
    assert a.keys() == b.keys()
    top = max(np.abs(v).max() for v in b.values())
    worst, worst_leaf = 0.0, ""
    for k in b:
        scale = np.abs(b[k]).max()
        if k.endswith(exact_zero):
            err = np.abs(a[k] - b[k]).max() / top
            MEASURED[f"{name} grad {k} (exact 0) max|g| / global max"] = scale / top
        else:
            err = rel_err(a[k], b[k])
        if err > worst:
            worst, worst_leaf = err, k
    MEASURED[f"{name} grad worst leaf rel err ({worst_leaf})"] = worst
    assert worst < rtol, (worst_leaf, worst)


def adam_step_and_compare(name, kind, tm, params, grads, method):
    """One released-style update (clip_grad_norm_ 1, Adam 2e-4, coupled weight decay 1e-5)
    on both sides: torch.optim.Adam against the config's optax chain
    (`method.optimizer`, fsad.optim.make_optimizer).

    Adam's first step is lr * g / (|g| + 1e-8), g = clipped gradient + 1e-5 * param. Where
    the two terms of g nearly cancel (|g| ~ 1e-9, a few hundred entries of 11 million),
    the step is lr * (a ratio of rounding errors): |d step / d g| = lr * 1e-8 / (|g| +
    1e-8)^2 reaches lr / 1e-8. So entries are judged by how well conditioned they are:
    (a) both optimisers get the same gradients (torch's): parameters agree to 1e-4 lr
        beyond 2 ulp of the parameter wherever |g| > 1e-7, to 1e-2 lr elsewhere;
    (b) each side steps with its own gradients (equal to ~1e-5 of each leaf's scale):
        parameters agree to 1e-2 lr wherever |g| > 1e-6; below, the step's sign can
        differ (measured, reported).
    Returns fsad's params after (a)."""
    g_raw = tr.grads_to_flax(kind, tm)
    before = flat(params)
    opt = tr.released_optimizer(tm)
    torch.nn.utils.clip_grad_norm_(tm.parameters(), 1.0)
    g_eff = {k: np.abs(v + 1e-5 * before[k])
             for k, v in flat(tr.grads_to_flax(kind, tm)).items()}
    opt.step()
    want = flat(tr.state_dict_to_flax(kind, tm)["params"])
    tx = method.optimizer(20)  # the config's optimiser: clip 1, wd 1e-5, Adam 2e-4, StepLR
    lr = 2e-4
    step = jax.jit(lambda g, p: optax.apply_updates(p, tx.update(g, tx.init(p), p)[0]))
    out = {what: step(g, params) for what, g in (("same grads", g_raw), ("own grads", grads))}

    def worst(what, threshold, ulps):
        got = flat(out[what])
        good = bad = 0.0
        n_bad = 0
        for k in want:
            d = np.maximum(np.abs(got[k] - want[k]) - ulps * np.spacing(np.abs(want[k])), 0)
            ok = g_eff[k] > threshold
            good = max(good, float(d[ok].max(initial=0)) / lr)
            bad = max(bad, float(d[~ok].max(initial=0)) / lr)
            n_bad += int((~ok).sum())
        MEASURED[f"{name} params after step, {what}, |g| > {threshold:g}: max|diff| / lr"] = good
        MEASURED[f"{name} params after step, {what}, |g| <= {threshold:g}: max|diff| / lr "
                 f"({n_bad} entries)"] = bad
        return good, bad

    good, bad = worst("same grads", 1e-7, 2)
    assert good < 1e-4 and bad < 1e-2
    good, _ = worst("own grads", 1e-6, 0)
    assert good < 1e-2
    MEASURED[f"{name} parameter entries"] = sum(v.size for v in want.values())
    return out["same grads"]


# ---------------------------------------------------------------- ReLU branches

def fsad_relu_inputs(inter, kind) -> dict:
    """What every ReLU of fsad's model got, from its captured intermediates
    (capture_intermediates): {ReLU: [per call (scale), NHWC or [B, F]]}."""
    b = inter["backbone"]
    calls = lambda m: [np.asarray(x) for x in m["__call__"]]  # noqa: E731
    stem = calls(b["bn1"])
    pre = {"stem": stem}
    block_in = [np.asarray(nn.max_pool(nn.relu(jnp.asarray(x)), (3, 3), strides=(2, 2),
                                       padding=((1, 1), (1, 1)))) for x in stem]
    for i in range(1, 5):
        for j in range(2):
            p = f"layer{i}_{j}"
            blk = b[p]
            short = calls(blk["downsample_bn"]) if "downsample_bn" in blk else block_in
            pre[f"{p}/1"] = calls(blk["bn1"])
            pre[f"{p}/2"] = [x + y for x, y in zip(calls(blk["bn2"]), short)]
            block_in = calls(blk)
    if kind == "dra":
        pre["residual"] = calls(inter["heads"]["residual"]["bn"])
        pre["normality"] = calls(inter["heads"]["normality"]["fc1"])
    return pre


def follow_fsad_branches(tm, kind, fsad_pre: dict):
    """Makes every ReLU of the torch model take the branch fsad's ReLU took at the same
    cell: output = input * [fsad input > 0], so the gradient mask is fsad's too.

    Where the two sides' float32 inputs straddle 0 (|x| ~ 1e-6), this is the only
    difference from torch's own ReLU; everywhere else it is torch's ReLU. Returns
    (hook handles, report dict: cells compared, cells forced, max |torch input| over the
    forced cells)."""
    report = {"cells": 0, "forced": 0, "max_abs_forced": 0.0}
    masks = {k: [np.asarray(x > 0) for x in v] for k, v in fsad_pre.items()}

    def hook_for(keys):
        count = [0]

        def hook(module, inputs, output):
            c = count[0]
            count[0] += 1
            key = keys[c % len(keys)]
            mask = masks[key][c // len(keys)]
            if mask.ndim == 4:
                mask = mask.transpose(0, 3, 1, 2)
            x = inputs[0]
            xs = x.detach().numpy()
            assert xs.shape == mask.shape, (key, xs.shape, mask.shape)
            forced = (xs > 0) != mask
            report["cells"] += xs.size
            report["forced"] += int(forced.sum())
            if forced.any():
                report["max_abs_forced"] = max(report["max_abs_forced"],
                                               float(np.abs(xs[forced]).max()))
            return x * torch.as_tensor(mask, dtype=x.dtype)

        return hook

    for m in tm.modules():
        if isinstance(m, torch.nn.ReLU):
            m.inplace = False
    net = tm.feature_extractor.net
    handles = [net.relu.register_forward_hook(hook_for(["stem"]))]
    for i in range(1, 5):
        for j, blk in enumerate(getattr(net, f"layer{i}")):
            # a BasicBlock calls its relu twice: after bn1, then on bn2 + shortcut
            handles.append(blk.relu.register_forward_hook(
                hook_for([f"layer{i}_{j}/1", f"layer{i}_{j}/2"])))
    if kind == "dra":
        handles += [tm.composite_head.conv[2].register_forward_hook(hook_for(["residual"])),
                    tm.holistic_head.relu.register_forward_hook(hook_for(["normality"]))]
    return handles, report


def torch_forward_on_fsad_branches(name, kind, tm0, batch, fsad_intermediates):
    """The torch model's train-mode forward (on a copy of tm0: it updates its BN running
    statistics) with its ReLUs on fsad's branches. Checks that the cells where the
    branches differed are near-ties (|x| < 1e-4: float32 rounding of a ~0 input), so that
    the gradients can be compared at 1e-4. Returns (torch model, outputs)."""
    tm = copy.deepcopy(tm0)
    tm.train()
    handles, report = follow_fsad_branches(tm, kind, fsad_relu_inputs(fsad_intermediates, kind))
    try:
        out = tm(*batch["torch"])
    finally:
        for h in handles:
            h.remove()
    MEASURED[f"{name} ReLU inputs compared"] = report["cells"]
    MEASURED[f"{name} ReLU near-ties on the other branch in fsad (forced)"] = report["forced"]
    MEASURED[f"{name} max |torch ReLU input| at those cells"] = report["max_abs_forced"]
    assert report["cells"] > 0
    assert report["max_abs_forced"] < 1e-4, report
    return tm, out


def apply_and_capture(model, params, batch_stats, *xs):
    """fsad's train-mode forward with every module's output captured (compiled whole:
    op by op, a ResNet-18 compiles each layer's ops apart)."""
    return jax.jit(lambda variables, *xs: model.apply(
        variables, *xs, train=True, capture_intermediates=True,
        mutable=["batch_stats", "intermediates"]))({"params": params,
                                                    "batch_stats": batch_stats}, *xs)


# ---------------------------------------------------------------- DevNet

def test_devnet_matches_released():
    config = tiny_config("devnet", **{"data.img_size": SIZE, "model.n_scales": 2})
    method = build_method(config)
    model = DevNetModel(config.model.backbone, config.model.topk, config.model.topk_abs,
                        config.model.n_scales)
    torch.manual_seed(0)
    tm0 = tr.DevNet(n_scales=2, topk=config.model.topk)
    randomise_batch_norm(tm0)
    variables = tr.state_dict_to_flax("devnet", tm0)
    assert_same_tree(variables, model, jnp.zeros((1, SIZE, SIZE, 3)))
    params, stats = variables["params"], variables["batch_stats"]
    labels = np.array([0, 1, 0, 0, 1, 0, 1, 1], np.int32)
    prior_t, prior_j = fixed_prior(10)

    def make_batch(seed):
        images = uint8_batch(8, seed)
        return {"images": images, "torch": (tr.normalize_uint8(images),)}

    def loss_fn(params, images):
        """DevNet's training loss as fsad.methods.devnet computes it, with the outputs."""
        out, state = apply_and_capture(model, params, stats, normalize_uint8(images))
        loss = deviation_loss(out["score"], jnp.asarray(labels), prior_j)
        return loss, {"score": out["score"], **state}

    grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))

    def fsad_run(batch):
        (loss, aux), grads = grad_fn(params, jnp.asarray(batch["images"]))
        return {"loss": loss, **aux}, grads

    batch = make_batch(0)
    aux, grads_f = fsad_run(batch)
    # released: one train-mode forward (it updates the BN running stats), loss, backward
    tm, out_t = torch_forward_on_fsad_branches("devnet", "devnet", tm0, batch,
                                               aux["intermediates"])
    loss_t = tr.devnet_loss(out_t, torch.as_tensor(labels), prior_t)
    loss_t.backward()
    grads_t = tr.grads_to_flax("devnet", tm)
    stats_t = tr.state_dict_to_flax("devnet", tm)["batch_stats"]

    err = rel_err(aux["score"], out_t.detach().numpy()[:, 0])
    MEASURED["devnet train scores rel err"] = err
    assert err < 1e-5
    compare_grads("devnet", grads_f, grads_t)

    # the method's own training loss (fsad.train calls it): value and BN statistics after
    # the step (two trunk calls: both scales update them)
    fsad_batch = {"images": jnp.asarray(batch["images"]), "labels": jnp.asarray(labels)}
    mp = pytest.MonkeyPatch()
    mp.setattr(fsad_devnet, "sample_prior", lambda *a, **k: prior_j)
    try:
        loss_f, (_, stats_f) = jax.jit(method.loss)(params, stats, fsad_batch,
                                                     jax.random.key(0))
    finally:
        mp.undo()
    for what, value in (("method.loss", loss_f), ("loss", aux["loss"])):
        err = abs(float(value) - loss_t.item()) / abs(loss_t.item())
        MEASURED[f"devnet {what} rel err"] = err
        assert err < 1e-5, what
    a, b = flat(stats_f), flat(stats_t)
    assert a.keys() == b.keys()
    err = max(rel_err(a[k], b[k]) for k in b)
    MEASURED["devnet BN running stats rel err"] = err
    assert err < 1e-5

    adam_step_and_compare("devnet", "devnet", tm, params, grads_f, method)


# ---------------------------------------------------------------- DRA

FSAD_PRIOR_ORDER = sorted(tr.DRA_HEADS)  # fsad's head_losses draws per head in this order


def test_dra_matches_released():
    config = tiny_config("dra", **{"data.img_size": SIZE})
    assert (config.dra.residual_stride, config.dra.residual_padding) == (1, 1)
    assert config.model.n_scales == 2 and config.dra.n_ref == N_REF
    method = build_method(config)
    model = DRAModel(config.model.backbone, config.model.topk, fsad_dra.HEADS,
                     config.model.n_scales, 1, 1)
    torch.manual_seed(0)
    tm0 = tr.DRA(n_scales=2, topk=config.model.topk, n_ref=N_REF)
    randomise_batch_norm(tm0)
    variables = tr.state_dict_to_flax("dra", tm0)
    assert_same_tree(variables, model, jnp.zeros((1, SIZE, SIZE, 3)),
                     jnp.zeros((N_REF, SIZE, SIZE, 3)))
    params, stats = variables["params"], variables["batch_stats"]
    labels = np.array([0, 2, 1, 0, 2, 1], np.int32)  # interleaved: routing matters
    labels_t = torch.as_tensor(labels)
    priors = {h: fixed_prior(20 + i) for i, h in enumerate(tr.DRA_HEADS)}
    calls = []

    def fake_prior(*args, **kwargs):
        """fsad draws one prior per head, fold_in(key, i) over the sorted head names: the
        patch hands out the released side's vector of each head in that order."""
        name = FSAD_PRIOR_ORDER[len(calls) % 4]
        calls.append(name)
        return priors[name][1]

    def make_batch(seed):
        images, ref = uint8_batch(len(labels), seed), uint8_batch(N_REF, 100 + seed)
        x_t, r_t = tr.normalize_uint8(images), tr.normalize_uint8(ref)
        return {"images": images, "ref": ref, "x_t": x_t, "r_t": r_t,
                "torch": (torch.cat([r_t, x_t]), labels_t)}

    def loss_fn(params, images, ref):
        """DRA's training loss as fsad.methods.dra computes it, with the outputs."""
        heads, state = apply_and_capture(model, params, stats, normalize_uint8(images),
                                         normalize_uint8(ref))
        per_head = fsad_dra.head_losses(heads, jnp.asarray(labels), jax.random.key(0))
        return sum(per_head.values()), {"heads": heads, "per_head": per_head, **state}

    grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))

    def fsad_run(batch):
        (loss, aux), grads = grad_fn(params, jnp.asarray(batch["images"]),
                                     jnp.asarray(batch["ref"]))
        return {"loss": loss, **aux}, grads

    mp = pytest.MonkeyPatch()
    mp.setattr(fsad_dra, "sample_prior", fake_prior)
    try:
        batch = make_batch(0)
        aux, grads_f = fsad_run(batch)
        assert calls == FSAD_PRIOR_ORDER  # traced once: one prior per head, sorted order
        fsad_batch = {"images": jnp.asarray(batch["images"]), "labels": jnp.asarray(labels),
                      "ref": jnp.asarray(batch["ref"])}
        loss_f, (per_f, stats_f) = jax.jit(method.loss)(params, stats, fsad_batch,
                                                         jax.random.key(0))
    finally:
        mp.undo()

    tm, outs_t = torch_forward_on_fsad_branches("dra", "dra", tm0, batch, aux["intermediates"])
    # train mode: released routing (seen head rows label != 2, pseudo rows label != 1)
    rows = {"normality": labels >= 0, "seen": labels != 2, "pseudo": labels != 1,
            "residual": labels >= 0}
    for name, o in zip(tr.DRA_HEADS, outs_t):
        err = rel_err(np.asarray(aux["heads"][name])[rows[name]], o.detach().numpy())
        MEASURED[f"dra train {name} rel err"] = err
        assert err < DRA_TRAIN_HEADS_RTOL, name
    loss_t, per_t = tr.dra_loss(outs_t, labels_t, {h: p[0] for h, p in priors.items()})
    loss_t.backward()
    grads_t = tr.grads_to_flax("dra", tm)
    stats_t = tr.state_dict_to_flax("dra", tm)["batch_stats"]

    for name in tr.DRA_HEADS:
        for what, value in (("method.loss", per_f[f"loss_{name}"]),
                            ("head_losses", aux["per_head"][name])):
            err = abs(float(value) - per_t[name].item()) / abs(per_t[name].item())
            MEASURED[f"dra {what} {name} rel err"] = err
            assert err < 1e-5, (what, name)
    for what, value in (("method.loss", loss_f), ("loss", aux["loss"])):
        err = abs(float(value) - loss_t.item()) / abs(loss_t.item())
        MEASURED[f"dra total {what} rel err"] = err
        assert err < 1e-5, what
    compare_grads("dra", grads_f, grads_t)
    a, b = flat(stats_f), flat(stats_t)
    assert a.keys() == b.keys()
    err = max(rel_err(a[k], b[k]) for k in b)
    MEASURED["dra BN running stats rel err"] = err
    assert err < 1e-5

    new = adam_step_and_compare("dra", "dra", tm, params, grads_f, method)

    # eval mode, at the converted weights and after the step (each side's own updated
    # weights and running statistics): every head on every image, combined score
    x_t, r_t = batch["x_t"], batch["r_t"]
    x = normalize_uint8(jnp.asarray(batch["images"]))
    extras = {"ref_images": jnp.asarray(batch["ref"])}
    score = jax.jit(method.score)
    for when, tmodel, v in (("at init", tm0, variables),
                            ("after the step", tm, {"params": new, "batch_stats": stats_f})):
        tmodel.eval()
        with torch.no_grad():
            outs = tmodel(torch.cat([r_t, x_t]))
        got = score({**v, "extras": extras}, x)
        for name, o in zip(tr.DRA_HEADS, outs):
            part = -got[name] if name == "normality" else got[name]
            err = rel_err(part, o.numpy())
            MEASURED[f"dra eval {when} {name} rel err"] = err
            assert err < 1e-4, (when, name)
        err = rel_err(got["score"], tr.dra_score(outs).numpy())
        MEASURED[f"dra eval {when} combined score rel err"] = err
        assert err < 1e-4, when


# ---------------------------------------------------------------- schedules

@pytest.mark.parametrize("at_epoch_start", [True, False])
def test_step_decay_equals_released_steplr(at_epoch_start):
    """DRA steps StepLR at the start of each epoch, DevNet at the end; 30 epochs x 20."""
    steps_per_epoch, epochs = 20, 30
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=2e-4, weight_decay=1e-5)
    sched = tr.released_scheduler(opt)
    schedule = step_decay(2e-4, steps_per_epoch, 10, 0.1, at_epoch_start)
    torch_lr, fsad_lr = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()"
        for epoch in range(epochs):
            if at_epoch_start:
                sched.step()
            for j in range(steps_per_epoch):
                torch_lr.append(opt.param_groups[0]["lr"])
                fsad_lr.append(float(schedule(epoch * steps_per_epoch + j)))
                opt.step()
            if not at_epoch_start:
                sched.step()
    np.testing.assert_allclose(fsad_lr, torch_lr, rtol=1e-6)
    decays = [i // steps_per_epoch for i in range(1, len(torch_lr))
              if torch_lr[i] < torch_lr[i - 1]]
    assert decays == ([9, 19, 29] if at_epoch_start else [10, 20])


def test_clipping_equals_clip_grad_norm():
    """fsad's clipping scales as torch.nn.utils.clip_grad_norm_ does, by max_norm / (‖g‖ +
    1e-6), to float rounding (3 ulp); optax.clip_by_global_norm, which fsad used before,
    scales by max_norm / ‖g‖: 1e-6 / ‖g‖ apart (relative), 8e-7 at ‖g‖ = 1.3, more than
    the rounding. Norms below max_norm, at it and above."""
    rng = np.random.default_rng(0)
    shapes = {"conv": (3, 3, 4, 8), "bias": (8,), "fc": (8, 1)}
    for norm in (0.4, 1.0, 1.0 + 1e-6, 1.3, 5.0):
        g = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
        scale = norm / np.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in g.values()))
        g = {k: (v * scale).astype(np.float32) for k, v in g.items()}
        params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes.values()]
        for p, v in zip(params, g.values()):
            p.grad = torch.from_numpy(v.copy())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        want = {k: p.grad.numpy() for k, p in zip(shapes, params)}

        def rel_err(clip):
            got, _ = clip.update(jax.tree.map(jnp.asarray, g), optax.EmptyState())
            return max(float(np.abs(np.asarray(got[k]) / want[k] - 1).max()) for k in shapes)

        assert rel_err(clip_grad_norm(1.0)) < 3.6e-7, norm
        if norm == 1.3:
            assert rel_err(optax.clip_by_global_norm(1.0)) > 5e-7


# ---------------------------------------------------------------- AHL

# The AHL tests' bank rows: AHL_NN normals, AHL_NA seen anomalies, then one pseudo anomaly
# per normal; three tasks of mixed classes and sizes (padding), their loss weights
AHL_NN, AHL_NA = 10, 4
AHL_SUPPORT = [[0, 1, 2, 21, 10, 11], [3, 4, 5, 6, 20, 12], [7, 8, 9, 23, 22, 13, 11, 10]]
AHL_QUERY = [[3, 4, 15, 16, 12, 13], [0, 1, 2, 11, 19], [0, 5, 6, 21, 10, 12, 13]]
AHL_WEIGHTS = np.array([0.2, 0.3, 0.5], np.float32)
AHL_LR, AHL_WD = 2e-3, 1e-4  # the released AHL outer optimiser (and clip 1)


def ahl_tasks(base):
    """The tasks as fsad's `Tasks.device_arrays` holds them (numpy): idx, lab and
    `base`'s class-balance weight per sample, 0 on padding."""

    def lab(rows):
        return np.array([0 if i < AHL_NN else 1 if i < AHL_NN + AHL_NA else 2 for i in rows])

    def padded(sets):
        width = max(map(len, sets))
        idx = np.zeros((len(sets), width), np.int32)
        labs = np.zeros((len(sets), width), np.int32)
        w = np.zeros((len(sets), width), np.float32)
        for t, rows in enumerate(sets):
            idx[t, :len(rows)] = rows
            labs[t, :len(rows)] = lab(rows)
            w[t, :len(rows)] = fsad_ahl.class_balance(lab(rows), base)
        return idx, labs, w

    tasks = {}
    for prefix, sets in (("support", AHL_SUPPORT), ("query", AHL_QUERY)):
        tasks[f"{prefix}_idx"], tasks[f"{prefix}_lab"], tasks[f"{prefix}_weight"] = \
            padded(sets)
    return tasks


def fsad_meta_steps(hm, params, bank_np, tasks_np, inner_steps, inner_lr, first_order=False):
    """fsad's CDL step from `params` with the released AHL outer optimiser (clip 1, Adam
    2e-3, coupled wd 1e-4), its outer gradient kept in the optimiser state on the way (one
    compile). Call it with fsad's prior patched. Returns (outer grads, step output,
    params after the step)."""
    released = make_optimizer(AHL_LR, AHL_WD, clip_norm=1.0)

    def update(g, state, p=None):
        updates, inner = released.update(g, state[0], p)
        return updates, (inner, g)

    capture = optax.GradientTransformation(
        lambda p: (released.init(p), jax.tree.map(jnp.zeros_like, p)), update)
    step, _, _ = fsad_ahl.make_meta_step(hm, capture, inner_steps, inner_lr, first_order)
    new_f, (_, grads_f), out = step(
        params, capture.init(params), [jnp.asarray(b) for b in bank_np],
        {k: jnp.asarray(v) for k, v in tasks_np.items()}, jnp.asarray(AHL_WEIGHTS),
        jnp.arange(AHL_NN + AHL_NA), jax.random.key(0))
    return grads_f, out, new_f


def torch_meta_step(head, bank_np, tasks_np, prior, inner_steps, inner_lr, loss=None,
                    first_order=False):
    """The PyTorch meta-step (benchmarks/torch_released.py) on the same bank (NHWC ->
    NCHW) and tasks, with torch.optim.Adam(2e-3, wd 1e-4) and clip 1 as the outer step,
    its tasks looped. Returns (total loss, task losses [T]).

    Before it, the same step with the tasks vmapped (`vmap_tasks`, throughput.py's
    vmap_fp32) runs on copies of the head, second and first order, and must agree with
    the loop: the task losses to 1e-6, the clipped outer gradient and the params after
    the outer step to 1e-5 of their scale."""
    bank_t = [torch.as_tensor(b).permute(0, 3, 1, 2).contiguous() for b in bank_np]
    tasks_t = {k: torch.as_tensor(v).long() if v.dtype == np.int32 else torch.as_tensor(v)
               for k, v in tasks_np.items()}
    kw = {} if loss is None else {"loss": loss}

    def run(h, vmap_tasks, order):
        opt = torch.optim.Adam(h.parameters(), lr=AHL_LR, weight_decay=AHL_WD)
        tstep = tr.make_torch_meta_step(h, opt, inner_steps, inner_lr, order,
                                        clip_norm=1.0, vmap_tasks=vmap_tasks, **kw)
        total, losses = tstep(bank_t, tasks_t, torch.as_tensor(AHL_WEIGHTS), prior)
        return total, losses, {n: (p.grad, p.detach()) for n, p in h.named_parameters()}

    for order in (True, False):  # first order, then second
        (_, losses_v, leaves_v), (_, losses, leaves) = (
            run(copy.deepcopy(head), vmap_tasks, order) for vmap_tasks in (True, False))
        name = (f"ahl{'' if loss is None else ' dra'} torch {('second', 'first')[order]} "
                f"order, tasks vmapped against looped")
        err = rel_err(losses_v.numpy(), losses.numpy())
        MEASURED[f"{name}: query losses rel err"] = err
        assert err < 1e-6
        for i, what in enumerate(("outer grad", "params after the outer step")):
            scale = max(float(v[i].abs().max()) for v in leaves.values())
            err = max(float((leaves_v[n][i] - v[i]).abs().max()) for n, v in leaves.items())
            MEASURED[f"{name}: {what} max|diff| / scale"] = err / scale
            assert err < 1e-5 * scale, what
    return run(head, False, first_order)[:2]


def compare_meta_steps(name, out, grads_f, new_f, total_t, losses_t, grads_t, new_t):
    """Per-task query losses and their weighted sum (rel 1e-5), the clipped outer gradient
    (every leaf at 1e-4 of its scale) and the params after the outer Adam step (1e-3 lr)."""
    err = rel_err(out["task_losses"], losses_t.numpy())
    MEASURED[f"{name} query losses rel err"] = err
    assert err < 1e-5
    err = abs(float(out["loss"]) - float(total_t)) / abs(float(total_t))
    MEASURED[f"{name} weighted loss rel err"] = err
    assert err < 1e-5
    # torch's .grad here is the clipped gradient (clip_grad_norm_ runs in place)
    norm = np.sqrt(sum(float(jnp.sum(g ** 2)) for g in jax.tree.leaves(grads_f)))
    clipped_f = jax.tree.map(lambda g: g * min(1.0, 1.0 / (norm + 1e-6)), grads_f)
    MEASURED[f"{name} outer grad norm"] = norm
    compare_grads(f"{name} outer", clipped_f, grads_t, exact_zero=())
    want, got = flat(new_t), flat(new_f)
    assert got.keys() == want.keys()
    err = max(np.abs(got[k] - want[k]).max() for k in want) / AHL_LR
    MEASURED[f"{name} params after outer Adam step: max|diff| / lr"] = err
    assert err < 1e-3


def test_ahl_meta_step_matches_torch():
    """fsad's CDL step (second order, 2 inner steps, T = 3, DevNet head) against the
    PyTorch loop with functional heads and create_graph=True."""
    C = 32
    config = tiny_config("ahl_devnet")
    torch.manual_seed(3)
    head = tr.DevNetFeatureHead(C, config.model.topk)
    base = tr.to_flax("devnet", head.state_dict())
    hm, params = fsad_ahl.head_model(config, base)
    rng = np.random.default_rng(4)
    # a 64 px trunk's two scales (2x2, 1x1); rows: normals, seen, pseudo. Signed features,
    # so that the top cells' scores differ in sign and the bias gradient is not 0
    bank_np = [rng.normal(size=(2 * AHL_NN + AHL_NA, s, s, C)).astype(np.float32)
               for s in (2, 1)]
    tasks_np = ahl_tasks("devnet")
    prior_t, prior_j = fixed_prior(30)
    inner_steps, inner_lr = 2, 0.05

    mp = pytest.MonkeyPatch()
    mp.setattr(fsad_ahl_heads, "sample_prior", lambda *a, **k: prior_j)
    try:
        grads_f, out, new_f = fsad_meta_steps(hm, params, bank_np, tasks_np, inner_steps,
                                              inner_lr)
    finally:
        mp.undo()
    total_t, losses_t = torch_meta_step(head, bank_np, tasks_np, prior_t, inner_steps, inner_lr)
    grads_t = tr.grads_to_flax("devnet", head)["head"]
    new_t = tr.to_flax("devnet", head.state_dict())["params"]["head"]
    compare_meta_steps("ahl", out, grads_f, new_f, total_t, losses_t, grads_t, new_t)
    g = flat(grads_t)
    assert np.abs(g["conv/bias"]).max() > 1e-3 * np.abs(g["conv/kernel"]).max()  # not 0


def test_ahl_dra_meta_step_matches_torch():
    """fsad's CDL step on DRA's four heads (AHL's default base; second order, 2 inner
    steps, T = 3) against the PyTorch loop over `DRAFeatureHeads` and `weighted_dra_loss`:
    the same head weights on both sides (BN off its init values, fsad's copied back into
    torch with `load_flax_heads`); a fixed prior per head; the residual head's BN in eval
    mode on the base statistics."""
    # top-K: 2 of 25 cells, 1 of 4; AHL's residual 3x3 conv is slices and a matmul on
    # CPU at both sizes (fsad.models.cpu_conv.cpu_matmul_conv), torch's a real conv
    C, sizes = 16, (5, 2)
    config = tiny_config("ahl_dra")
    assert config.ahl.base == "dra" and config.dra.variant == "DRA"
    heads = fsad_dra.VARIANTS[config.dra.variant]
    rng = np.random.default_rng(5)
    bank_np = [rng.normal(size=(2 * AHL_NN + AHL_NA, s, s, C)).astype(np.float32)
               for s in sizes]
    ref_np = [b[:5].mean(0) for b in bank_np]  # [h,w,C]: the reference mean maps
    ref_j = [jnp.asarray(m) for m in ref_np]

    # the torch heads (PyTorch's init, BN affine and statistics randomised) as fsad variables,
    # loaded into other torch heads: every fsad variable reaches torch unchanged
    ref_t = [torch.as_tensor(m).permute(2, 0, 1) for m in ref_np]
    torch.manual_seed(6)
    src = tr.DRAFeatureHeads(C, config.model.topk, heads, ref_t, config.dra.residual_stride,
                             config.dra.residual_padding)
    randomise_batch_norm(src)
    variables = tr.to_flax("dra", src.state_dict())
    hm, params = fsad_ahl.head_model(config, variables, ref_j)
    assert_same_tree({"params": params, "batch_stats": variables["batch_stats"]["heads"]},
                     fsad_dra.DRAHeads(config.model.topk, heads, config.dra.residual_stride,
                                       config.dra.residual_padding),
                     [jnp.zeros((1, s, s, C)) for s in sizes], ref_j)
    head = tr.DRAFeatureHeads(C, config.model.topk, heads, ref_t, config.dra.residual_stride,
                              config.dra.residual_padding)
    tr.load_flax_heads("dra", variables, head)
    back, want = head.state_dict(), src.state_dict()
    assert back.keys() == want.keys()
    assert all(torch.equal(back[k], want[k]) for k in want)
    stats_before = {k: v.clone() for k, v in back.items() if "running" in k}

    # the heads' outputs agree before any step (eval-mode BN on the base statistics)
    head.eval()
    with torch.no_grad():
        outs_t = head([torch.as_tensor(b).permute(0, 3, 1, 2) for b in bank_np])
    outs_f = jax.jit(hm.apply)(params, [jnp.asarray(b) for b in bank_np])
    assert sorted(outs_t) == sorted(outs_f) == sorted(heads)
    for h in heads:
        err = rel_err(outs_f[h], outs_t[h].numpy())
        MEASURED[f"ahl dra heads {h} rel err"] = err
        assert err < 1e-5, h

    tasks_np = ahl_tasks("dra")
    priors = {h: fixed_prior(40 + i) for i, h in enumerate(sorted(heads))}
    calls = []

    def fake_prior(*args, **kwargs):
        """fsad's head_losses draws one prior per head in sorted head order: hand out the
        torch side's vector of each head in that order."""
        name = sorted(heads)[len(calls) % len(heads)]
        calls.append(name)
        return priors[name][1]

    inner_steps, inner_lr = 2, 0.05
    mp = pytest.MonkeyPatch()
    mp.setattr(fsad_dra, "sample_prior", fake_prior)
    try:
        grads_f, out, new_f = fsad_meta_steps(hm, params, bank_np, tasks_np, inner_steps,
                                              inner_lr)
    finally:
        mp.undo()
    # traced once: (inner steps + query) losses, each a draw per head, in order
    assert calls == sorted(heads) * (inner_steps + 1)
    total_t, losses_t = torch_meta_step(head, bank_np, tasks_np,
                                        {h: p[0] for h, p in priors.items()}, inner_steps,
                                        inner_lr, loss=tr.weighted_dra_loss)
    grads_t = tr.grads_to_flax("dra", head)["heads"]
    new_t = tr.to_flax("dra", head.state_dict())["params"]["heads"]
    compare_meta_steps("ahl dra", out, grads_f, new_f, total_t, losses_t, grads_t, new_t)
    # eval mode: the base statistics stay as they were
    after = head.state_dict()
    assert all(torch.equal(after[k], v) for k, v in stats_before.items())
    # every head and the residual BN's affine learn
    g = flat(grads_t)
    for leaf in ("seen/conv/kernel", "pseudo/conv/kernel", "normality/fc1/kernel",
                 "residual/conv/kernel", "residual/bn/scale", "residual/score/kernel"):
        assert np.abs(g[leaf]).max() > 0, leaf


def test_released_psi_matches_the_released_aux_model():
    """`:released`'s psi against the released AUX_Model (`tr.ReleasedPsi`): the same
    weights and the initial state fsad draws from its key give the same predictions; one
    step of fsad's psi on one task's query rows (a mask over the pool) is one released
    step on those rows (mse_loss, Adam 2e-3 with weight decay 1e-3). Dropout is off on
    both sides here (torch draws its own masks): `ScoreSequenceModel`'s dropout sits
    between the two LSTM layers, as nn.LSTM's, which test_ahl.py checks."""
    from fsad.config import released_psi
    from fsad.methods.ahl.importance import make_psi_fns
    from fsad.models.sequence import released_initial_state
    T, K, P = 7, 5, 12
    a = released_psi(tiny_config("ahl_dra")).ahl
    a.psi_dropout = 0.0
    torch.manual_seed(7)
    psi = tr.ReleasedPsi(T, a.psi_hidden, dropout=0.0)
    init, train_step, predict = make_psi_fns(T, a)
    _, opt_state = init(jax.random.key(0), K)
    params = tr.psi_to_flax(psi)
    rng = np.random.default_rng(8)
    seqs = rng.normal(size=(P, K, T)).astype(np.float32)
    targets = rng.normal(size=(P, T)).astype(np.float32)
    rows = np.zeros(P, np.float32)
    rows[[0, 3, 4, 8, 11]] = 1  # one task's query set among the pool's samples
    key = jax.random.key(9)

    def torch_state(n):  # the (h0, c0) fsad's apply draws from `key` for n rows
        return tuple(torch.tensor(np.asarray(s)) for s in released_initial_state(
            jax.random.split(key)[0], 2, n, a.psi_hidden))

    with torch.no_grad():
        want = psi(torch.as_tensor(seqs), torch_state(P)).numpy()
    got = np.asarray(predict(params, jnp.asarray(seqs), key))
    err = rel_err(got, want)
    MEASURED["released psi predictions rel err"] = err
    assert err < 1e-5

    new, _, loss = train_step(params, opt_state, jnp.asarray(seqs), jnp.asarray(targets),
                              jnp.asarray(rows), key)
    opt = torch.optim.Adam(psi.parameters(), lr=2e-3, weight_decay=1e-3)
    keep = torch.as_tensor(rows > 0)
    h0, c0 = torch_state(P)
    loss_t = torch.nn.functional.mse_loss(
        psi(torch.as_tensor(seqs)[keep], (h0[:, keep], c0[:, keep])),
        torch.as_tensor(targets)[keep])
    opt.zero_grad()
    loss_t.backward()
    opt.step()
    assert abs(float(loss) - loss_t.item()) < 1e-5 * loss_t.item()
    want, got = flat(tr.psi_to_flax(psi)), flat(new)
    assert got.keys() == want.keys()
    err = max(np.abs(got[k] - want[k]).max() for k in want) / 2e-3
    MEASURED["released psi params after one Adam step: max|diff| / lr"] = err
    assert err < 1e-3
