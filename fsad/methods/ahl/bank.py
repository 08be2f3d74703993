"""AHL's feature bank (spec §7 step 1): the frozen base trunk's maps, at every pyramid
scale, of the training normals, the seen anomalies, one pseudo anomaly of every normal
per family (CutMix, CutPaste, Perlin-mask blend) and the test set.

The bank layout (rows): normals [0, Nn), seen anomalies [Nn, Nn+Na), then family f's
pseudo anomaly of normal k at Nn + Na + f * Nn + k.
"""

from __future__ import annotations

import functools
import os

import jax
import numpy as np

from fsad.atomic import whole_or_nothing
from fsad.data.augment import cutmix, cutpaste, perlin_blend
from fsad.hosts import is_primary
from fsad.mesh import padded_batches
from fsad.models.backbone import depthwise_route, stem_route, trunk_features
from fsad.models.resnet import normalize_uint8
from fsad.precision import compute_dtype
from fsad.train import score_images

FAMILIES = ("cutmix", "cutpaste", "perlin")


def n_scales_of(config) -> int:
    """Pyramid scales of the base model (both bases run the released two-scale pyramid)."""
    return config.model.n_scales


def make_feature_fn(config):
    """Jitted (variables, images uint8 [B,H,W,3]) -> {"s0": [B,h,w,C], "s1": ...}: the
    frozen trunk's float32 maps at every pyramid scale. The same function for every config
    of the same trunk, scales, dtype and routes, so that the seeds and cells of a run
    trace and compile it once, not once per seed."""
    return _feature_fn(config.model.backbone, n_scales_of(config),
                       compute_dtype(config.model.get("dtype", "auto")),
                       depthwise_route(config), stem_route(config))


@functools.lru_cache(maxsize=None)
def _feature_fn(backbone: str, n_scales: int, dtype, depthwise: str, stem: str):
    def features(variables, images):
        maps = trunk_features(backbone, variables, normalize_uint8(images), n_scales, dtype,
                              depthwise, stem)
        return {f"s{i}": m for i, m in enumerate(maps)}

    return jax.jit(features)


def other_indices(key: jax.Array, n: int) -> np.ndarray:
    """For each of n images a uniformly drawn other one: i + U{1, n - 1} (mod n), the
    image itself only when it is alone. -> [n] int."""
    return (np.arange(n) + np.asarray(jax.random.randint(key, (n,), 1, max(n, 2)))) % n


def _cutmix(key, image, source):
    return cutmix(key, image, source)[0]


def _cutpaste(key, image, source):
    return cutpaste(key, image)[0]


def _perlin(key, image, source):
    return perlin_blend(key, image, source)[0]


# family -> jitted (keys [B], images [B,H,W,3] uint8, sources [B,H,W,3] uint8) -> [B,H,W,3]
# uint8 pseudo anomalies: made once (made per call, they were traced anew for every seed)
PSEUDO_FNS = {family: jax.jit(jax.vmap(fn)) for family, fn in
              (("cutmix", _cutmix), ("cutpaste", _cutpaste), ("perlin", _perlin))}


def make_pseudo(key: jax.Array, normals: np.ndarray, family: str,
                textures: np.ndarray | None = None, chunk: int = 64) -> np.ndarray:
    """One pseudo anomaly of the given family per normal image. [N,H,W,3] uint8 -> same.

    CutMix pastes from another normal, never the image itself (the released AHL
    CutMix); the Perlin blend takes its texture from `textures` (a texture folder,
    any of its images) or, without one, from another normal.
    """
    n = len(normals)
    k_other, k_tex, k_aug = jax.random.split(key, 3)
    other = other_indices(k_other, n)
    if family == "perlin" and textures is not None and len(textures):
        sources = textures
        partner = np.asarray(jax.random.randint(k_tex, (n,), 0, len(textures)))
    else:
        sources, partner = normals, other
    fn = PSEUDO_FNS[family]
    keys = jax.random.split(k_aug, n)
    out = []
    # every chunk padded to `chunk` rows (repeats of its last): one compiled program per
    # family and image size, whatever the number of normals
    for _, rows, m in padded_batches(np.arange(n), chunk, f"AHL {family} pseudo anomalies"):
        out.append(np.asarray(fn(keys[rows], normals[rows], sources[partner[rows]]))[:m])
    return np.concatenate(out)


def build_bank(config, variables, normals, anomalies, test_images, mesh, key,
               textures=None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Features of the training bank and of the test set, per scale.

    Returns:
      (bank [scales] of [Nn + Na + 3 Nn, h, w, C], test [scales] of [Nt, h, w, C]).
    """
    fn = make_feature_fn(config)
    pseudo = [make_pseudo(jax.random.fold_in(key, f), normals, fam, textures)
              for f, fam in enumerate(FAMILIES)]
    images = np.concatenate([normals, anomalies, *pseudo])
    bs = config.eval_batch_size
    bank = score_images(fn, variables, images, mesh, bs, desc="AHL features")
    test = score_images(fn, variables, test_images, mesh, bs, desc="AHL test features")
    keys = sorted(bank)
    return [bank[k] for k in keys], [test[k] for k in keys]


def load_or_build_bank(config, base_variables, normals, anomalies, test_images, mesh, key,
                       workdir: str, textures=None):
    """`build_bank`, cached in workdir/ahl_features.npz (written atomically, by the
    primary process of a multi-host run)."""
    cache = os.path.join(workdir, "ahl_features.npz")
    if os.path.exists(cache):
        with np.load(cache) as f:
            n = int(f["n_scales"])
            return [f[f"bank{i}"] for i in range(n)], [f[f"test{i}"] for i in range(n)]
    bank, test = build_bank(config, base_variables, normals, anomalies, test_images, mesh,
                            key, textures)
    if is_primary():
        with whole_or_nothing(cache, suffix=".npz") as tmp:
            np.savez(tmp, n_scales=len(bank), **{f"bank{i}": b for i, b in enumerate(bank)},
                     **{f"test{i}": t for i, t in enumerate(test)})
    return bank, test
