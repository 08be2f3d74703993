"""AHL on DRA (Zhu et al., CVPR 2024): train DRA, freeze its trunk, meta-train its heads.

``--config configs/ahl_dra.py[:paper|:released][,quick]``; every ``ahl.*`` field is in
fsad/config.py. Results report AHL(DRA) and the DRA heads on the same features.
"""

from fsad.config import add_ahl, add_dra, apply_variants, base_config, paper_ahl, released_ahl


def get_config(arg=None):
    return apply_variants(add_ahl(add_dra(base_config()), "dra"), arg,
                          {"paper": paper_ahl, "released": released_ahl})
