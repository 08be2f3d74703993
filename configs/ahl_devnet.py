"""AHL on DevNet: train DevNet, freeze its trunk, meta-train its scorer head.

``--config configs/ahl_devnet.py[:paper|:released][,quick]``; every ``ahl.*`` field is in
fsad/config.py. The DevNet stage uses the released DevNet defaults (configs/devnet.py).
"""

from fsad.config import add_ahl, apply_variants, base_config, paper_ahl, released_ahl


def get_config(arg=None):
    return apply_variants(add_ahl(base_config(), "devnet"), arg,
                          {"paper": paper_ahl, "released": released_ahl})
