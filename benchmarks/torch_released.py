"""PyTorch re-implementations of the authors' released training steps.

What the released code computes (written anew here, not copied), for two uses:

* parity tests (tests/test_released_parity.py): the same weights and batch through
  these modules and through fsad's Flax models must give the same head outputs,
  losses, gradients, BatchNorm statistics and optimiser step;
* a throughput benchmark of PyTorch against fsad (`make_torch_step`,
  `make_torch_meta_step`, `ahl_meta_step_for_benchmark`, `time_torch_step`).

Released code mirrored:
  DevNet  mala-lab/deviation-network-image: modeling/net.py `SemiADNet` (image
          pyramid: F.interpolate nearest to img_size // 2**s, one trunk and one 1x1
          conv at every scale, top-K mean of |s|, mean over scales), train.py (Adam
          2e-4, weight decay 1e-5, clip_grad_norm_ 1, StepLR(10, 0.1) stepped at the
          END of each epoch), modeling/layers/deviation_loss.py.
  DRA     Choubo/DRA: modeling/net.py (HolisticHead |fc2|, PlainHead, CompositeHead
          conv3x3 padding 1 + BN + ReLU then PlainHead; reference images in front of
          the batch through the trunk; training-mode routing), train.py
          (generate_target, the four head losses summed, the same Adam and clipping,
          StepLR stepped at the START of each epoch).
  AHL     fsad's CDL step (`make_meta_step` in fsad/methods/ahl/meta_step.py) in PyTorch:
          T tasks looped (or vmapped with torch.func), functional heads
          (torch.func.functional_call), `inner_steps` SGD steps keeping the graph,
          weighted query losses, one outer Adam step;
          on DevNet's head (`DevNetFeatureHead`, `weighted_devnet_loss`) or on DRA's
          heads (`DRAFeatureHeads`, `weighted_dra_loss`) over bank features.
          (The released AHL main.py cannot run as published; see spec §7.) Its
          importance model, modeling/aux_net.py, as `ReleasedPsi`.

The trunk is torchvision's ResNet-18 layout written out here (torchvision is not a
dependency): its state_dict keys are torchvision's, so `fsad.weights` maps it.
Module names follow the released models (`feature_extractor.net.*`, `conv`,
`holistic_head`, `seen_head`, `pseudo_head`, `composite_head`), so a released
checkpoint loads with `load_released_state_dict` (its unused `fc.*` dropped).

    python benchmarks/torch_released.py --kind devnet --img_size 64 --batch 8 \\
        --steps 3 --mode eager_fp32
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Callable, Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

MODES = ("eager_fp32", "amp_bf16_channels_last", "compile")
# the AHL meta-step's PyTorch configurations: its tasks one after another or vmapped
# (`make_torch_meta_step`'s vmap_tasks), both eager float32
AHL_MODES = {"eager_fp32": False, "vmap_fp32": True}
KINDS = ("devnet", "dra")
MARGIN = 5.0
PRIOR_SIZE = 5000


# ------------------------------------------------------------------ trunk

class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock (conv1/bn1/conv2/bn2, downsample.0/.1)."""

    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18Trunk(nn.Module):
    """torchvision's resnet18 without avgpool and fc: [B,3,H,W] -> [B,512,H/32,W/32].

    Initialised as torchvision initialises it (kaiming_normal_ fan_out for convs,
    BatchNorm weight 1 and bias 0).
    """

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 64
        for i, width in enumerate((64, 128, 256, 512), start=1):
            stride = 1 if i == 1 else 2
            setattr(self, f"layer{i}", nn.Sequential(BasicBlock(cin, width, stride),
                                                     BasicBlock(width, width, 1)))
            cin = width
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class FeatureResNet18(nn.Module):
    """The released wrapper (`FeatureRESNET18` / `feature_resnet18`): the trunk as `.net`."""

    def __init__(self):
        super().__init__()
        self.net = ResNet18Trunk()

    def forward(self, x):
        return self.net(x)


def topk_abs_mean(score_map: torch.Tensor, topk: float) -> torch.Tensor:
    """Released PlainHead / SemiADNet scoring: [B,1,h,w] -> [B,1], mean of the
    K = max(int(h*w*topk), 1) largest |s|."""
    x = score_map.reshape(score_map.shape[0], -1)
    k = max(int(x.shape[1] * topk), 1)
    return torch.topk(torch.abs(x), k, dim=1)[0].mean(dim=1).view(-1, 1)


def pyramid_images(image: torch.Tensor, n_scales: int, img_size: int | None = None):
    """Released image pyramid: scale 0 the input, scale s F.interpolate (nearest) to
    img_size // 2**s (img_size: the input's height unless given)."""
    size = image.shape[-2] if img_size is None else img_size
    return [image if s == 0 else F.interpolate(image, size=size // 2 ** s)
            for s in range(n_scales)]


# ------------------------------------------------------------------ DevNet

class DevNet(nn.Module):
    """Released `SemiADNet`: image [B,3,H,W] -> score [B,1]."""

    def __init__(self, n_scales: int = 2, topk: float = 0.1, img_size: int | None = None):
        super().__init__()
        self.n_scales, self.topk, self.img_size = n_scales, topk, img_size
        self.feature_extractor = FeatureResNet18()
        self.conv = nn.Conv2d(512, 1, kernel_size=1, padding=0)

    def forward(self, image):
        scores = [topk_abs_mean(self.conv(self.feature_extractor(x)), self.topk)
                  for x in pyramid_images(image, self.n_scales, self.img_size)]
        return torch.cat(scores, dim=1).mean(dim=1).view(-1, 1)


# ------------------------------------------------------------------ DRA

class HolisticHead(nn.Module):
    """Released normality head: pool -> fc1 512->256 -> ReLU -> fc2 256->1 -> |.|."""

    def __init__(self, in_dim: int = 512, hidden: int = 256):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(hidden, 1)

    def forward(self, x):
        x = F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)
        return torch.abs(self.fc2(self.relu(self.fc1(x))))  # dropout 0 in the released code


class PlainHead(nn.Module):
    """Released seen / pseudo head: 1x1 conv `scoring`, top-K mean of |s|. -> [B,1]."""

    def __init__(self, in_dim: int = 512, topk: float = 0.1):
        super().__init__()
        self.scoring = nn.Conv2d(in_dim, 1, kernel_size=1, padding=0)
        self.topk = topk

    def forward(self, x):
        return topk_abs_mean(self.scoring(x), self.topk)


class CompositeHead(PlainHead):
    """Released latent-residual head: mean(ref) - x -> conv3x3 (stride 1, padding 1) ->
    BN -> ReLU -> PlainHead. (AHL's re-implementation: stride 3, padding 0.)"""

    def __init__(self, in_dim: int = 512, topk: float = 0.1, stride: int = 1,
                 padding: int = 1):
        super().__init__(in_dim, topk)
        self.conv = nn.Sequential(nn.Conv2d(in_dim, in_dim, 3, stride, padding),
                                  nn.BatchNorm2d(in_dim), nn.ReLU())

    def forward(self, x, ref):
        x = ref.mean(dim=0, keepdim=True) - x
        return super().forward(self.conv(x))


# the released output order, and the fsad head each one is
DRA_HEADS = ("normality", "seen", "pseudo", "residual")
# fsad head name -> the released module attribute that holds it
DRA_MODULES = {"normality": "holistic_head", "seen": "seen_head", "pseudo": "pseudo_head",
               "residual": "composite_head"}


def add_dra_heads(module: nn.Module, in_dim: int, topk: float, heads=DRA_HEADS,
                  residual_stride: int = 1, residual_padding: int = 1) -> tuple:
    """Registers the released DRA heads named in `heads` (fsad names) on `module` under
    the released attribute names (DRA_MODULES), in the released order. Returns the
    registered heads' names in that order."""
    unknown = set(heads) - set(DRA_HEADS)
    if unknown:
        raise ValueError(f"unknown DRA heads {sorted(unknown)}; use some of {DRA_HEADS}")
    make = {"normality": lambda: HolisticHead(in_dim),
            "seen": lambda: PlainHead(in_dim, topk),
            "pseudo": lambda: PlainHead(in_dim, topk),
            "residual": lambda: CompositeHead(in_dim, topk, residual_stride, residual_padding)}
    names = tuple(h for h in DRA_HEADS if h in heads)
    for h in names:
        setattr(module, DRA_MODULES[h], make[h]())
    return names


class DRA(nn.Module):
    """Released DRA: forward(image, label) with image = cat([ref (n_ref), x (B)]) ->
    [normality, seen, pseudo, residual], each [n] (mean over scales).

    Training mode routes like the released code: seen head on label != 2, pseudo head
    on label != 1 (their outputs hold only those rows); eval mode every head on all.
    """

    def __init__(self, n_scales: int = 2, topk: float = 0.1, n_ref: int = 5,
                 img_size: int | None = None, residual_stride: int = 1,
                 residual_padding: int = 1):
        super().__init__()
        self.n_scales, self.topk, self.n_ref, self.img_size = n_scales, topk, n_ref, img_size
        self.feature_extractor = FeatureResNet18()
        add_dra_heads(self, 512, topk, DRA_HEADS, residual_stride, residual_padding)

    def forward(self, image, label=None):
        per_head = [[] for _ in DRA_HEADS]
        for x in pyramid_images(image, self.n_scales, self.img_size):
            feature = self.feature_extractor(x)
            ref, feature = feature[:self.n_ref], feature[self.n_ref:]
            if self.training:
                scores = [self.holistic_head(feature), self.seen_head(feature[label != 2]),
                          self.pseudo_head(feature[label != 1]),
                          self.composite_head(feature, ref)]
            else:
                scores = [self.holistic_head(feature), self.seen_head(feature),
                          self.pseudo_head(feature), self.composite_head(feature, ref)]
            for i, s in enumerate(scores):
                per_head[i].append(s)
        return [torch.cat(s, dim=1).mean(dim=1) for s in per_head]


def dra_score(outputs) -> torch.Tensor:
    """Released eval score: -normality + seen + pseudo + residual. -> [B]."""
    normality, seen, pseudo, residual = outputs
    return -normality + seen + pseudo + residual


# ------------------------------------------------------------------ losses

def sample_prior(num: int = PRIOR_SIZE, device=None) -> torch.Tensor:
    """The released criterion's reference draw: N(0, 1), `num` samples."""
    return torch.normal(mean=0.0, std=torch.full([num], 1.0, device=device))


def pick_prior(priors, name: str | None = None, device=None) -> torch.Tensor:
    """The prior vector of one loss: priors None (a fresh `sample_prior` draw, as the
    released criterion), one [l] tensor (used by every loss), or {head name: [l]}."""
    if priors is None:
        return sample_prior(device=device)
    if isinstance(priors, Mapping):
        return priors[name]
    return priors


def deviation_loss(y_pred: torch.Tensor, y_true: torch.Tensor, ref: torch.Tensor,
                   margin: float = MARGIN, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Released `DeviationLoss.forward`, with its prior sample vector `ref` passed in
    (the released one draws it inside, afresh on every call).

    weight: None, the batch mean (released); or [B] >= 0, fsad's
    `deviation_loss(..., mask=weight)`: sum(w * l) / sum(w), 0 when sum(w) = 0.
    """
    dev = (y_pred - torch.mean(ref)) / torch.std(ref)
    inlier = torch.abs(dev)
    outlier = torch.abs((margin - dev).clamp(min=0.0))
    per_sample = (1 - y_true) * inlier + y_true * outlier
    if weight is None:
        return torch.mean(per_sample)
    total = weight.sum()
    return (per_sample * weight).sum() / torch.where(total > 0, total, torch.ones_like(total))


def head_routing(labels: torch.Tensor) -> dict:
    """Which samples each DRA head's loss sees, and its targets (fsad's `head_routing`,
    the released routing): labels [B] {0 normal, 1 seen, 2 pseudo} ->
    {head: (targets [B] bool, mask [B] bool)}."""
    everything = torch.ones_like(labels, dtype=torch.bool)
    return {"normality": (labels == 0, everything),
            "seen": (labels == 1, labels != 2),      # pseudo anomalies left out
            "pseudo": (labels == 2, labels != 1),    # seen anomalies left out
            "residual": (labels != 0, everything)}   # every anomaly is 1


def generate_target(target: torch.Tensor):
    """Released DRA train.py `generate_target` (training): targets of the four heads in
    output order, the seen / pseudo ones for their routed rows only."""
    routes = head_routing(target)
    return [routes[h][0][routes[h][1]] for h in DRA_HEADS]


def dra_loss(outputs, target: torch.Tensor, priors=None):
    """Released DRA training loss: the four deviation losses summed.

    priors: None (a fresh draw per head, as the released criterion), one [l] tensor
    for every head, or {head name (DRA_HEADS): [l]}.
    Returns (total, {head: loss}).
    """
    losses = {}
    for name, out, tgt in zip(DRA_HEADS, outputs, generate_target(target)):
        ref = pick_prior(priors, name, out.device)
        losses[name] = deviation_loss(out.float(), tgt.float(), ref)
    return sum(losses.values()), losses


def devnet_loss(output: torch.Tensor, target: torch.Tensor, prior=None) -> torch.Tensor:
    """Released DevNet training loss: output [B,1], target [B] {0,1}."""
    ref = pick_prior(prior, None, output.device)
    return deviation_loss(output.float(), target.view(-1, 1).float(), ref)


# ------------------------------------------------------------------ weights -> fsad

def _np(t) -> np.ndarray:
    """A float32 copy: `.numpy()` shares the tensor's memory, which an optimizer step or
    clip_grad_norm_ later changes in place (and jnp.asarray may share it in turn)."""
    if isinstance(t, torch.Tensor):
        t = t.detach().float().cpu().numpy()
    return np.array(t, np.float32, copy=True)


# head key prefix (released module names) -> fsad module path
_DEVNET_HEADS = {"conv": ("head", "conv")}
_DRA_HEADS = {
    "holistic_head.fc1": ("heads", "normality", "fc1"),
    "holistic_head.fc2": ("heads", "normality", "fc2"),
    "seen_head.scoring": ("heads", "seen", "conv"),
    "pseudo_head.scoring": ("heads", "pseudo", "conv"),
    "composite_head.scoring": ("heads", "residual", "score"),
    "composite_head.conv.0": ("heads", "residual", "conv"),
    "composite_head.conv.1": ("heads", "residual", "bn"),
}
_BN_LEAVES = {"weight": ("params", "scale"), "bias": ("params", "bias"),
              "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}
TRUNK_PREFIX = "feature_extractor.net."


def _flax_key(heads: Mapping, key: str) -> tuple:
    """A released head key -> its fsad variable's flat key (collection, *path, leaf)."""
    prefix, leaf = key.rsplit(".", 1)
    if prefix not in heads:
        raise KeyError(key)
    path = heads[prefix]
    if path[-1] == "bn":
        collection, name = _BN_LEAVES[leaf]
        return (collection, *path, name)
    return ("params", *path, "bias" if leaf == "bias" else "kernel")


def to_flax(kind: str, tensors: Mapping) -> dict:
    """A released-layout state_dict (or any subset of it, e.g. {name: param.grad}) ->
    fsad Flax variables {"params": ..., "batch_stats": ...} of float32 arrays.

    Trunk through `fsad.weights.torchvision_resnet_to_flax`; heads by hand: conv
    [out,in,kh,kw] -> kernel [kh,kw,in,out], Linear [out,in] -> kernel [in,out],
    BatchNorm weight/bias/running_mean/running_var -> scale/bias/mean/var.
    `num_batches_tracked` and the trunk's `fc.*` are dropped. (`load_flax_heads`: the
    heads' way back.)
    """
    from flax import traverse_util

    from fsad.weights import torchvision_resnet_to_flax
    heads = {"devnet": _DEVNET_HEADS, "dra": _DRA_HEADS}[kind]
    trunk, flat = {}, {}
    for key, value in tensors.items():
        if value is None or key.endswith("num_batches_tracked"):
            continue
        if key.startswith(TRUNK_PREFIX):
            trunk[key[len(TRUNK_PREFIX):]] = _np(value)
            continue
        try:
            fkey = _flax_key(heads, key)
        except KeyError:
            raise KeyError(f"{key!r} is not a released {kind} key") from None
        v = _np(value)
        flat[fkey] = v.transpose(2, 3, 1, 0) if v.ndim == 4 else v.T
    nested = traverse_util.unflatten_dict(flat) if flat else {}
    out = {"params": nested.get("params", {}), "batch_stats": nested.get("batch_stats", {})}
    if trunk:
        tv = torchvision_resnet_to_flax(trunk)
        for collection in ("params", "batch_stats"):
            if tv[collection]:
                out[collection]["backbone"] = tv[collection]
    return out


def load_flax_heads(kind: str, variables: Mapping, module: nn.Module) -> None:
    """fsad's head variables -> `module`'s head parameters and BatchNorm buffers, in place:
    `to_flax`'s head mapping backwards (kernel [kh,kw,in,out] -> conv [out,in,kh,kw],
    [in,out] -> Linear [out,in], scale/bias/mean/var -> BatchNorm
    weight/bias/running_mean/running_var).

    variables: {"params": {"heads": ...} (DRA) or {"head": ...} (DevNet), "batch_stats":
    the same}, the layout of `to_flax` and of a trained fsad model's variables (a
    `DRAFeatureHeads`, `DevNetFeatureHead`, `DRA` or `DevNet`; a trunk is left as it is).
    Raises KeyError when a head tensor of `module` has no fsad variable.
    """
    from flax import traverse_util

    heads = {"devnet": _DEVNET_HEADS, "dra": _DRA_HEADS}[kind]
    flat = traverse_util.flatten_dict({c: dict(variables.get(c, {}))
                                       for c in ("params", "batch_stats")})
    state = {}
    for key, current in module.state_dict().items():
        if key.startswith(TRUNK_PREFIX) or key.endswith("num_batches_tracked"):
            continue
        v = np.array(flat[_flax_key(heads, key)], np.float32)  # a writable copy
        v = v.transpose(3, 2, 0, 1) if v.ndim == 4 else v.T
        if v.shape != tuple(current.shape):
            raise ValueError(f"{key}: fsad's {v.shape} against torch's {tuple(current.shape)}")
        state[key] = torch.as_tensor(np.ascontiguousarray(v), dtype=current.dtype,
                                     device=current.device)
    module.load_state_dict(state, strict=False)


def state_dict_to_flax(kind: str, model: nn.Module) -> dict:
    """The whole DevNet / DRA model's weights and BatchNorm statistics as fsad variables."""
    return to_flax(kind, model.state_dict())


def grads_to_flax(kind: str, model: nn.Module) -> dict:
    """Every parameter's .grad as an fsad params tree (same paths and layout as the
    params), for leaf-by-leaf comparison with jax.grad."""
    return to_flax(kind, {n: p.grad for n, p in model.named_parameters()})["params"]


def load_released_state_dict(model: nn.Module, state_dict: Mapping) -> None:
    """Loads a released checkpoint (its trunk's unused `fc.*` dropped) into `model`."""
    sd = {k.removeprefix("module."): v for k, v in state_dict.items()
          if not k.removeprefix("module.").startswith(TRUNK_PREFIX + "fc.")}
    model.load_state_dict(sd)


# ------------------------------------------------------------------ training steps

def released_optimizer(model: nn.Module, fused: bool | None = None) -> torch.optim.Optimizer:
    """The released DevNet / DRA optimiser: Adam lr 2e-4, (coupled) weight decay 1e-5.
    fused: PyTorch's fused Adam kernel (the same update to float rounding; the speed
    benchmarks take it on a GPU), None PyTorch's default (foreach)."""
    return torch.optim.Adam(model.parameters(), lr=2e-4, weight_decay=1e-5, fused=fused)


def released_scheduler(optimizer) -> torch.optim.lr_scheduler.StepLR:
    """StepLR(step_size=10, gamma=0.1); DRA steps it at epoch start, DevNet at epoch end."""
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.1)


def make_torch_step(kind: str, model: nn.Module, optimizer: torch.optim.Optimizer,
                    mode: str = "eager_fp32", clip_norm: float = 1.0) -> Callable:
    """One released training step: forward, loss, backward, clip_grad_norm_, Adam step.

    mode: "eager_fp32"; "amp_bf16_channels_last" (torch.autocast bfloat16, model and
    input in channels_last); "compile" (torch.compile of the model with static shapes,
    with amp and channels_last). The loss is computed in float32 from the model's
    outputs. DRA's training forward indexes by label (`feature[label != 2]`), a
    data-dependent shape: torch.compile breaks its graph there (the released model as it
    is), and with dynamic shapes allowed it then compiled the trunk once for both pyramid
    scales with symbolic sizes; `dynamic=False` compiles each scale's shapes as they
    are. Priors are drawn on the model's device; the released criterion draws them on
    the CPU and copies them (`.cuda()`), 4 small copies per DRA step, which this leaves
    out.

    Returns step(images [B,3,H,W], labels [B], ref [n_ref,3,H,W] (DRA), priors=None)
    -> loss (a detached 0-d tensor; priors as `dra_loss` / `devnet_loss`, None draws
    fresh ones as the released criterion).
    """
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}; use one of {KINDS}")
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; use one of {MODES}")
    device = next(model.parameters()).device
    amp = mode != "eager_fp32"
    if amp:
        model = model.to(memory_format=torch.channels_last)
    forward = torch.compile(model, dynamic=False) if mode == "compile" else model
    params = [p for p in model.parameters()]

    def step(images, labels, ref=None, priors=None):
        model.train()
        x = images if kind == "devnet" else torch.cat([ref, images])
        if amp:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = forward(x) if kind == "devnet" else forward(x, labels)
        if kind == "devnet":
            loss = devnet_loss(out, labels, priors)
        else:
            loss, _ = dra_loss(out, labels, priors)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip_norm)
        optimizer.step()
        return loss.detach()

    return step


# ------------------------------------------------------------------ AHL (CDL) meta-step

class DevNetFeatureHead(nn.Module):
    """DevNet's scorer on precomputed trunk features (AHL on DevNet): feats, a list over
    scales of [B,C,h,w] -> [B], the mean over scales of the top-K mean of |1x1 conv|."""

    def __init__(self, in_dim: int = 512, topk: float = 0.1):
        super().__init__()
        self.conv = nn.Conv2d(in_dim, 1, kernel_size=1, padding=0)
        self.topk = topk

    def forward(self, feats):
        return torch.cat([topk_abs_mean(self.conv(f), self.topk) for f in feats],
                         dim=1).mean(dim=1)


class DRAFeatureHeads(nn.Module):
    """DRA's heads on precomputed trunk features (AHL on DRA), as fsad's `DRAHeads`
    applies them in `fsad.methods.ahl.head_model`: every head on every sample, each
    head's score the mean over scales.

    The heads are the released modules (`add_dra_heads`, the released attribute names, so
    `to_flax("dra", .state_dict())` / `load_flax_heads("dra", ...)` map them to fsad's
    {"heads": ...}). fsad applies them with train=False: call `.eval()` (the meta-step of
    `make_torch_meta_step` does) so that the residual head's BatchNorm normalises with its
    running statistics, the base model's, and leaves them alone.

    Args:
      in_dim: C; topk: the top-K fraction; heads: fsad head names (the variant's,
        `fsad.methods.dra.VARIANTS`); ref_means: list over scales of [C,h_s,w_s], the
        reference mean maps (needed with the residual head; kept as buffers, outside the
        state_dict); residual_stride / residual_padding: the residual head's 3x3 conv.
    Call: feats, list over scales of [B,C,h_s,w_s] -> {head: [B]}.
    """

    def __init__(self, in_dim: int = 512, topk: float = 0.1, heads=DRA_HEADS, ref_means=None,
                 residual_stride: int = 1, residual_padding: int = 1):
        super().__init__()
        self.heads = add_dra_heads(self, in_dim, topk, heads, residual_stride,
                                   residual_padding)
        if "residual" in self.heads and ref_means is None:
            raise ValueError("the residual head needs ref_means (one [C,h,w] per scale)")
        for s, m in enumerate(ref_means or ()):
            self.register_buffer(f"ref_mean{s}", torch.as_tensor(m, dtype=torch.float32),
                                 persistent=False)

    def forward(self, feats):
        out = {}
        for h in self.heads:
            head = getattr(self, DRA_MODULES[h])
            if h == "residual":
                per_scale = [head(f, getattr(self, f"ref_mean{s}")[None])
                             for s, f in enumerate(feats)]
            else:
                per_scale = [head(f) for f in feats]
            out[h] = torch.cat(per_scale, dim=1).mean(dim=1)
        return out


def weighted_devnet_loss(scores: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor,
                         prior=None) -> torch.Tensor:
    """AHL's task loss on DevNet's head (fsad's `head_model` loss, DevNet base): the
    deviation loss of scores [B] against labels [B] > 0, weighted by weight [B]; prior as
    `pick_prior` (one vector)."""
    return deviation_loss(scores, (labels > 0).to(scores.dtype),
                          pick_prior(prior, None, scores.device), weight=weight)


def weighted_dra_loss(scores: Mapping, labels: torch.Tensor, weight: torch.Tensor,
                      priors=None) -> torch.Tensor:
    """AHL's task loss on DRA's heads (fsad's `head_model` loss, DRA base: the sum over
    heads of `head_losses(..., sample_weight=weight)`): each head's deviation loss on the
    samples routed to it (`head_routing`), weighted by weight [B] (0 on padding) times
    its routing mask, averaged by their sum.

    scores: {head: [B]}; labels [B] {0, 1, 2}; priors as `pick_prior` (None: a fresh
    draw per head and call, as fsad's fresh keys). The heads are summed in sorted
    order, as fsad sums them. -> scalar.
    """
    routes = head_routing(labels)
    total = 0.0
    for h in sorted(scores):
        target, mask = routes[h]
        s = scores[h]
        total = total + deviation_loss(s, target.to(s.dtype), pick_prior(priors, h, s.device),
                                       weight=mask.to(s.dtype) * weight)
    return total


def make_torch_meta_step(head: nn.Module, optimizer: torch.optim.Optimizer,
                         inner_steps: int, inner_lr: float, first_order: bool = False,
                         clip_norm: float = 0.0, loss: Callable | None = None,
                         vmap_tasks: bool = False) -> Callable:
    """fsad's CDL epoch step (`fsad.methods.ahl.make_meta_step`) in PyTorch.

    For each task t: theta = params; `inner_steps` plain SGD steps on the support loss
    (with the graph kept for the outer gradient unless first_order); the query loss
    L_t of the adapted theta. The unified params take one optimizer step on
    sum_t weights[t] * L_t (after clip_grad_norm_ when clip_norm > 0). The head runs in
    eval mode, as fsad applies it (train=False).

    head: feats (list over scales of [B,C,h,w]) -> scores: `DevNetFeatureHead` ([B])
      or `DRAFeatureHeads` ({head: [B]}).
    loss: (scores, labels [B], weight [B], prior) -> scalar; default
      `weighted_devnet_loss` (DevNet's head); `weighted_dra_loss` for DRA's heads.
    vmap_tasks: False, the tasks one after another (torch.autograd.grad with
      create_graph=True in each task's inner loop, as the released code's loop over its
      tasks); True, all tasks as one batched computation (torch.func.vmap over the tasks
      of torch.func.grad's inner loop, as fsad vmaps them: the heads' weights then differ
      per task, so every convolution becomes a grouped one). The same losses and
      gradients either way, to float rounding.

    Returns step(bank, tasks, weights, prior=None) -> (loss, task_losses [T]):
      bank: list over scales of [M,C,h,w]; tasks: dict of [T,S] / [T,Q] tensors
      support_idx, support_lab, support_weight, query_idx, query_lab, query_weight
      (weight 0 on padding); weights: [T]; prior: handed to `loss` for every task loss:
      None (fresh draws on every loss, as fsad's fresh keys), one [l] vector, or (DRA)
      {head: [l]}.
    """
    from torch.func import functional_call, grad, vmap

    loss = weighted_devnet_loss if loss is None else loss
    names = [n for n, _ in head.named_parameters()]
    fields = [f"{s}_{f}" for s in ("support", "query") for f in ("idx", "lab", "weight")]

    def task_loss(theta, bank, idx, lab, weight, prior):
        feats = [f[idx] for f in bank]
        return loss(functional_call(head, theta, (feats,)), lab, weight, prior)

    def sgd_step(theta, grads):
        return {n: theta[n] - inner_lr * g for n, g in zip(names, grads)}

    def looped_grads(theta, *task):  # the graph kept for the outer gradient
        return torch.autograd.grad(task_loss(theta, *task), [theta[n] for n in names],
                                   create_graph=not first_order)

    def vmapped_grads(theta, *task):  # torch.func.grad keeps it unless detached
        g = grad(task_loss)(theta, *task)
        return [g[n].detach() if first_order else g[n] for n in names]

    def query_loss(params, bank, prior, inner_grads, s_idx, s_lab, s_w, q_idx, q_lab, q_w):
        """One task's query loss L_t (scalar) after its inner SGD steps from params:
        s_* its support set's [S] indices into the bank, labels and weights, q_* its query
        set's [Q]; inner_grads(theta, bank, idx, lab, weight, prior) -> [grads], each as
        its param (looped_grads or vmapped_grads)."""
        theta = dict(params)
        for _ in range(inner_steps):
            theta = sgd_step(theta, inner_grads(theta, bank, s_idx, s_lab, s_w, prior))
        return task_loss(theta, bank, q_idx, q_lab, q_w, prior)

    def step(bank, tasks, weights, prior=None):
        head.eval()
        params = dict(head.named_parameters())
        per_task = [tasks[f] for f in fields]
        if vmap_tasks:
            losses = vmap(lambda *task: query_loss(params, bank, prior, vmapped_grads, *task),
                          randomness="different")(*per_task)
        else:
            losses = torch.stack([query_loss(params, bank, prior, looped_grads,
                                             *(x[t] for x in per_task))
                                  for t in range(weights.shape[0])])
        total = (weights * losses).sum()
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        if clip_norm:
            torch.nn.utils.clip_grad_norm_(head.parameters(), clip_norm)
        optimizer.step()
        return total.detach(), losses.detach()

    return step


def ahl_meta_step_for_benchmark(channels: int, map_sizes, num_tasks: int, support: int,
                                query: int, base: str = "dra", inner_steps: int = 3,
                                inner_lr: float = 2e-4, first_order: bool = False,
                                lr: float = 2e-4, bank_rows: int | None = None,
                                topk: float = 0.1, residual_stride: int = 1,
                                residual_padding: int = 1, device=None, seed: int = 0,
                                vmap_tasks: bool = False):
    """A random-init AHL meta-step on random bank features, ready to time (on CUDA with
    `tune_for_speed`, as `speed_step`):

        step, args, n = ahl_meta_step_for_benchmark(512, (14, 7), 7, 120, 120)
        img_per_s = time_torch_step(step, args, n)

    base "dra": `DRAFeatureHeads` (all four heads; reference means = the mean of the
    bank's first 5 rows) with `weighted_dra_loss`; "devnet": `DevNetFeatureHead` with
    `weighted_devnet_loss`. Outer optimiser torch.optim.Adam(lr) (fsad's default
    `ahl.optim`: lr 2e-4, no weight decay, no clipping); fresh prior draws on every loss.

    Args:
      channels: C; map_sizes: (h_s) per scale, square maps (a trunk's at img_size:
        ceil(img_size / 32), then half of it); num_tasks: T; support, query: S and Q
        samples per task (no padding), each a third normal (label 0), a third pseudo
        (2), the rest seen anomalies (1), with fsad's class-balance weights
        (`fsad.methods.ahl.class_balance`); bank_rows: M (default T * (S + Q)); device:
        default `default_device()`; vmap_tasks: the tasks as one vmapped computation
        (`make_torch_meta_step`).
    Returns:
      (step, args, images_per_step): step(*args) runs one meta-step; args = (bank: list
      over scales of [M,C,h_s,h_s] float32, tasks: dict of [T,S] / [T,Q] tensors
      support_idx/lab/weight, query_idx/lab/weight, weights [T] = 1/T);
      images_per_step = T * (S + Q), the samples the step adapts on and scores (what
      benchmarks/throughput.py's fsad AHL row counts).
    """
    from fsad.methods.ahl import class_balance

    if base not in ("dra", "devnet"):
        raise ValueError(f"base={base!r}; use dra or devnet")
    device = torch.device(device) if device is not None else default_device()
    tune_for_speed(device)
    g = torch.Generator().manual_seed(seed)
    m = bank_rows or num_tasks * (support + query)
    bank = [torch.randn(m, channels, h, h, generator=g) for h in map_sizes]
    torch.manual_seed(seed)
    if base == "dra":
        head = DRAFeatureHeads(channels, topk, DRA_HEADS, [b[:5].mean(0) for b in bank],
                               residual_stride, residual_padding)
        loss = weighted_dra_loss
    else:
        head, loss = DevNetFeatureHead(channels, topk), weighted_devnet_loss
    head = head.to(device)
    tasks = {}
    for prefix, n in (("support", support), ("query", query)):
        lab = np.array([0] * (n // 3) + [2] * (n // 3) + [1] * (n - 2 * (n // 3)))
        tasks[f"{prefix}_idx"] = torch.randint(0, m, (num_tasks, n), generator=g).to(device)
        tasks[f"{prefix}_lab"] = torch.as_tensor(np.tile(lab, (num_tasks, 1)), device=device)
        tasks[f"{prefix}_weight"] = torch.as_tensor(
            np.tile(class_balance(lab, base), (num_tasks, 1)), device=device)
    weights = torch.full((num_tasks,), 1.0 / num_tasks, device=device)
    step = make_torch_meta_step(head, torch.optim.Adam(head.parameters(), lr=lr), inner_steps,
                                inner_lr, first_order, loss=loss, vmap_tasks=vmap_tasks)
    bank = [b.to(device) for b in bank]
    return step, (bank, tasks, weights), num_tasks * (support + query)


# ------------------------------------------------------------------ timing

class ReleasedPsi(nn.Module):
    """The released AHL importance model (modeling/aux_net.py `AUX_Model`), with its
    initial state passed in rather than drawn (the released forward draws
    `torch.rand(4, N, 6)` for h0 and for c0 on every call): nn.LSTM(T, 6, 2,
    batch_first, dropout 0.5 between the layers, bidirectional), then
    Linear(12, T)(relu(out[:, -1])). The released code has T = 6 literally."""

    def __init__(self, num_tasks: int, hidden: int = 6, dropout: float = 0.5):
        super().__init__()
        self.lstm = nn.LSTM(num_tasks, hidden, 2, batch_first=True, dropout=dropout,
                            bidirectional=True)
        self.fc = nn.Linear(2 * hidden, num_tasks)

    def forward(self, seq: torch.Tensor, state: tuple) -> torch.Tensor:
        """seq [N, K, T]; state (h0, c0), each [4, N, hidden] -> [N, T]."""
        out, _ = self.lstm(seq, state)
        return self.fc(F.relu(out[:, -1]))


def psi_to_flax(psi: ReleasedPsi) -> dict:
    """ReleasedPsi's weights as fsad's `ScoreSequenceModel(fc=0, torch_modules=True)`
    params: `TorchLSTMCell` keeps PyTorch's parameters, its matrices transposed; layer l's
    forward direction is cell 2 l, its backward one 2 l + 1."""
    sd = {k: _np(v) for k, v in psi.state_dict().items()}

    def cell(suffix: str) -> dict:
        return {name: sd[f"lstm.{name}{suffix}"].T for name in
                ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}

    params = {f"TorchLSTMCell_{2 * layer + d}": cell(f"_l{layer}" + ("_reverse" if d else ""))
              for layer in range(psi.lstm.num_layers) for d in (0, 1)}
    params["out"] = {"kernel": sd["fc.weight"].T, "bias": sd["fc.bias"]}
    return params


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_torch_step(step: Callable, args: tuple, images_per_step: int, steps: int = 20,
                    warmup: int = 3, device=None) -> float:
    """Images per second of `step(*args)` over `steps` calls after `warmup` untimed ones;
    on CUDA the device is synchronised before every clock read."""
    if device is None:
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), "cpu")
    for _ in range(warmup):
        step(*args)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step(*args)
    _sync(device)
    return images_per_step * steps / (time.perf_counter() - t0)


def step_peak_bytes(step: Callable, args: tuple, device) -> int | None:
    """On CUDA, the peak of allocated memory during one `step(*args)` (after warm-up calls)
    above what was allocated before it: the step's working memory, comparable with XLA's
    plan of a train step's temporaries (benchmarks/throughput.py). None elsewhere."""
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step(*args)
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - before)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize_uint8(images: np.ndarray, device=None) -> torch.Tensor:
    """uint8 [B,H,W,3] -> ImageNet-normalised float32 [B,3,H,W] (as the released
    ToTensor + Normalize, and as fsad.models.resnet.normalize_uint8)."""
    x = torch.as_tensor(np.asarray(images), device=device).float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN, device=x.device)
    std = torch.tensor(IMAGENET_STD, device=x.device)
    return ((x - mean) / std).permute(0, 3, 1, 2).contiguous()


def released_labels(kind: str, batch: int) -> torch.Tensor:
    """A released-style batch composition: DevNet half normal / half anomalies; DRA
    2/3 normal (half of them pseudo, label 2) and 1/3 seen anomalies (label 1)."""
    if kind == "devnet":
        n_anom = batch // 2
        return torch.tensor([0] * (batch - n_anom) + [1] * n_anom)
    n_seen = max(1, round(batch / 3))
    n_norm = batch - n_seen
    n_pseudo = n_norm // 2
    return torch.tensor([0] * (n_norm - n_pseudo) + [2] * n_pseudo + [1] * n_seen)


def tune_for_speed(device) -> None:
    """PyTorch's fastest settings for timing on `device`: on CUDA, cuDNN times its
    convolution algorithms for each shape (`cudnn.benchmark`, as XLA autotunes its own);
    the warm-up calls absorb that search."""
    if torch.device(device).type == "cuda":
        torch.backends.cudnn.benchmark = True


def speed_step(kind: str, img_size: int, batch: int, mode: str, device, n_ref: int = 5,
               seed: int = 0) -> tuple[Callable, tuple]:
    """(step, its args) of one released training step as fast as PyTorch runs it on
    `device` (`tune_for_speed`; fused Adam on CUDA), on a random init and a random batch
    of the released composition (`released_labels`) at img_size."""
    device = torch.device(device)
    tune_for_speed(device)
    torch.manual_seed(seed)
    model = (DevNet(img_size=img_size) if kind == "devnet"
             else DRA(n_ref=n_ref, img_size=img_size)).to(device)
    optimizer = released_optimizer(model, fused=True if device.type == "cuda" else None)
    step = make_torch_step(kind, model, optimizer, mode)
    rng = np.random.default_rng(seed)
    images = normalize_uint8(rng.integers(0, 256, (batch, img_size, img_size, 3), np.uint8),
                             device)
    labels = released_labels(kind, batch).to(device)
    args = (images, labels)
    if kind == "dra":
        args += (normalize_uint8(rng.integers(0, 256, (n_ref, img_size, img_size, 3),
                                              np.uint8), device),)
    return step, args


def benchmark(kind: str, img_size: int, batch: int, steps: int, mode: str,
              warmup: int = 3, n_ref: int = 5, seed: int = 0, device=None) -> dict:
    """Throughput of one released training step (`speed_step`)."""
    device = torch.device(device) if device is not None else default_device()
    step, args = speed_step(kind, img_size, batch, mode, device, n_ref, seed)
    ips = time_torch_step(step, args, batch, steps, warmup, device)
    return {"framework": "torch", "kind": kind, "mode": mode, "img_size": img_size,
            "batch": batch, "steps": steps, "device": str(device),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "img_per_s": ips}


def main(argv=None):
    ap = argparse.ArgumentParser(description="Throughput of the released PyTorch "
                                             "training step (images/s)")
    ap.add_argument("--kind", choices=KINDS, default="devnet")
    ap.add_argument("--img_size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--mode", choices=MODES, default="eager_fp32")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch intra-op threads (0: torch's default); on a CPU shared with "
                         "other jobs, OpenMP's spinning threads can slow a step down 20x")
    ap.add_argument("--json", default="", help="also write the result here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    res = benchmark(args.kind, args.img_size, args.batch, args.steps, args.mode, args.warmup,
                    device=args.device)
    print(json.dumps(res))
    print(f"{res['kind']} {res['mode']} on {res['device']}: {res['img_per_s']:.2f} img/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
