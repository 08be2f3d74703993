"""Config checks that run before any data is decoded or any step is taken.

Every failure is a `UserError` naming the field, what is wrong with it and how to
fix it. Checks that need the data (shots against the anomalies there are, the
hard setting's classes, contamination, k-means clusters against the normals) run
when the splits are drawn, also before training (fsad.experiment.check_protocol):
for ELPV and folders on their rows without pixels, before the workdir is made, any
weight is loaded or any image decoded.
"""

from __future__ import annotations

import math
import os
import re

from fsad.data.protocols import batch_counts
from fsad.errors import UserError

DATA_NAMES = ("elpv", "folder", "synthetic", "tfds")
# the data fields only some readers read: set for another, they would be silently ignored
# (a data.root without data.name=folder trained on ELPV, the default)
READER_FIELDS = {"root": ("folder", "synthetic"), "subset": ("folder", "synthetic"),
                 "tfds_name": ("tfds",), "tfds_dir": ("tfds",), "normal_class": ("tfds",)}
MIN_IMG_SIZE = 32  # one cell of the trunks' stride-32 map
MAX_IMG_SIZE = 8192  # (the papers' 448; MVTec AD's largest images are 1024)
MAX_SCALES = 8  # pyramid levels (the released code's 2)
MAX_SEED = 2 ** 31  # seeds and the seeds after them (JAX's keys take 32-bit seeds here)
MAX_CURVE_POINTS = 10_000  # the AUROC-F1 curve's cut-offs (50 by default)
MAX_BATCH = 4096  # images a scoring batch holds (48 by default), padded to it
METHOD_FILES = {"devnet": "configs/devnet.py", "dra": "configs/dra.py",
                "ahl": "configs/ahl_dra.py or configs/ahl_devnet.py"}


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def _finite(x) -> bool:
    """A number, and not NaN or infinite (NaN fails every comparison, inf passes them)."""
    return isinstance(x, (int, float)) and math.isfinite(x)


def config_method(config) -> str:
    """The method whose config file `config` came from, by its groups of fields: ahl_*.py
    has ahl.*, dra.py dra.*, devnet.py neither."""
    return "ahl" if "ahl" in config else "dra" if "dra" in config else "devnet"


def check_method(config) -> None:
    """config.method is its config file's: each method's fields and defaults come with
    its file (--config.method=dra on configs/devnet.py had no dra.* fields, and
    --config.method=ahl ended in a traceback)."""
    m, own = config.method, config_method(config)
    _require(m in METHOD_FILES, f"method={m!r} is not a method fsad has; use --config "
             f"{', '.join(METHOD_FILES.values())}")
    _require(m == own, f"method={m!r} on a config of {own} ({METHOD_FILES[own]}): each "
             f"method's fields and defaults come with its config file; use --config "
             f"{METHOD_FILES[m]} instead of --config.method")
    if m == "ahl":  # (here, before the notes that name the method: ahl_<base>)
        a = config.ahl
        _require(a.base in ("dra", "devnet"), f"ahl.base={a.base!r}; use dra or devnet")
        # the base model's fields come with its config file (ahl_devnet.py has no dra.*
        # fields, ahl_dra.py DRA's data and optimiser defaults)
        built_on = "dra" if "dra" in config else "devnet"
        _require(a.base == built_on, f"ahl.base={a.base!r} on a config of AHL on {built_on} "
                 f"(configs/ahl_{built_on}.py): the base model's fields come with its config "
                 f"file; use --config configs/ahl_{a.base}.py instead of --config.ahl.base")


def check_optim(o, prefix: str) -> None:
    """An optimiser group's fields (optim.*, ahl.optim.*): finite, in their ranges."""
    _require(_finite(o.lr) and o.lr > 0, f"{prefix}.lr={o.lr}; use a positive learning rate")
    _require(_finite(o.weight_decay) and o.weight_decay >= 0, f"{prefix}.weight_decay="
             f"{o.weight_decay}; use 0 (none) or a positive weight decay (1e-5 as released)")
    _require(o.decay_every_epochs >= 0, f"{prefix}.decay_every_epochs={o.decay_every_epochs}; "
             f"use 0 (no step decay) or a number of epochs (10 as released)")
    _require(_finite(o.decay_factor) and o.decay_factor > 0, f"{prefix}.decay_factor="
             f"{o.decay_factor}; use a positive factor (0.1 as released)")
    _require(_finite(o.clip_norm) and o.clip_norm >= 0, f"{prefix}.clip_norm={o.clip_norm}; "
             f"use 0 (no clipping) or a positive gradient norm (1 as released)")


def check_config(config, n_devices: int = 1) -> None:
    """Raises UserError for a config no run could finish with.

    Args:
      n_devices: the devices the batch is split over.
    """
    from fsad.data.decode import MASK_RESIZES
    from fsad.data.protocols import SETTINGS
    from fsad.models.backbone import (BACKBONES, depthwise_route, make_trunk,
                                      smallest_input, stem_route)
    from fsad.precision import compute_dtype
    d, m = config.data, config.model
    check_method(config)
    _require(d.name in DATA_NAMES, f"data.name={d.name!r} is not a dataset reader; use one "
             f"of {', '.join(DATA_NAMES)}")
    for field, readers in READER_FIELDS.items():
        value = d.get(field)
        _require(not value or d.name in readers, f"data.{field}={value!r} is read only by the "
                 f"{' and '.join(readers)} reader{'s' if len(readers) > 1 else ''}, and "
                 f"data.name is {d.name!r}; add --config.data.name={readers[0]} to read it, or "
                 f"leave data.{field} empty")
    _require(d.setting in SETTINGS, f"data.setting={d.setting!r} is not a protocol; use "
             f"general or hard")
    _require(d.get("mask_resize", "nearest") in MASK_RESIZES, f"data.mask_resize="
             f"{d.get('mask_resize')!r} is not a mask resize; use nearest or opencv_linear "
             f"(the released localization.py's)")
    _require(d.setting != "hard" or bool(d.known_class), "the hard setting needs a seen "
             "class; pass --config.data.known_class=NAME (for ELPV mono or poly)")
    _require(d.setting == "hard" or not d.known_class, f"data.known_class="
             f"{d.known_class!r} is read only in the hard setting, and data.setting is "
             f"{d.setting!r} (shots from every anomaly class); add "
             f"--config.data.setting=hard, or leave data.known_class empty")
    _require(d.n_anomaly >= 1, f"data.n_anomaly={d.n_anomaly}: the few-shot protocol needs "
             f"at least one labelled anomaly; set --config.data.n_anomaly to 1 or more "
             f"(1 to 10 in the papers)")
    _require(0.0 <= d.contamination < 1.0, f"data.contamination={d.contamination} is not a "
             f"rate; use a value in [0, 1), e.g. 0.1")
    _require(d.img_size >= MIN_IMG_SIZE, f"data.img_size={d.img_size} is smaller than the "
             f"trunk's stride of {MIN_IMG_SIZE} pixels; use at least {MIN_IMG_SIZE} (96 for "
             f":quick, 448 for the papers' protocol)")
    _require(d.img_size <= MAX_IMG_SIZE, f"data.img_size={d.img_size}: every image is "
             f"resized to this side; use at most {MAX_IMG_SIZE} (448 for the papers' protocol)")
    root = d.get("root", "")
    _require(not root or not os.path.isfile(root), f"data.root={root!r} is a file; pass the "
             f"dataset's folder")
    _require(m.backbone in BACKBONES, f"model.backbone={m.backbone!r} is not a trunk fsad "
             f"has; use one of {', '.join(BACKBONES)}")
    _require(1 <= m.n_scales <= MAX_SCALES, f"model.n_scales={m.n_scales}; use 1 (paper) or "
             f"2 (released), at most {MAX_SCALES}")
    smallest = d.img_size // 2 ** (m.n_scales - 1)
    _require(smallest >= smallest_input(m.backbone), f"data.img_size={d.img_size} with "
             f"model.n_scales={m.n_scales} gives a smallest pyramid level of {smallest} "
             f"pixels, and {m.backbone}'s map is empty below {smallest_input(m.backbone)}; "
             f"raise --config.data.img_size to at least "
             f"{smallest_input(m.backbone) * 2 ** (m.n_scales - 1)} or lower model.n_scales")
    _require(0.0 < m.topk <= 1.0, f"model.topk={m.topk} is not a fraction; use a value in "
             f"(0, 1], e.g. 0.1")
    sha = m.get("pretrained_sha256", "")  # (" " or "a" matched any file, or nearly)
    _require(not sha or re.fullmatch(r"[0-9a-fA-F]{8,64}", sha) is not None,
             f"model.pretrained_sha256={sha!r} is not a sha256 or the start of one; give 8 "
             f"to 64 of its hex digits (sha256sum FILE), or leave it empty")
    compute_dtype(m.get("dtype", "auto"))
    make_trunk(m.backbone, depthwise=depthwise_route(config),  # refuses an unknown route
               stem=stem_route(config))
    b = config.batch_size
    # (no upper bound here: the device-memory plan refuses a train step that does not
    # fit, naming the batch that does)
    _require(b >= 2, f"batch_size={b}: a batch holds normals and seen anomalies; use 2 or "
             f"more (48 in the papers)")
    near = sorted({max(n_devices, b // n_devices * n_devices), -(-b // n_devices) * n_devices})
    fewer = [d for d in range(n_devices - 1, 0, -1) if b % d == 0][:2]  # devices it splits on
    _require(b % n_devices == 0, f"batch_size={b} cannot be split over the {n_devices} "
             f"devices; use a multiple of {n_devices}, e.g. {' or '.join(map(str, near))}, "
             f"or (a run of this batch_size to resume, which another batch would change) "
             f"run on {' or '.join(map(str, fewer))} device{'s' if fewer != [1] else ''} "
             f"(CUDA_VISIBLE_DEVICES, or XLA_FLAGS=--xla_force_host_platform_device_count "
             f"on a CPU)")
    _require(0.0 < config.anomaly_fraction < 1.0, f"anomaly_fraction="
             f"{config.anomaly_fraction:.3g} is not a share of a batch; use a value in (0, 1), "
             f"e.g. 0.5 (DevNet) or 1/3 (DRA)")
    n_norm, n_anom = batch_counts(b, config.anomaly_fraction)
    _require(n_anom >= 1 and n_norm >= 1, f"batch_size={b} with anomaly_fraction="
             f"{config.anomaly_fraction:.3g} gives {n_anom} seen anomalies and {n_norm} "
             f"normals per batch; a batch needs both: raise --config.batch_size")
    _require(config.epochs >= 1 and config.steps_per_epoch >= 1, "epochs and steps_per_epoch "
             "must be at least 1; set --config.epochs and --config.steps_per_epoch")
    check_optim(config.optim, "optim")
    lc = config.loss
    _require(_finite(lc.prior_sigma) and lc.prior_sigma > 0, f"loss.prior_sigma="
             f"{lc.prior_sigma}: the deviation divides by it; use a positive sigma (1.0 in "
             f"the papers)")
    _require(_finite(lc.prior_mu), f"loss.prior_mu={lc.prior_mu}; use a finite mean (0.0 in "
             f"the papers)")
    _require(_finite(lc.margin) and lc.margin > 0, f"loss.margin={lc.margin}; the anomalies' "
             f"deviations are pushed past it: use a positive margin (5 in the papers)")
    rotate = config.augment.rotate_degrees
    _require(_finite(rotate) and 0 <= rotate <= 180, f"augment.rotate_degrees={rotate}; "
             f"images are rotated by U(-d, d): use 0 (off) to 180 (as released)")
    _require(config.loss.prior_size >= 2, f"loss.prior_size={config.loss.prior_size}: the "
             f"deviation divides by the std of the prior's samples, which needs 2 or more; "
             f"use 5000 (the papers)")
    for field in ("dra.outlier_root", "ahl.texture_root"):
        group, name = field.split(".")
        folder = config[group].get(name, "") if group in config else ""
        _require(not folder or os.path.isdir(folder), f"{field}={folder!r} is not a folder; "
                 f"pass a folder of images, or leave it empty (--config.{field}=)")
        if folder:  # images that open, before training (AHL decodes its textures after)
            from fsad.data.decode import check_image_folder
            try:
                check_image_folder(folder, config.data.get("subset", "") if group == "dra"
                                   else "")
            except UserError as err:
                raise UserError(f"--config.{field}: {err}") from err
    _require(config.seed >= 0, f"seed={config.seed}; seeds are non-negative integers (the "
             f"papers' are 0, 1, 2)")
    _require(config.seed + config.num_seeds <= MAX_SEED, f"seed={config.seed} with num_seeds="
             f"{config.num_seeds}: seeds go up to {MAX_SEED - 1}; use a smaller --config.seed")
    _require(config.num_seeds >= 1, f"num_seeds={config.num_seeds}; a run trains at least one "
             f"seed: set --config.num_seeds to 1 or more (3 in the papers)")
    check_scoring_config(config)
    _require(config.keep_checkpoints >= 0, f"keep_checkpoints={config.keep_checkpoints}; "
             f"use 0 (keep none) or more (3 by default)")
    _require(config.checkpoint_seconds >= 0, f"checkpoint_seconds={config.checkpoint_seconds}; "
             f"use 0 (a checkpoint every epoch) or more seconds between checkpoints")
    if "devnet" in config:
        from fsad.methods.devnet import check_devnet_config
        check_devnet_config(config.devnet)
        _require(config.method != "ahl" or config.devnet.variant == "MIL-DS", f"AHL meta-"
                 f"trains DevNet's top-K scorer, and devnet.variant={config.devnet.variant!r} "
                 f"is an ablation without it; use --config.devnet.variant=MIL-DS with AHL")
    if "dra" in config:
        from fsad.methods.dra import check_dra_config
        check_dra_config(config.dra)
        _require(config.dra.n_ref >= 1, f"dra.n_ref={config.dra.n_ref}; the residual head "
                 f"needs at least one reference image")
        _require(0.0 <= config.dra.pseudo_prob <= 1.0, f"dra.pseudo_prob="
                 f"{config.dra.pseudo_prob} is not a probability; use a value in [0, 1]")
        check_residual_map(config)
    if config.method == "ahl":
        check_ahl_config(config.ahl)


def check_scoring_config(config) -> None:
    """Raises UserError for the evaluation's fields (which --mode score may change from
    the run's) that no run or scoring could use: the batches, the saliency's blur, the
    decision's confidence, and the overlays' and the curve's counts (read by training's
    evaluation only)."""
    for field, value, default in (("eval_batch_size", config.eval_batch_size, 48),
                                  ("explain.batch_size", config.explain.batch_size, 16)):
        _require(1 <= value <= MAX_BATCH, f"{field}={value}; a batch holds at least one "
                 f"image, at most {MAX_BATCH} (every batch is padded to it): set "
                 f"--config.{field} to 1 or more ({default} by default)")
    e = config.explain
    size = config.data.img_size
    _require(1 <= e.kernel_size <= size, f"explain.kernel_size={e.kernel_size}; the "
             f"saliency's blur needs a kernel of 1 pixel or more (16, the paper's), at most the "
             f"image's {size}")
    _require(_finite(e.sigma) and e.sigma > 0, f"explain.sigma={e.sigma}; the blur's Gaussian "
             f"needs a positive sigma (4, the paper's and the released code's)")
    _require(e.num_overlays >= 0, f"explain.num_overlays={e.num_overlays}; use 0 (none) or "
             f"more top-scored test images to draw")
    _require(1 <= e.curve_points <= MAX_CURVE_POINTS, f"explain.curve_points="
             f"{e.curve_points}; the AUROC-F1 curve needs 1 or more cut-offs (50 by default), "
             f"at most {MAX_CURVE_POINTS}")
    _require(0.0 < e.confidence < 1.0, f"explain.confidence={e.confidence} is not a "
             f"confidence; use a value in (0, 1)")


def check_residual_map(config) -> None:
    """DRA's residual head, a 3x3 conv without padding (dra.residual_padding=0, AHL's), on
    the smallest pyramid level's trunk map: a map under 3 cells gave the conv no output,
    and the run failed in its first trace, after the decode, with a traceback."""
    from fsad.methods.dra import VARIANTS
    d, m = config.dra, config.model
    if d.residual_padding or "residual" not in VARIANTS.get(d.variant, ()):
        return
    from fsad.models.backbone import trunk_map_shape
    smallest = config.data.img_size // 2 ** (m.n_scales - 1)
    side = min(trunk_map_shape(m.backbone, smallest)[:2])
    _require(side >= 3, f"dra.residual_padding=0 with data.img_size={config.data.img_size} "
             f"and model.n_scales={m.n_scales}: the smallest level's {smallest} px give a "
             f"{side}x{side} trunk map, and the residual head's 3x3 conv needs 3x3 or more "
             f"without padding (a level of 65 px or more for the ResNets and Lite0); raise "
             f"--config.data.img_size, lower model.n_scales, or use "
             f"--config.dra.residual_padding=1")


def check_ahl_config(a) -> None:
    from fsad.methods.ahl import (CLUSTER_ON, ERROR_FORMS, HEAD_INITS, PSI_FITS,
                                  check_error_scale, check_task_batching)
    _require(a.base in ("dra", "devnet"), f"ahl.base={a.base!r}; use dra or devnet")
    _require(a.clusters >= 2, f"ahl.clusters={a.clusters}: the tasks pair clusters; use at "
             f"least 2 (3 in the paper)")
    _require(a.cluster_on in CLUSTER_ON, f"ahl.cluster_on={a.cluster_on!r} is not a "
             f"clustering input; use one of {', '.join(CLUSTER_ON)}")
    _require(a.head_init in HEAD_INITS, f"ahl.head_init={a.head_init!r}; use base (start "
             f"from the trained base heads) or fresh (PyTorch's default init)")
    _require(a.weighting in ("paper", "released"), f"ahl.weighting={a.weighting!r}; use "
             f"paper or released")
    check_error_scale(a.error_scale)
    check_task_batching(a.task_batching)
    _require(a.epochs >= 1 and a.history >= 1 and a.inner_steps >= 0, f"ahl.epochs="
             f"{a.epochs}, ahl.history={a.history}, ahl.inner_steps={a.inner_steps}; "
             f"epochs and history must be at least 1 (30 and 5 in the paper), inner_steps "
             f"at least 0 (3)")
    _require(_finite(a.weight_temperature) and a.weight_temperature > 0, f"ahl."
             f"weight_temperature={a.weight_temperature}; use a positive temperature (0.1 by "
             f"default)")
    _require(_finite(a.inner_lr) and a.inner_lr >= 0, f"ahl.inner_lr={a.inner_lr}; use 0 (no "
             f"adaptation) or a positive step (2e-4 in the paper; a negative one climbs the "
             f"support loss)")
    _require(_finite(a.loss_scale) and a.loss_scale > 0 and a.query_batches >= 1,
             f"ahl.loss_scale={a.loss_scale}, ahl.query_batches={a.query_batches}; use a "
             f"finite positive scale (1; released AHL(DevNet): 4/3) and at least 1 batch (1; "
             f"released: 20)")
    check_optim(a.optim, "ahl.optim")
    _require(_finite(a.psi_lr) and a.psi_lr > 0, f"ahl.psi_lr={a.psi_lr}; use a positive "
             f"learning rate (0.02 in the paper)")
    _require(a.psi_hidden >= 1 and a.psi_fc >= 0, f"ahl.psi_hidden={a.psi_hidden}, "
             f"ahl.psi_fc={a.psi_fc}: the BiLSTM needs at least one hidden unit (7 in the "
             f"paper), psi_fc at least 0 (14 in the paper; 0: no hidden fc layer, as the "
             f"released psi)")
    _require(a.psi_steps >= 0, f"ahl.psi_steps={a.psi_steps}; use 0 or more Adam steps of "
             f"psi a meta-epoch (20 by default)")
    _require(0.0 <= a.psi_dropout < 1.0 and _finite(a.psi_weight_decay)
             and a.psi_weight_decay >= 0,
             f"ahl.psi_dropout={a.psi_dropout}, ahl.psi_weight_decay={a.psi_weight_decay}; "
             f"use a dropout in [0, 1) and a weight decay of at least 0 (released: 0.5, 1e-3)")
    for field, values in (("errors", ERROR_FORMS), ("psi_fit", PSI_FITS),
                          ("psi_module", ("flax", "torch")),
                          ("psi_initial_state", ("zeros", "uniform"))):
        _require(a[field] in values, f"ahl.{field}={a[field]!r}; use "
                 f"{' or '.join(values)}")
    _require(a.chunk_size >= 0, f"ahl.chunk_size={a.chunk_size}; use 0 (the whole set where "
             f"it fits) or a number of samples at a time")
    _require(0.0 <= a.pseudo_frac < 1.0, f"ahl.pseudo_frac={a.pseudo_frac} is not a "
             f"fraction below 1 (the share of a task's normals made pseudo anomalies: 1 "
             f"leaves the tasks no normal); use a value in [0, 1) (0.5 in the paper)")


def config_warnings(config) -> list[str]:
    """Settings that run but do not do what their fields suggest, in words: AHL
    meta-training too short for psi's importance weights to be used."""
    if config.method != "ahl" or config.ahl.epochs < 1 or config.ahl.history < 1:
        return []  # (values out of range are the config check's errors)
    a = config.ahl
    out = []
    if a.epochs == 1 and not a.update_last_epoch:
        out.append("ahl.epochs=1 with ahl.update_last_epoch=False (`:released`): the one "
                   "meta-epoch's update is dropped, so the unified heads are scored as they "
                   f"start ({'fresh' if a.head_init == 'fresh' else 'the base heads'}); "
                   "raise ahl.epochs")
    # the first 0-based meta-epoch that uses psi's weights (`weights_in_use`)
    first = a.history + (2 if a.weighting == "released" else 1)
    if a.epochs <= first:
        out.append(f"ahl.epochs={a.epochs} with ahl.history={a.history}: psi's importance "
                   f"weights are first used in meta-epoch {first + 1}"
                   f"{' (ahl.weighting=released)' if a.weighting == 'released' else ''}, so "
                   f"every meta-epoch of this run weights the tasks equally (1/T); raise "
                   f"ahl.epochs or lower ahl.history to use them")
    elif a.psi_fit == "pool" and a.psi_steps == 0:
        out.append("ahl.psi_steps=0 (ahl.psi_fit=pool): psi is never trained, and its "
                   "untrained predictions weight the tasks from meta-epoch "
                   f"{first + 1}; use psi_steps of 1 or more (20 by default)")
    return out


def check_against_data(config, n_train_normal: int) -> None:
    """Checks that need the split: AHL's k-means needs more normals than clusters, and
    DRA's reference set is drawn from the training normals without replacement; every
    method needs a training normal (a one-vs-rest TFDS set whose normal class is not in
    its training split trained on none, with no word)."""
    _require(n_train_normal > 0, "the split leaves no normal image to train on (the "
             "dataset's training images hold none of the normal class); check "
             "data.normal_class and the dataset's splits, or add normal training images")
    if "dra" in config:
        n_ref = config.dra.n_ref
        _require(n_ref <= n_train_normal, f"dra.n_ref={n_ref} asks for more reference images "
                 f"than the {n_train_normal} training normals; lower --config.dra.n_ref (5 "
                 f"as released) or add normal images")
    if config.method == "ahl":
        c = config.ahl.clusters
        _require(n_train_normal >= 3 * c, f"ahl.clusters={c} asks k-means for more clusters "
                 f"than {n_train_normal} training normals allow (3 per cluster); lower "
                 f"--config.ahl.clusters or add normal images")
