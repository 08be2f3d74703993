"""The authors' released code itself, run beside fsad on the same weights and batch.

tests/test_released_parity.py checks fsad against `benchmarks/torch_released.py`,
PyTorch re-implementations of the released training steps. This file closes the
loop: it imports the released code (DevNet: mala-lab/deviation-network-image, DRA:
Choubo/DRA), runs its own `Trainer` for one step (its model, criterion, optimiser,
scheduler and loop), its own data pipeline (`datasets/mvtecad.py`: Resize,
RandomRotation, ToTensor, Normalize on real image files; DRA's pseudo anomalies, its
`datasets/cutmix.py`, and its outlier-exposure listing), its `Trainer.eval`,
DevNet's localisation map (`localization.py`) and the dataset converters
(`data/convert_*.py`), and compares them with fsad and with `torch_released`. The
released code is not part of fsad, so this is opt-in:

    git clone https://github.com/mala-lab/deviation-network-image released/devnet
    git clone https://github.com/Choubo/DRA released/dra
    pip install torchvision matplotlib tqdm opencv-python-headless   # the released imports
    FSAD_RELEASED_CODE=released python -m pytest tests/test_released_code.py -s -n 0

Skipped without FSAD_RELEASED_CODE or torchvision (CI has neither). How the released
code is run on a CPU without downloads: `torchvision.models.resnet18(pretrained=True)`
gives an untrained ResNet-18 (the seeded weights are loaded next); `Tensor.cuda()`
returns the tensor (the released criterion and DRA's loop call it unconditionally);
`torch.normal` hands out fixed prior vectors (the released DeviationLoss draws a fresh
one per call), the same ones fsad's losses get; the dataloaders are one fixed batch.
Nothing else of the released code is changed but what a test's docstring names (the
converters run with a sorted os.listdir).
"""

import argparse
import contextlib
import copy
import importlib
import os
import random
import subprocess
import sys
import types
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ROOT = os.environ.get("FSAD_RELEASED_CODE")
pytestmark = pytest.mark.skipif(
    not ROOT, reason="FSAD_RELEASED_CODE (a folder holding checkouts devnet/ and dra/ of the "
                     "released code) is not set")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks import torch_released as tr  # noqa: E402
from conftest import tiny_config  # noqa: E402
from fsad import explain  # noqa: E402
from fsad.data import augment  # noqa: E402
from fsad.data.decode import decode_image, load_image_folder  # noqa: E402
from fsad.evaluate import image_metrics  # noqa: E402
from fsad.losses import deviation_loss  # noqa: E402
from fsad.methods import build_method  # noqa: E402
from fsad.methods.devnet import DevNetModel  # noqa: E402
from fsad.methods.dra import DRAModel  # noqa: E402
from fsad.models.resnet import normalize_uint8  # noqa: E402
from fsad.optim import step_decay  # noqa: E402
from test_released_parity import (DRA_TRAIN_HEADS_RTOL, N_REF, SIZE, fixed_prior,  # noqa: E402
                                  randomise_batch_norm, rel_err, uint8_batch)

from fsad.methods import dra as fsad_dra  # noqa: E402
RELEASED_PACKAGES = ("modeling", "dataloaders", "datasets", "utils", "train")
MEASURED = {}


def import_torchvision():
    """torchvision, or a skip. A CUDA build of torchvision beside a CPU build of torch
    cannot load its C ops (nms, roi_align: the released code uses none of them), and its
    import then fails while registering their shapes; those two registration modules
    are skipped in that case, and the models and transforms import as usual."""
    try:
        return importlib.import_module("torchvision")
    except ImportError:
        pytest.skip("torchvision is not installed (the released code imports it)")
    except RuntimeError as err:
        if "torchvision::" not in str(err):
            raise
        for name in [k for k in sys.modules if k.startswith("torchvision")]:
            del sys.modules[name]
        for name in ("_meta_registrations", "_autograd_registrations"):
            sys.modules[f"torchvision.{name}"] = types.ModuleType(f"torchvision.{name}")
        return importlib.import_module("torchvision")


def load_released(kind: str, names) -> dict:
    """Imports modules of one released checkout ($FSAD_RELEASED_CODE/<kind>), then
    forgets its top-level packages: both checkouts name them modeling, datasets, ...
    Returns {module name: module}."""
    repo = os.path.join(ROOT, kind)
    if not os.path.isfile(os.path.join(repo, "modeling", "net.py")):
        pytest.fail(f"{repo} is not a checkout of the released {kind} code (no modeling/net.py)")

    def forget():
        for name in [k for k in sys.modules if k.split(".")[0] in RELEASED_PACKAGES]:
            del sys.modules[name]

    forget()
    sys.path.insert(0, repo)
    try:
        return {n: importlib.import_module(n) for n in names}
    finally:
        sys.path.remove(repo)
        forget()


@pytest.fixture
def released_env(monkeypatch):
    """The released code on a CPU without downloads, its priors handed out in order.
    Yields the list that torch.normal pops its vectors from."""
    tv = import_torchvision()
    plain_resnet18 = tv.models.resnet18
    monkeypatch.setattr(tv.models, "resnet18", lambda pretrained=False, **kw: plain_resnet18())
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    queue = []

    def normal(mean, std, *args, **kwargs):
        assert mean == 0.0 and tuple(std.shape) == (tr.PRIOR_SIZE,) and bool((std == 1).all())
        return queue.pop(0).clone()

    monkeypatch.setattr(torch, "normal", normal)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield queue
    torch.set_num_threads(n)
    assert not queue, f"{len(queue)} prior vectors were not used"
    for k, v in MEASURED.items():
        print(f"{k}: {v:.3g}")
    MEASURED.clear()


def load_weights(released_model, ours):
    """Copies `ours` (a torch_released model) into the released model; only the trunk's
    unused fc layer (torchvision's classifier) is the released model's alone."""
    missing, unexpected = released_model.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and missing and all(".net.fc." in k for k in missing), missing


def same_state(name, released_model, ours, tol=1e-6):
    """Every parameter and BatchNorm statistic of the two torch models agree."""
    a = {k: v for k, v in released_model.state_dict().items() if ".net.fc." not in k}
    b = ours.state_dict()
    assert a.keys() == b.keys()
    err = max(rel_err(a[k].float().numpy(), b[k].float().numpy()) for k in b)
    MEASURED[f"{name}: released Trainer vs torch_released after one step, max rel err"] = err
    assert err < tol


def lrs_of_released_epochs(trainer, run_epoch, epochs):
    """The lr of every optimiser step of `epochs` released epochs (one step each)."""
    seen = []
    trainer.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: seen.append(opt.param_groups[0]["lr"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DRA: "scheduler.step() before optimizer.step()"
        for epoch in range(epochs):
            run_epoch(epoch)
    return seen


def fsad_lrs(config, epochs):
    o = config.optim
    schedule = step_decay(o.lr, 1, o.decay_every_epochs, o.decay_factor,
                          o.get("decay_at_epoch_start", False))
    return [float(schedule(e)) for e in range(epochs)]


def check_optimiser(name, trainer, config):
    """The released Adam's settings are fsad's config."""
    group = trainer.optimizer.param_groups[0]
    o = config.optim
    assert isinstance(trainer.optimizer, torch.optim.Adam)
    assert (group["lr"], group["weight_decay"], group["betas"], group["eps"]) == (
        o.lr, o.weight_decay, (0.9, 0.999), 1e-8), name
    assert (trainer.scheduler.step_size, trainer.scheduler.gamma) == (
        o.decay_every_epochs, o.decay_factor), name


# ---------------------------------------------------------------- DevNet

def test_released_devnet_beside_fsad(released_env):
    mods = load_released("devnet", ["modeling.net", "train"])
    config = tiny_config("devnet", **{"data.img_size": SIZE, "model.n_scales": 2})
    labels = np.array([0, 1, 0, 0, 1, 0, 1, 1], np.int64)
    images = uint8_batch(len(labels), 0)
    x_t = tr.normalize_uint8(images)
    batch = [{"image": x_t, "label": torch.as_tensor(labels)}]
    args = argparse.Namespace(backbone="resnet18", n_scales=2, img_size=SIZE,
                              topk=config.model.topk, criterion="deviation", cuda=False,
                              workers=0)
    train_mod = mods["train"]
    train_mod.build_dataloader = lambda args, **kw: (batch, [])
    trainer = train_mod.Trainer(args)
    check_optimiser("devnet", trainer, config)

    torch.manual_seed(0)
    ours = tr.DevNet(n_scales=2, topk=config.model.topk)
    randomise_batch_norm(ours)
    load_weights(trainer.model, ours)
    start = copy.deepcopy(ours)

    # outputs in both modes: released, torch_released, fsad
    variables = tr.state_dict_to_flax("devnet", ours)
    model = DevNetModel(config.model.backbone, config.model.topk, config.model.topk_abs,
                        config.model.n_scales)
    x = normalize_uint8(jnp.asarray(images))
    for train in (True, False):
        rel, mine = copy.deepcopy(trainer.model).train(train), copy.deepcopy(ours).train(train)
        with torch.no_grad():
            out_r, out_m = rel(x_t)[:, 0].numpy(), mine(x_t)[:, 0].numpy()
        out_f = model.apply(variables, x, train=train, mutable=["batch_stats"] if train else False)
        out_f = np.asarray((out_f[0] if train else out_f)["score"])
        mode = "train" if train else "eval"
        MEASURED[f"devnet {mode} scores: released vs torch_released"] = rel_err(out_m, out_r)
        MEASURED[f"devnet {mode} scores: released vs fsad"] = rel_err(out_f, out_r)
        assert rel_err(out_m, out_r) < 1e-6 and rel_err(out_f, out_r) < 1e-5, mode
    # the released Trainer.eval (eval mode, its aucPerformance) on the batch as a test set,
    # against fsad's metrics of fsad's eval-mode scores
    trainer.test_loader = batch
    released_env.append(fixed_prior(11)[0])  # its test loss's prior
    auroc_r, aupr_r = trainer.eval()
    assert (auroc_r, aupr_r) == pytest.approx(tuple(image_metrics(labels, out_f).values()))

    # the released criterion against fsad's loss on the same outputs and prior
    prior_t, prior_j = fixed_prior(10)
    with torch.no_grad():
        out_r = copy.deepcopy(trainer.model).train()(x_t)
    released_env.append(prior_t)
    loss_r = trainer.criterion(out_r, torch.as_tensor(labels).unsqueeze(1).float()).item()
    loss_f = float(deviation_loss(jnp.asarray(out_r.numpy()[:, 0]), jnp.asarray(labels),
                                  prior_j))
    MEASURED["devnet loss: released criterion vs fsad"] = abs(loss_f - loss_r) / abs(loss_r)
    assert abs(loss_f - loss_r) < 1e-5 * abs(loss_r)

    # one released training epoch of one step against torch_released's step
    released_env.append(prior_t)
    trainer.train(0)
    opt = tr.released_optimizer(ours)
    sched = tr.released_scheduler(opt)
    tr.make_torch_step("devnet", ours, opt)(x_t, torch.as_tensor(labels), priors=prior_t)
    sched.step()  # the released DevNet steps StepLR at the end of each epoch
    same_state("devnet", trainer.model, ours)
    assert trainer.optimizer.param_groups[0]["lr"] == opt.param_groups[0]["lr"]

    # the learning rate of every step over 22 released epochs (one step each) and fsad's
    released_env.extend([prior_t] * 21)
    fresh = train_mod.Trainer(args)
    load_weights(fresh.model, start)
    lrs = lrs_of_released_epochs(fresh, fresh.train, 21)
    np.testing.assert_allclose(fsad_lrs(config, 21), lrs, rtol=1e-6)
    assert lrs[9] > lrs[10] and lrs[19] > lrs[20]


def test_released_devnet_localisation_beside_fsad(released_env):
    """The released localization.py's saliency map (the eval-mode score's gradient with
    respect to the normalised input, its `convert_to_grayscale`, scipy's gaussian_filter
    at sigma 4 as it imports it) against fsad's `explain.released_postprocess=True`."""
    mods = load_released("devnet", ["localization"])
    loc = mods["localization"]
    config = tiny_config("devnet", **{"data.img_size": SIZE, "model.n_scales": 2,
                                      "explain.released_postprocess": True})
    method = build_method(config)
    args = argparse.Namespace(backbone="resnet18", n_scales=2, img_size=SIZE,
                              topk=config.model.topk)
    torch.manual_seed(0)
    ours = tr.DevNet(n_scales=2, topk=config.model.topk)
    randomise_batch_norm(ours)
    released = loc.SemiADNet(args)
    load_weights(released, ours)
    released.eval()
    images = uint8_batch(3, 7)
    want = []
    for x in tr.normalize_uint8(images):
        released.zero_grad()  # the script's loop body, one image at a time
        inputs = x.view(1, 3, SIZE, SIZE)
        inputs.requires_grad = True
        released(inputs).backward()
        grey = loc.convert_to_grayscale(inputs.grad.numpy().squeeze(0)).squeeze(0)
        want.append(loc.gaussian_filter(grey, sigma=4))
    fn = explain.method_saliency_fn(method, config)
    got = np.asarray(fn(tr.state_dict_to_flax("devnet", ours),
                        jnp.asarray(images, jnp.float32)))
    err = float(np.abs(got - np.stack(want)).max())
    MEASURED["devnet saliency map (0..1): released localization.py vs fsad, max |diff|"] = err
    assert err < 1e-5


# ---------------------------------------------------------------- DRA

def test_released_dra_beside_fsad(released_env, tmp_path):
    mods = load_released("dra", ["modeling.net", "train"])
    config = tiny_config("dra", **{"data.img_size": SIZE})
    method = build_method(config)
    labels = np.array([0, 2, 1, 0, 2, 1], np.int64)
    images, ref = uint8_batch(len(labels), 0), uint8_batch(N_REF, 100)
    x_t, r_t = tr.normalize_uint8(images), tr.normalize_uint8(ref)
    labels_t = torch.as_tensor(labels)

    def loaders(args, **kw):
        # the released Trainer builds the training loader, then (nAnomaly set to 0, batch
        # size nRef) the reference loader
        return ([{"image": r_t}], None) if args.nAnomaly == 0 else (
            [{"image": x_t, "label": labels_t}], None)

    args = argparse.Namespace(backbone="resnet18", n_scales=2, img_size=SIZE,
                              topk=config.model.topk, criterion="deviation", cuda=False,
                              workers=0, total_heads=4, nRef=N_REF, nAnomaly=10,
                              batch_size=len(labels), pretrain_dir=None)
    train_mod = mods["train"]
    train_mod.initDataloader = types.SimpleNamespace(build=loaders)
    trainer = train_mod.Trainer(argparse.Namespace(**vars(args)))
    check_optimiser("dra", trainer, config)

    torch.manual_seed(0)
    ours = tr.DRA(n_scales=2, topk=config.model.topk, n_ref=N_REF)
    randomise_batch_norm(ours)
    load_weights(trainer.model, ours)
    start = copy.deepcopy(ours)
    variables = tr.state_dict_to_flax("dra", ours)

    # train-mode heads (released routing) and eval-mode heads and score
    rows = {"normality": labels >= 0, "seen": labels != 2, "pseudo": labels != 1,
            "residual": labels >= 0}
    model = DRAModel(config.model.backbone, config.model.topk, fsad_dra.HEADS,
                     config.model.n_scales, 1, 1)
    heads_f, _ = model.apply(variables, normalize_uint8(jnp.asarray(images)),
                                    normalize_uint8(jnp.asarray(ref)), train=True,
                                    mutable=["batch_stats"])
    rel, mine = copy.deepcopy(trainer.model).train(), copy.deepcopy(ours).train()
    with torch.no_grad():
        outs_r, outs_m = rel(torch.cat([r_t, x_t]), labels_t), mine(torch.cat([r_t, x_t]),
                                                                    labels_t)
    for name, o_r, o_m in zip(tr.DRA_HEADS, outs_r, outs_m):
        e_m = rel_err(o_m.numpy(), o_r.numpy())
        e_f = rel_err(np.asarray(heads_f[name])[rows[name]], o_r.numpy())
        MEASURED[f"dra train {name}: released vs torch_released"] = e_m
        MEASURED[f"dra train {name}: released vs fsad"] = e_f
        assert e_m < 1e-6 and e_f < DRA_TRAIN_HEADS_RTOL, name  # torch against torch: 1e-6
    with torch.no_grad():  # a fresh copy: the train-mode pass moved the running statistics
        outs_r = copy.deepcopy(trainer.model).eval()(torch.cat([r_t, x_t]), labels_t)
    got = jax.jit(method.score)({**variables, "extras": {"ref_images": jnp.asarray(ref)}},
                                normalize_uint8(jnp.asarray(images)))
    for name, o_r in zip(tr.DRA_HEADS, outs_r):
        part = -got[name] if name == "normality" else got[name]
        MEASURED[f"dra eval {name}: released vs fsad"] = rel_err(part, o_r.numpy())
        assert rel_err(part, o_r.numpy()) < 1e-4, name
    # the released Trainer.eval's anomaly score (its sum of the heads, normality negated,
    # written to result.txt) on the batch as a test set, against fsad's score
    trainer.args.experiment_dir = str(tmp_path)
    train_mod.args = trainer.args  # eval() saves its plot under the script's global args
    trainer.test_loader = [{"image": x_t, "label": torch.as_tensor(labels == 1)}]
    released_env.extend(fixed_prior(30 + i)[0] for i in range(4))  # its test loss's priors
    auroc_r, _ = trainer.eval()
    released_scores = np.loadtxt(tmp_path / "result.txt")[:, 1]
    err = rel_err(np.asarray(got["score"]), released_scores)
    MEASURED["dra test score: released Trainer.eval vs fsad"] = err
    assert err < 1e-4
    assert auroc_r == pytest.approx(image_metrics(labels == 1, got["score"])["auroc"])

    # the released criterion and generate_target against fsad's per-head losses
    priors = {h: fixed_prior(20 + i) for i, h in enumerate(tr.DRA_HEADS)}
    rel.train()
    with torch.no_grad():
        outs_r = rel(torch.cat([r_t, x_t]), labels_t)
    targets = trainer.generate_target(labels_t)
    for name, out, target in zip(tr.DRA_HEADS, outs_r, targets):
        released_env.append(priors[name][0])
        loss_r = trainer.criterion(out, target.float()).item()
        mask = rows[name]
        loss_f = float(deviation_loss(jnp.asarray(out.numpy()),
                                      jnp.asarray(target.numpy().astype(np.int32)),
                                      priors[name][1]))
        want_target = {"normality": labels == 0, "seen": labels[mask] == 1,
                       "pseudo": labels[mask] == 2, "residual": labels != 0}[name]
        np.testing.assert_array_equal(target.numpy(), want_target, err_msg=name)
        MEASURED[f"dra loss {name}: released criterion vs fsad"] = abs(loss_f - loss_r) / abs(
            loss_r)
        assert abs(loss_f - loss_r) < 1e-5 * abs(loss_r), name

    # one released training epoch of one step against torch_released's step
    released_env.extend(priors[h][0] for h in tr.DRA_HEADS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()"
        trainer.training(0)
        opt = tr.released_optimizer(ours)
        sched = tr.released_scheduler(opt)
        sched.step()  # the released DRA steps StepLR at the start of each epoch
    tr.make_torch_step("dra", ours, opt)(x_t, labels_t, ref=r_t,
                                         priors={h: p[0] for h, p in priors.items()})
    same_state("dra", trainer.model, ours)

    # the learning rate of every step over 21 released epochs (one step each) and fsad's
    released_env.extend(priors[h][0] for _ in range(21) for h in tr.DRA_HEADS)
    fresh = train_mod.Trainer(argparse.Namespace(**vars(args)))
    load_weights(fresh.model, start)
    lrs = lrs_of_released_epochs(fresh, fresh.training, 21)
    np.testing.assert_allclose(fsad_lrs(config, 21), lrs, rtol=1e-6)
    assert lrs[8] > lrs[9] and lrs[18] > lrs[19]


# ---------------------------------------------------------------- data pipeline

def released_toy_dataset(kind: str, tmp_path, outlier_root=None):
    """The released MVTecAD training dataset over PNG files of odd sizes (3 normals, 4
    anomalies of one class) written under tmp_path (its class "toy")."""
    mods = load_released(kind, ["datasets.mvtecad"])
    rng = np.random.default_rng(5)
    root = tmp_path / "toy"
    for split, cls, n in (("train", "good", 3), ("test", "good", 2), ("test", "crack", 4)):
        (root / split / cls).mkdir(parents=True)
        for i in range(n):
            h, w = rng.integers(70, 140, 2)
            path = root / split / cls / f"{i:03d}.png"
            Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(path)
    args = argparse.Namespace(dataset_root=str(tmp_path), classname="toy", img_size=SIZE,
                              n_anomaly=1, nAnomaly=1, ramdn_seed=42, cont_rate=0.0,
                              test_threshold=0, test_rate=0.0, know_class=None,
                              outlier_root=outlier_root)
    return mods["datasets.mvtecad"].MVTecAD(args, train=True)


def normal_paths(dataset):
    return [os.path.join(dataset.root, p) for p in dataset.images[:len(dataset.normal_idx)]]


@contextlib.contextmanager
def fixed_rotation(tv, angle):
    """A monkeypatch context in which torchvision's RandomRotation turns by `angle`."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tv.transforms.RandomRotation, "get_params",
                   staticmethod(lambda degrees: float(angle)))
        yield mp


@pytest.mark.parametrize("kind", ["devnet", "dra"])
def test_released_training_images_beside_fsad(kind, released_env, tmp_path):
    """The released MVTecAD dataset's training transform (Resize, RandomRotation(180),
    ToTensor, Normalize) on real PNG files of odd sizes, at fixed angles, against fsad's
    decode (resize), rotation and normalisation of the same files."""
    dataset = released_toy_dataset(kind, tmp_path)
    tv = import_torchvision()
    angles = augment.grid_angles(180.0)[[0, 9000, 30000, 47000, 65535]]
    worst = 0.0
    for path in normal_paths(dataset):
        for angle in angles:
            with fixed_rotation(tv, angle):
                image = dataset.transform(dataset.load_image(path))
            ours = augment.rotate(jnp.asarray(decode_image(path, SIZE)), angle)
            got = np.asarray(normalize_uint8(ours)).transpose(2, 0, 1)
            worst = max(worst, float(np.abs(got - image.numpy()).max()))
    MEASURED[f"{kind} training image: released transform vs fsad, max |diff|"] = worst
    assert worst < 1e-5


def test_released_pseudo_anomaly_beside_fsad(released_env, tmp_path):
    """DRA's released pseudo-anomaly transform (Resize, its CutMix: a patch of the image
    cut, ColorJitter(0.1 x 4) on the patch, pasted elsewhere; RandomRotation(180),
    ToTensor, Normalize) on real PNG files with the released random draws, against
    fsad's paste_apply of the same draws, rotation and normalisation; and fsad's
    box_size on the released area and aspect draws against the released rectangle."""
    dataset = released_toy_dataset("dra", tmp_path)
    tv = import_torchvision()
    draws = {}

    def record(name, fn):
        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            draws.setdefault(name, []).append((args, out))
            return out
        return wrapped

    worst, angles = 0.0, augment.grid_angles(180.0)[[0, 20000, 52000]]
    apply = jax.jit(augment.paste_apply)
    for trial in range(12):
        path = normal_paths(dataset)[trial % 3]
        draws.clear()
        torch.manual_seed(trial)
        random.seed(trial)  # the released CutMix draws from Python's random module
        with fixed_rotation(tv, angles[trial % 3]) as mp:
            mp.setattr(random, "uniform", record("uniform", random.uniform))
            mp.setattr(tv.transforms.ColorJitter, "get_params",
                       staticmethod(record("jitter", tv.transforms.ColorJitter.get_params)))
            mp.setattr(Image.Image, "crop", record("crop", Image.Image.crop))
            mp.setattr(Image.Image, "paste", record("paste", Image.Image.paste))
            image = dataset.transform_pseudo(dataset.load_image(path))
        (_, frac), = draws["uniform"][:1]
        ((_, box), _), = draws["crop"]
        ((_, _, to), _), = draws["paste"]
        (_, (order, *factors)), = draws["jitter"]
        # the released aspect: the first torch draw of the transform, drawn again
        torch.manual_seed(trial)
        log_ratio = torch.log(torch.tensor((0.3, 1 / 0.3)))
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
        size = (box[3] - box[1], box[2] - box[0])
        assert tuple(int(v) for v in augment.box_size(frac, aspect, SIZE, SIZE)) == size
        assert to[2] - to[0] == size[1] and to[3] - to[1] == size[0]
        draw = {"size": size, "source": (box[1], box[0]), "target": (to[1], to[0]),
                "jitter": (jnp.asarray(order.numpy()), *factors)}
        image_u8 = jnp.asarray(decode_image(path, SIZE))
        ours, mask = apply(image_u8, image_u8, draw)
        assert int(mask.sum()) == size[0] * size[1]
        ours = augment.rotate(ours, angles[trial % 3])
        got = np.asarray(normalize_uint8(ours)).transpose(2, 0, 1)
        worst = max(worst, float(np.abs(got - image.numpy()).max()))
    MEASURED["dra pseudo anomaly: released transform_pseudo vs fsad, max |diff|"] = worst
    assert worst < 1e-5


def test_released_outlier_exposure_images_beside_fsad(released_env, tmp_path):
    """DRA's released outlier exposure from a root in the MVTec layout (`get_ood_data`:
    the train/good images of every subset but the one trained) against fsad's
    `load_image_folder` for dra.outlier_root: the same images, and not the trained
    subset's or any test image."""
    rng = np.random.default_rng(9)
    root = tmp_path / "outliers"
    for subset, n in (("toy", 2), ("bottle", 3), ("cable", 2)):
        for split, count in (("train", n), ("test", 1)):
            (root / subset / split / "good").mkdir(parents=True)
            for i in range(count):
                h, w = rng.integers(40, 90, 2)
                Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(
                    root / subset / split / "good" / f"{subset}{i}.png")
    dataset = released_toy_dataset("dra", tmp_path, outlier_root=str(root))
    released = sorted(decode_image(p, SIZE).tobytes() for p in dataset.ood_data)
    ours = sorted(im.tobytes() for im in load_image_folder(str(root), SIZE, "toy"))
    assert len(released) == 5 and ours == released


# ---------------------------------------------------------------- dataset converters

# the released data/convert_<script>.py of DRA's repository: its output folder (under its
# working directory) and fsad's converter of the same dataset
RELEASED_CONVERTERS = {
    "AITEX": ("AITEX_anomaly_detection/AITEX", "AITEX"),
    "SDD": ("SDD_anomaly_detection/SDD", "sdd"),
    "optical": ("optical_anomaly_detection/optical_class", "optical"),
    "MastCam": ("MastCam_anomaly_detection/mastcam", "mastcam"),
    "BrainMRI": ("BrainMRI_anomaly_detection/brainmri", "brainmri"),
    "HeadCT": ("HeadCT_anomaly_detection/headct", "headct"),
    "hyperkvasir": ("hyperkvasir_anomaly_detection/hyperkvasir", "hyper-kvasir"),
    "elpv": ("elpv_anomaly_detection/elpv", "elpv"),
}
# runs a script with os.listdir sorted: the order fsad fixes where the released scripts
# take the filesystem's
SORTED_LISTING = ("import os, runpy, sys; listdir = os.listdir; "
                  "os.listdir = lambda path='.': sorted(listdir(path)); "
                  "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


def converted_files(root) -> dict:
    """{folder relative to root: {file name: pixels or array}} of a converted dataset."""
    out = {}
    for folder, _, files in os.walk(root):
        for f in files:
            if f == "manifest.json":  # fsad's record of the conversion
                continue
            path = os.path.join(folder, f)
            array = (np.load(path) if f.endswith(".npy")
                     else np.asarray(Image.open(path).convert("RGB")))
            out.setdefault(os.path.relpath(folder, root), {})[f] = array
    return out


@pytest.mark.parametrize("script", sorted(RELEASED_CONVERTERS))
def test_released_converter_beside_fsad(script, tmp_path):
    """The released converter script and fsad's on the same miniature raw layout (the one
    tests/test_convert.py writes): the same files in the same folders, pixel for pixel.

    The released scripts that list folders with os.listdir (AITEX, SDD, BrainMRI,
    Hyper-Kvasir) split the normals 3:1 in that order, which depends on the filesystem;
    here they run with a sorted listing, the order fsad fixes, so their split is fsad's.
    BrainMRI's names differ by fsad's normalised extensions alone (`normalised_name`).
    The released Optical script is given a root at which its file names are right.
    AITEX's layout leaves out the image without a mask and the one with two partial
    masks: the released script stops on them (fsad skips the first and merges the
    second)."""
    if script in ("AITEX", "SDD"):
        pytest.importorskip("cv2")  # the released script decodes with OpenCV
    from test_convert import RAW_LAYOUTS
    from fsad.data.convert import convert
    from fsad.data.convert.brainmri import normalised_name
    folder, ours = RELEASED_CONVERTERS[script]
    raw = str(tmp_path / "raw")
    written = RAW_LAYOUTS[script](raw)
    source = written if isinstance(written, str) else raw
    work = tmp_path / "released"
    work.mkdir()
    if script == "optical":
        # the released Optical script names a file by component 5 of its "/"-split path,
        # the class only when the root has four or five components (spec §9): this one
        # has four, and is the raw folder seen from `work`
        source = os.path.join(".", "..", ".", os.path.relpath(source, tmp_path))
    proc = subprocess.run([sys.executable, "-c", SORTED_LISTING,
                           os.path.join(ROOT, "dra", "data", f"convert_{script}.py"),
                           "--dataset_root", source], cwd=work, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    convert(ours, str(work / source), str(tmp_path / "fsad"))
    released = converted_files(work / folder)
    if script == "BrainMRI":
        released = {k: {normalised_name(f): a for f, a in v.items()} for k, v in released.items()}
    mine = converted_files(tmp_path / "fsad" / os.path.basename(folder))
    assert {k: sorted(v) for k, v in mine.items()} == {k: sorted(v) for k, v in released.items()}
    assert sum(len(v) for v in mine.values()) >= 5
    for k, files in released.items():
        for f, array in files.items():
            np.testing.assert_array_equal(mine[k][f], array, err_msg=f"{k}/{f}")
