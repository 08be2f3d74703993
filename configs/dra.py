"""DRA (Ding et al., CVPR 2022): seen, pseudo, latent-residual and normality heads.

Defaults are the released code's (spec §6): 448 px, batch 48 as 2/3 normal
(half of them turned into CutPaste pseudo anomalies) and 1/3 seen anomalies,
random rotation, Adam 2e-4, weight decay 1e-5, x0.1 every 10 epochs, gradient
clipping at 1, 30 x 20 steps, deviation loss in every head.

Variants (``--config configs/dra.py:VARIANT``):
  paper   the paper's optimiser: lr 1e-3, weight decay 1e-2.
  quick   96 px and 5 x 20 steps (a CPU run in minutes; see configs/devnet.py).
Ablations: ``--config.dra.variant=DRA1A|DRA2A|DRA3Ar|DRA3An|DRA``;
``--config.dra.loss=bce|focal``.
"""

from ml_collections import config_dict

from fsad.config import base_config


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
    c = base_config()
    c.method = "dra"
    c.anomaly_fraction = 1 / 3
    c.epochs = 30
    c.optim.lr = 2e-4
    c.optim.weight_decay = 1e-5
    c.optim.decay_every_epochs = 10
    c.optim.decay_factor = 0.1
    c.optim.clip_norm = 1.0

    c.dra = config_dict.ConfigDict()
    c.dra.variant = "DRA"  # DRA1A | DRA2A | DRA3Ar | DRA3An | DRA
    c.dra.loss = "deviation"  # deviation | bce | focal
    c.dra.n_ref = 5
    c.dra.n_scales = 2
    c.dra.residual_stride = 3
    c.dra.pseudo_prob = 0.5
    c.dra.rotate = True
    c.dra.rotate_degrees = 180.0
    c.dra.test_reference = "fixed"  # fixed seeded set kept in the checkpoint; per_batch: released
    c.dra.outlier_root = ""  # folder of external images: outlier exposure instead of CutPaste

    for variant in (arg or "").split(","):
        if variant == "paper":
            c.optim.lr = 1e-3
            c.optim.weight_decay = 1e-2
        elif variant == "quick":
            c.data.img_size = 96
            c.epochs = 5
            c.optim.decay_every_epochs = 2
        elif variant:
            raise ValueError(f"unknown variant {variant!r}; use paper and/or quick")
    return c
