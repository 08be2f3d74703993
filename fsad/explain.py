"""Explanations (DevNet Eq. 9): jax.grad saliency, Gaussian blur, localisation metrics.

    saliency = make_saliency_fn(score_one)   # score_one: (variables, x [H, W, 3]) -> []
    maps = saliency(variables, images)       # images [B, H, W, 3] -> [B, H, W], jitted

M = G_sigma(|d phi(x) / d x|): the gradient of the image score with respect to
the input pixels, absolute value summed over colour channels, blurred with a
16x16 Gaussian kernel of sigma 4 (both configurable).
"""

from __future__ import annotations

import os
from typing import Callable

from absl import logging

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw
from sklearn.metrics import f1_score, roc_auc_score

from fsad.hosts import is_primary, put, to_host
from fsad.mesh import batch_sharded, mesh_batch, padded_batches
from fsad.models.resnet import IMAGENET_STD


def gaussian_taps(size: int, sigma: float) -> np.ndarray:
    """exp(-x^2 / (2 sigma^2)) at the [size] offsets x from the centre (size - 1) / 2,
    float64, not normalised."""
    ax = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    return np.exp(-0.5 * (ax / sigma) ** 2)


def gaussian_kernel(size: int = 16, sigma: float = 4.0) -> np.ndarray:
    """A normalised [size, size] Gaussian kernel centred at (size - 1) / 2."""
    g = gaussian_taps(size, sigma)
    k = np.outer(g, g)
    return (k / k.sum()).astype(np.float32)


def blur(maps: jax.Array, kernel: jax.Array) -> jax.Array:
    """Same-size 2-D convolution of [B, H, W] maps with a [k, k] kernel (zero padding)."""
    k = kernel.shape[0]
    lo, hi = (k - 1) // 2, k // 2
    out = jax.lax.conv_general_dilated(maps[:, None].astype(jnp.float32),
                                       kernel[None, None].astype(jnp.float32), (1, 1),
                                       ((lo, hi), (lo, hi)))
    return out[:, 0]


def scipy_gaussian_filter(maps: jax.Array, sigma: float = 4.0, truncate: float = 4.0
                          ) -> jax.Array:
    """`scipy.ndimage.gaussian_filter(m, sigma)` of each [H, W] map of [B, H, W] (the
    released localisation's blur): separable taps out to int(truncate * sigma + 0.5)
    (33 at sigma 4), borders reflected (d c b a | a b c d)."""
    radius = int(truncate * sigma + 0.5)
    taps = gaussian_taps(2 * radius + 1, sigma)
    taps = jnp.asarray(taps / taps.sum(), jnp.float32)
    out = jnp.pad(maps.astype(jnp.float32), ((0, 0), (radius, radius), (radius, radius)),
                  mode="symmetric")
    h, w = maps.shape[1:]
    out = sum(taps[i] * out[:, i:i + h, :] for i in range(2 * radius + 1))
    return sum(taps[i] * out[:, :, i:i + w] for i in range(2 * radius + 1))


def released_postprocess(maps: jax.Array) -> jax.Array:
    """The released code's clip at the 99th percentile then min-max scaling, per map
    ([N, H, W] -> [N, H, W]); a map whose 99th percentile is 0 (at most 1% of its
    pixels non-zero) is kept as it is, as the released `convert_to_grayscale` keeps it."""
    flat = maps.reshape(maps.shape[0], -1)
    hi = jnp.percentile(flat, 99, axis=1)[:, None, None]
    clipped = jnp.minimum(maps, hi)
    lo = clipped.min(axis=(1, 2), keepdims=True)
    scaled = (clipped - lo) / jnp.maximum(clipped.max(axis=(1, 2), keepdims=True) - lo, 1e-12)
    return jnp.where(hi > 0, scaled, maps)


def make_saliency_fn(score_one: Callable, kernel_size: int = 16, sigma: float = 4.0,
                     released: bool = False) -> Callable:
    """Builds the jitted saliency function of a scalar image score.

    Args:
      score_one: (variables, x [H, W, 3]) -> scalar anomaly score.
      kernel_size, sigma: the Gaussian blur (16 and 4 in the paper).
      released: the released `localization.py` instead: the gradient with respect to
        the ImageNet-normalised input (score_one takes 0-255 pixels and normalises
        them, so its gradient is scaled by 255 * std per channel), |.| summed over
        colour, clipped at the 99th percentile and min-max scaled, then blurred as
        `scipy.ndimage.gaussian_filter(sigma)` (33 taps at sigma 4, reflected borders).
    Returns:
      fn(variables, images [B, H, W, 3] float) -> maps [B, H, W] float32.
    Raises:
      ValueError: kernel_size below 1 or sigma not above 0 (its maps were NaN).
    """
    if kernel_size < 1 or not sigma > 0:
        raise ValueError(f"kernel_size {kernel_size}, sigma {sigma}: the blur takes a "
                         f"kernel of 1 pixel or more and a sigma above 0 (the paper's: 16, 4)")
    kernel = jnp.asarray(gaussian_kernel(kernel_size, sigma))
    to_normalised = jnp.asarray(255.0 * IMAGENET_STD)

    def saliency(variables, images):
        grads = jax.vmap(jax.grad(score_one, argnums=1), in_axes=(None, 0))(variables, images)
        if released:
            maps = jnp.abs(grads * to_normalised).sum(axis=-1)
            return scipy_gaussian_filter(released_postprocess(maps), sigma)
        return blur(jnp.abs(grads).sum(axis=-1), kernel)

    return jax.jit(saliency)


def saliency_batches(saliency_fn: Callable, variables, images: np.ndarray,
                     batch_size: int = 16, mesh=None, desc: str = "saliency maps"
                     ) -> np.ndarray:
    """Runs a saliency function over uint8 images in fixed-size batches. -> [N, H, W].

    mesh: each batch is split over its devices (batch_size rounded up to a multiple of
      them), as test scoring is; None: one batch on the default device (or wherever
      the variables are).
    desc: the progress bar's (shown from five batches on; each of its steps takes a
      Ctrl-C that was dropped on its way, `fsad.hosts.progress`).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size}: a batch holds 1 image or more")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images of shape {images.shape}: saliency maps take RGB images "
                         f"[N, H, W, 3] (a grey image repeated over 3 channels)")
    if mesh is not None:
        batch_size = mesh_batch(batch_size, mesh)
    out = []
    for _, batch, n in padded_batches(images, batch_size, desc):
        x = batch.astype(np.float32)
        x = put(x, batch_sharded(mesh)) if mesh is not None else jnp.asarray(x)
        out.append(to_host(saliency_fn(variables, x))[:n])
    return np.concatenate(out) if out else np.zeros((0,) + images.shape[1:3], np.float32)


def method_saliency_fn(method, config) -> Callable:
    """The jitted saliency function of a trained fsad method (build once, reuse):
    fn(variables, images [B, H, W, 3] float pixel values) -> [B, H, W].

    The gradient is taken with respect to the raw pixel values (0-255), before
    ImageNet normalisation.
    """
    from fsad.models.resnet import normalize_uint8

    def score_one(v, x):
        return method.score(v, normalize_uint8(x[None]))["score"][0]

    e = config.explain
    return make_saliency_fn(score_one, e.kernel_size, e.sigma, e.released_postprocess)


def explain_images(method, variables, images: np.ndarray, config,
                   saliency_fn: Callable | None = None, mesh=None) -> np.ndarray:
    """Saliency maps of a trained fsad method for uint8 images [N, H, W, 3] -> [N, H, W].

    saliency_fn: `method_saliency_fn(method, config)`, to reuse its compilation.
    mesh: the devices to split each batch over (`saliency_batches`).
    """
    if method.random_scores and "key" not in variables:  # one reference draw for all maps
        variables = {**variables, "key": jax.random.key(0)}
    fn = saliency_fn or method_saliency_fn(method, config)
    return saliency_batches(fn, variables, images, config.explain.batch_size, mesh)


def explain_run(method, variables, images: np.ndarray, labels: np.ndarray,
                masks: np.ndarray | None, scores: np.ndarray, file_ids, config,
                out_dir: str, saliency_fn: Callable | None = None,
                has_mask: np.ndarray | None = None, mesh=None) -> dict:
    """Localisation metrics (when masks exist) and overlays of the top-scored images.

    Args:
      images: [N, H, W, 3] uint8 test images; labels, scores: [N]; masks: [N, H, W] or None.
      has_mask: [N] bool, the anomalies whose mask file exists (default: every anomaly);
        pixel metrics are taken over those only.
      mesh: the devices to split each batch of saliency maps over.
    Returns:
      {"pixel_auroc_pooled", "pixel_auroc_per_image_mean", "overlays"} (metrics only
      with masks); the AUROC-F1 curve goes to out_dir/auroc_f1_curve.{json,png}. The
      files are written by the primary process (`fsad.hosts`).
    """
    import json
    e = config.explain
    out: dict = {}
    top = np.argsort(-np.asarray(scores))[:e.num_overlays]
    scored = np.asarray(labels) == 1
    if has_mask is not None:
        scored &= np.asarray(has_mask, bool)
    marked = np.asarray(masks)[scored] > 0 if masks is not None and scored.any() else None
    if marked is not None and (not marked.any() or marked.all()):
        logging.warning("the test anomalies' masks mark %s pixel at %d px (%s); pixel "
                        "metrics are left out", "no" if not marked.any() else "every",
                        marked.shape[-1], "the masks are empty, or their defects vanish at "
                        "this data.img_size" if not marked.any() else "no normal pixel to "
                        "rank against")
        scored[:] = False
    anomalous = np.flatnonzero(scored)
    if not len(anomalous):
        masks = None  # no anomaly with a mask: no pixel metrics
    wanted = np.union1d(top, anomalous) if masks is not None else top
    maps = dict(zip(wanted.tolist(), explain_images(method, variables, images[wanted], config,
                                                    saliency_fn, mesh)))
    if masks is not None:
        amap = np.stack([maps[i] for i in anomalous])
        out["pixel_auroc_pooled"] = pooled_pixel_auroc(amap, masks[anomalous])
        per_image = per_image_pixel_auroc(amap, masks[anomalous])
        if per_image is not None:
            out["pixel_auroc_per_image_mean"] = per_image
        # only detected anomalies' maps enter the curve; normals' stay zero
        curve = auroc_f1_curve(np.asarray(scores), labels,
                               _full(maps, len(labels), amap.shape[1:]), masks, e.curve_points)
        if is_primary():
            os.makedirs(out_dir, exist_ok=True)
            with open(os.path.join(out_dir, "auroc_f1_curve.json"), "w") as f:
                json.dump(curve, f)
            curve_png(os.path.join(out_dir, "auroc_f1_curve.png"), curve)
    paths = []
    for rank, i in enumerate(top):
        name = os.path.splitext(str(file_ids[i]).replace("/", "__"))[0]
        path = os.path.join(out_dir, "overlays", f"{rank:02d}_{name}.png")
        if is_primary():
            overlay_png(path, images[i], maps[int(i)], None if masks is None else masks[i])
        paths.append(path)
    out["overlays"] = paths
    return out


def _full(maps: dict, n: int, shape) -> np.ndarray:
    """Dense [n, H, W] array from a dict of computed maps (zeros elsewhere)."""
    full = np.zeros((n, *shape), np.float32)
    for i, m in maps.items():
        full[i] = m
    return full


# ---- localisation metrics ----

def pooled_pixel_auroc(maps: np.ndarray, masks: np.ndarray) -> float:
    """AUROC over all pixels of the given images pooled together. maps, masks: [N, H, W]."""
    return float(roc_auc_score(np.asarray(masks).reshape(-1) > 0, np.asarray(maps).reshape(-1)))


def per_image_pixel_auroc(maps: np.ndarray, masks: np.ndarray) -> float | None:
    """The released code's "pixel AUROC": mean of per-image AUROCs over images whose
    mask has both anomalous and normal pixels (None where none has)."""
    vals = []
    for m, g in zip(maps, masks):
        g = np.asarray(g).reshape(-1) > 0
        if 0 < g.sum() < g.size:
            vals.append(roc_auc_score(g, np.asarray(m).reshape(-1)))
    return float(np.mean(vals)) if vals else None


def auroc_f1_curve(image_scores: np.ndarray, labels: np.ndarray, maps: np.ndarray,
                   masks: np.ndarray, num_thresholds: int = 50) -> dict[str, list[float]]:
    """DevNet Fig. 4: for each image-score cut-off t, the detection F1 and the pooled
    pixel AUROC over the true anomalies detected at t.

    Args:
      image_scores: [N]; labels: [N] {0, 1}; maps, masks: [N, H, W].
    Returns:
      {"threshold", "f1", "pixel_auroc"} lists of equal length (cut-offs where no
      true anomaly with a non-empty mask is detected, or where the detected ones' masks
      mark every pixel, leaving none normal to rank against, are left out).
    """
    image_scores, labels = np.asarray(image_scores), np.asarray(labels)
    has_mask = np.asarray(masks).reshape(len(masks), -1).max(1) > 0
    out = {"threshold": [], "f1": [], "pixel_auroc": []}
    for t in np.quantile(image_scores, np.linspace(0.0, 0.98, num_thresholds)):
        pred = image_scores > t
        detected = pred & (labels == 1) & has_mask
        # (where every pixel is marked, roc_auc_score raised "Only one class present" in
        # scikit-learn 1.3, the lowest allowed, and gives NaN in 1.9)
        if not detected.any() or (np.asarray(masks)[detected] > 0).all():
            continue
        out["threshold"].append(float(t))
        out["f1"].append(float(f1_score(labels, pred)))
        out["pixel_auroc"].append(pooled_pixel_auroc(maps[detected], masks[detected]))
    return out


# ---- pictures ----

def heat_colours(values: np.ndarray) -> np.ndarray:
    """[H, W] values scaled to [0, 1] -> [H, W, 3] uint8 (blue-cyan-yellow-red ramp)."""
    v = np.clip(values, 0, 1)[..., None]
    stops = np.array([[0, 0, 128], [0, 160, 255], [255, 230, 0], [220, 0, 0]], np.float32)
    pos = v * (len(stops) - 1)
    i = np.clip(pos.astype(int), 0, len(stops) - 2)
    frac = pos - i
    return (stops[i[..., 0]] * (1 - frac) + stops[i[..., 0] + 1] * frac).astype(np.uint8)


def overlay_png(path: str, image: np.ndarray, heat: np.ndarray,
                mask: np.ndarray | None = None) -> None:
    """Writes image | mask (if any) | heat map | heat over image, side by side."""
    h = heat - heat.min()
    h = h / max(float(h.max()), 1e-12)
    colours = heat_colours(h)
    panels = [image]
    if mask is not None:
        panels.append(np.repeat((np.asarray(mask) > 0)[..., None] * 255, 3, -1).astype(np.uint8))
    panels += [colours, (0.5 * image + 0.5 * colours).astype(np.uint8)]
    gap = np.full((image.shape[0], 4, 3), 255, np.uint8)
    row = np.concatenate(sum(([p, gap] for p in panels), [])[:-1], axis=1)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(row).save(path)


def curve_png(path: str, curve: dict[str, list[float]], size=(480, 360)) -> None:
    """Plots pixel AUROC (y) against image F1 (x), both on [0, 1], as a PNG."""
    w, h = size
    m, top = 50, 30  # the y axis's name above the plot, clear of its 1.0
    im = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(im)
    d.rectangle([m, top, w - 10, h - m], outline="black")
    to_xy = lambda f, a: (m + f * (w - 10 - m), h - m - a * (h - m - top))  # noqa: E731
    for v in (0.0, 0.5, 1.0):
        x, _ = to_xy(v, 0)
        _, y = to_xy(0, v)
        d.text((x - 8, h - m + 5), f"{v:.1f}", fill="black")
        d.text((m - 30, y - 5), f"{v:.1f}", fill="black")
    d.text((w // 2 - 40, h - 25), "image F1 (detection)", fill="black")
    d.text((m - 30, 8), "pixel AUROC", fill="black")
    xy = [to_xy(f, a) for f, a in zip(curve["f1"], curve["pixel_auroc"])]  # threshold order
    if len(xy) > 1:
        d.line(xy, fill=(200, 0, 0), width=2)
    for x, y in xy:
        d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(200, 0, 0))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    im.save(path)
