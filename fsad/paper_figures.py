"""The papers' image-level AUROC (means of 3 runs, ImageNet-initialised; spec §8, §9.9),
to compare a run with.

Sources:
  dra_paper           Ding et al., CVPR 2022, Table 1. Its DevNet numbers are DevNet-TPAMI
                      Table 2's (identical 10-shot figures).
  ahl_paper           Zhu et al., CVPR 2024, Tables 1/7. DevNet and DRA were re-run there
                      with the official code, so these baselines differ from dra_paper's.
  ahl_paper_appendix  the AHL appendix (Table 7) where it disagrees with its Table 1
                      (HeadCT, DRA, 10-shot: 0.988 against 0.978).
  devnet_table5       DevNet-TPAMI Table 5, its ablations (general setting, 10 shots):
                      `devnet_ablation_auroc`.

    >>> reference_auroc("elpv", "dra", "general", 10)
    {'dra_paper': 0.845, 'ahl_paper': 0.843}
"""

from __future__ import annotations

import os
import re

from fsad.errors import UserError

SOURCES = ("dra_paper", "ahl_paper", "ahl_paper_appendix", "devnet_table5")
METHODS = ("devnet", "dra", "ahl_devnet", "ahl_dra")
SETTINGS = ("general", "hard")
SHOTS = (1, 10)

# Columns of spec §9.9: DRA paper DevNet, DRA paper DRA, AHL paper DevNet, AHL paper DRA,
# AHL(DevNet), AHL(DRA); each "1-shot/10-shot".
_COLUMNS = (("dra_paper", "devnet"), ("dra_paper", "dra"), ("ahl_paper", "devnet"),
            ("ahl_paper", "dra"), ("ahl_paper", "ahl_devnet"), ("ahl_paper", "ahl_dra"))
_GENERAL = """
aitex        .598/.887 .692/.893 .609/.889 .693/.892 .704/.903 .734/.925
sdd          .881/.988 .859/.991 .851/.985 .907/.990 .864/.991 .909/.991
elpv         .514/.846 .675/.845 .810/.843 .676/.843 .828/.849 .723/.850
optical      .523/.782 .888/.965 .513/.785 .880/.966 .547/.841 .888/.976
mastcam      .595/.790 .692/.848 .627/.797 .709/.849 .644/.825 .743/.855
brainmri     .694/.958 .744/.970 .853/.951 .747/.971 .866/.959 .760/.977
headct       .742/.982 .796/.972 .755/.997 .804/.978 .781/.999 .825/.993
hyperkvasir  .653/.829 .690/.834 .734/.822 .712/.844 .768/.873 .742/.880
mvtecad      .794/.945 .883/.959 .832/.948 .889/.966 .843/.954 .901/.970
"""
# Hard setting: mean over the known-class runs (AITEX's six hard classes, Mastcam's nine,
# Hyper-Kvasir's four, ELPV mono/poly). SDD, Optical, BrainMRI and HeadCT have one class.
_HARD = """
aitex        .646/.683 .684/.733 .646/.685 .696/.733 .660/.709 .707/.747
elpv         .648/.702 .703/.766 .663/.722 .722/.771 .678/.752 .740/.788
mastcam      .511/.588 .667/.695 .519/.588 .658/.704 .535/.602 .673/.721
hyperkvasir  .595/.822 .700/.844 .598/.827 .699/.822 .619/.845 .706/.854
"""
# The known classes the hard-setting means are over (DRA paper Table 2, AHL paper Tables
# 2/8): AITEX and Mastcam leave out their classes of only a few images.
HARD_KNOWN_CLASSES = {
    "aitex": ("Broken_end", "Broken_pick", "Cut_selvage", "Fuzzyball", "Nep", "Weft_crack"),
    "mastcam": ("bedrock", "broken-rock", "drill-hole", "drt", "dump-pile", "float",
                "meteorite", "scuff", "veins"),
    "hyperkvasir": ("barretts", "barretts-short-segment", "esophagitis-a", "esophagitis-b-d"),
    "elpv": ("mono", "poly"),
}
# Single known classes quoted in spec §8: ELPV, hard, 10-shot, DRA paper's DRA.
_HARD_PER_CLASS = {("elpv", "dra", "mono", 10): {"dra_paper": 0.731},
                   ("elpv", "dra", "poly", 10): {"dra_paper": 0.800}}
# MVTec AD's general row is the mean over its 15 subsets (DRA paper Table 1, AHL paper
# Table 1); spec §8 quotes its 10-shot DevNet .945, DRA .959 and AHL(DRA) .970.
_EXTRA = {("headct", "general", 10): {("ahl_paper_appendix", "dra"): 0.988}}


# DevNet-TPAMI Table 5: DevNet's ablations in the general setting with 10 labelled
# anomalies, as (devnet.variant, model.backbone). Its MIL-DS column is DevNet itself (the
# same figures as dra_paper's 10-shot DevNet). Mastcam is not in it.
_ABLATION_COLUMNS = (("Rep", "resnet18"), ("DS", "resnet18"), ("Patch-DS", "resnet18"),
                     ("MIL-DS", "resnet18"), ("DS", "alexnet"), ("DS", "resnet50"))
_DEVNET_ABLATION = """
mvtecad      .856 .921 .923 .945 .883 .897
aitex        .860 .853 .796 .887 .743 .859
sdd          .865 .982 .949 .988 .974 .984
elpv         .755 .820 .728 .846 .705 .828
optical      .777 .769 .776 .782 .622 .766
brainmri     .851 .964 .969 .958 .912 .904
headct       .876 .967 .963 .982 .934 .982
hyperkvasir  .602 .759 .575 .829 .696 .812
"""
ABLATION = {(dataset, *column): float(v)
            for dataset, *cells in (line.split() for line in _DEVNET_ABLATION.strip().splitlines())
            for column, v in zip(_ABLATION_COLUMNS, cells, strict=True)}
# trunks the papers did not run, whose cells are set beside ResNet-18's figures (the
# one pretrained trunk reachable offline is Lite0)
_STAND_INS = ("resnet18", "resnet34", "efficientnet_lite0")


def _parse(text: str, setting: str) -> dict:
    out = {}
    for line in text.strip().splitlines():
        dataset, *cells = line.split()
        for (source, method), cell in zip(_COLUMNS, cells, strict=True):
            one, ten = (float(v) for v in cell.split("/"))
            out.setdefault((dataset, setting, 1), {})[source, method] = one
            out.setdefault((dataset, setting, 10), {})[source, method] = ten
    return out


FIGURES = {**_parse(_GENERAL, "general"), **_parse(_HARD, "hard")}
for _key, _cells in _EXTRA.items():
    FIGURES.setdefault(_key, {}).update(_cells)
DATASETS = tuple(sorted({k[0] for k in FIGURES}))

# fsad's dataset names (converter subsets, ImageSet names) -> the tables' names
_DATASET_ALIASES = {"kolektorsdd": "sdd", "opticalclass": "optical", "dagm": "optical",
                    "mvtec": "mvtecad"}


def canonical_dataset(name: str) -> str:
    """"AITEX", "optical_class", "Hyper-Kvasir", "MVTec AD" ... -> the tables' key."""
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    key = _DATASET_ALIASES.get(key, key)
    if key not in DATASETS:
        raise UserError(f"no paper figures for dataset {name!r}; known: {', '.join(DATASETS)}")
    return key


# The DRA paper made its pseudo anomalies on its three medical datasets from another
# medical dataset, LAG (outlier exposure; DRA §3.2 and §4.1), not by CutPaste as on every
# other dataset; its Table 4 gives Hyper-Kvasir's hard setting 0.751 with the self-paste
# (its column "CutMix": the paper's name for what the released code and fsad call
# CutPaste) against the published 0.844 with LAG. (The AHL paper does not say what its DRA
# re-runs used.)
DRA_OUTLIER_EXPOSURE = ("brainmri", "headct", "hyperkvasir")


def protocol_note(dataset: str, method: str, outlier_root: str) -> str | None:
    """Where a run departs from the papers' protocol on `dataset` in a way that moves its
    AUROC against their figures: DRA and AHL(DRA) on a medical dataset without external
    pseudo anomalies (`DRA_OUTLIER_EXPOSURE`). None where it does not (or the dataset has
    no figures)."""
    try:
        key = canonical_dataset(dataset)
    except UserError:
        return None
    if key in DRA_OUTLIER_EXPOSURE and canonical_method(method) in ("dra", "ahl_dra") \
            and not outlier_root:
        return (f"{method} on {dataset}: the DRA paper took this dataset's pseudo anomalies "
                f"from another medical dataset, LAG (outlier exposure), not from CutPaste "
                f"as this run does; its figures are for that protocol (on Hyper-Kvasir, "
                f"hard setting: 0.844 with LAG, 0.751 with this self-paste, its Table 4's "
                f"CutMix). Pass "
                f"--config.dra.outlier_root=<a folder of LAG images> for the papers' "
                f"protocol")
    return None


def config_protocol_note(config, dataset: str | None = None) -> str | None:
    """`protocol_note` of a run's config on `dataset` (default: `dataset_of(config)`)."""
    method = f"ahl_{config.ahl.base}" if config.method == "ahl" else config.method
    outlier_root = config.dra.outlier_root if "dra" in config else ""
    return protocol_note(dataset or dataset_of(config), method, outlier_root)


def dataset_of(config) -> str:
    """The dataset a config reads, by the name the papers' figures know it by: its
    data.subset; else a folder's own name (data.root=.../hyperkvasir) or a TFDS name
    without fsad's prefix (fsad_brainmri, as `python -m fsad.data.tfds_io` names it);
    else data.name (elpv)."""
    d = config.data
    if d.get("subset"):
        return d.subset
    if d.name == "folder" and d.get("root"):
        return os.path.basename(os.path.normpath(d.root))
    if d.name == "tfds" and d.get("tfds_name"):
        return re.sub(r"^fsad_", "", d.tfds_name)
    return d.name


def canonical_method(name: str) -> str:
    """"DevNet", "dra", "ahl(dra)", "AHL(DevNet)", "ahl_dra" ... -> one of METHODS."""
    key = re.sub(r"[^a-z]+", "_", name.lower()).strip("_")
    if key not in METHODS:
        raise UserError(f"no paper figures for method {name!r}; use one of {', '.join(METHODS)} "
                        f"(or 'ahl(dra)', 'ahl(devnet)')")
    return key


def paper_known_classes(dataset: str) -> tuple[str, ...]:
    """The known classes whose mean the papers report in the hard setting for `dataset`
    (e.g. "AITEX": its six classes of many images); () where they report none or the
    dataset has no figures."""
    try:
        return HARD_KNOWN_CLASSES.get(canonical_dataset(dataset), ())
    except UserError:
        return ()


def reference_auroc(dataset: str, method: str, setting: str = "general", shots: int = 10,
                    known_class: str | None = None) -> dict[str, float]:
    """The papers' image AUROC for one cell: {source: value}.

    Args:
      dataset: e.g. "elpv", "AITEX", "optical_class", "Hyper-Kvasir", "mvtec".
      method: "devnet", "dra", "ahl(devnet)" / "ahl_devnet", "ahl(dra)" / "ahl_dra".
      setting: "general" or "hard".
      shots: 1 or 10 labelled anomalies.
      known_class: hard setting only: that one known class's figure, where spec §8 quotes
        one (ELPV mono/poly, DRA, 10-shot); None: the mean over known classes.
    Returns:
      {source: AUROC}, empty where the papers report nothing (e.g. SDD's hard setting).
    Raises:
      UserError: an unknown dataset, method, setting or shot count.
    """
    ds, m = canonical_dataset(dataset), canonical_method(method)
    if setting not in SETTINGS:
        raise UserError(f"setting must be one of {SETTINGS}, got {setting!r}")
    if shots not in SHOTS:
        raise UserError(f"the papers report 1 and 10 shots, not {shots}")
    if known_class and setting == "hard":
        return dict(_HARD_PER_CLASS.get((ds, m, known_class, shots), {}))
    cells = FIGURES.get((ds, setting, shots), {})
    return {source: v for (source, method_), v in cells.items() if method_ == m}


def is_devnet_ablation(variant: str = "MIL-DS", backbone: str = "resnet18") -> bool:
    """Whether DevNet with this `devnet.variant` and `model.backbone` is one of Table 5's
    ablations (any variant but MIL-DS, or the AlexNet or ResNet-50 trunk) rather than
    DevNet as the papers' main tables ran it."""
    return variant != "MIL-DS" or backbone not in _STAND_INS


def devnet_ablation_auroc(dataset: str, variant: str, backbone: str = "resnet18",
                          setting: str = "general", shots: int = 10) -> dict[str, float]:
    """DevNet-TPAMI Table 5's image AUROC for a DevNet ablation: {"devnet_table5": AUROC}.

    Args:
      variant: devnet.variant ("Rep", "DS", "Patch-DS", "MIL-DS").
      backbone: model.backbone; Lite0 and ResNet-34 stand in for ResNet-18, as in the
        main tables.
    Returns:
      the figure, or {} where the table has none (another setting or shot count, a
      variant on a trunk it did not pair, Mastcam).
    Raises:
      UserError: an unknown dataset.
    """
    ds = canonical_dataset(dataset)
    trunk = "resnet18" if backbone in _STAND_INS else backbone
    if setting != "general" or shots != 10 or (ds, variant, trunk) not in ABLATION:
        return {}
    return {"devnet_table5": ABLATION[ds, variant, trunk]}
