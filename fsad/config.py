"""Config fields shared by every method; configs/*.py start from `base_config()`."""

from ml_collections import config_dict


def base_config() -> config_dict.ConfigDict:
    """Fields shared by every method's config."""
    c = config_dict.ConfigDict()
    c.method = "devnet"
    c.seed = 0
    c.num_seeds = 1  # runs seeds seed, seed+1, ...; reports mean and std

    c.data = config_dict.ConfigDict()
    c.data.name = "elpv"  # "elpv", "folder" (MVTec layout under root/subset) or "synthetic"
    c.data.root = ""
    c.data.subset = ""
    c.data.img_size = 448
    c.data.setting = "general"  # or "hard"
    c.data.known_class = ""  # the seen class in the hard setting
    c.data.n_anomaly = 10
    c.data.shot_pool = 10  # shots are the first n_anomaly of a draw of this many
    c.data.contamination = 0.0
    c.data.cache_dir = config_dict.placeholder(str)  # None: ~/.cache/fsad; "": no cache

    c.model = config_dict.ConfigDict()
    c.model.backbone = "resnet18"  # resnet18 | resnet34 | resnet50
    c.model.topk = 0.1
    c.model.topk_abs = True  # rank |s| as the released code; False: s as the paper
    c.model.pretrained = ""  # torchvision ResNet state_dict: path or URL
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

    c.optim = config_dict.ConfigDict()
    c.optim.lr = 1e-3
    c.optim.weight_decay = 1e-2
    c.optim.decay_every_epochs = 0
    c.optim.decay_factor = 0.1
    c.optim.clip_norm = 0.0

    c.batch_size = 48
    c.anomaly_fraction = 0.5
    c.epochs = 50
    c.steps_per_epoch = 20
    c.eval_batch_size = 64
    c.keep_checkpoints = 3
    return c
