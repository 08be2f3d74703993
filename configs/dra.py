"""DRA (Ding et al., CVPR 2022): seen, pseudo, latent-residual and normality heads.

Defaults are the released code's (spec §6): 448 px, two-scale pyramid, batch 48
as 2/3 normal (half of them turned into CutPaste pseudo anomalies) and 1/3 seen
anomalies, random rotation, 5 reference images through the same pipeline,
residual head 3x3 stride 1, normality head |.|, Adam 2e-4, weight decay 1e-5,
x0.1 after epochs 9, 19 and 29, gradient clipping at 1, 30 x 20 steps,
deviation loss in every head, ImageNet ResNet-18.

Variants (``--config configs/dra.py:VARIANT``):
  paper   the paper's text: lr 1e-3, weight decay 1e-2, top-K of the scores s
          (the released code ranks |s|).
  quick   96 px and 5 x 20 steps (a CPU run in minutes; see configs/devnet.py).
  lite0   ImageNet-pretrained EfficientNet-Lite0 trunk (see configs/devnet.py).
  localization  the released localization.py's maps and masks (see configs/devnet.py).
Ablations: ``--config.dra.variant=DRA1A|DRA2A|DRA3Ar|DRA3An|DRA``;
``--config.dra.loss=bce|focal``; AHL's residual head:
``--config.dra.residual_stride=3 --config.dra.residual_padding=0``.
"""

from ml_collections import config_dict

from fsad.config import add_dra, apply_variants, base_config


def paper(c: config_dict.ConfigDict) -> config_dict.ConfigDict:
    """The DRA paper's text: lr 1e-3, weight decay 1e-2, and top-K of the scores s in the
    seen, pseudo and residual heads (Eq. 3: the K vectors with the largest scores; the
    released code ranks |s|)."""
    c.model.topk_abs = False
    c.optim.lr = 1e-3
    c.optim.weight_decay = 1e-2
    return c


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
    return apply_variants(add_dra(base_config()), arg, {"paper": paper})
