"""The papers' image-level AUROC (means of 3 runs, ImageNet-initialised; spec §8, §9.9),
to compare a run with.

Sources:
  dra_paper           Ding et al., CVPR 2022, Tables 1 (general) and 2 (hard). Its DevNet
                      numbers are DevNet-TPAMI Tables 2 and 3's (identical 10-shot figures).
  ahl_paper           Zhu et al., CVPR 2024, Tables 1/7 (general) and 2/8 (hard). DevNet and
                      DRA were re-run there with the official code, so these baselines differ
                      from dra_paper's.
  ahl_paper_appendix  the AHL appendix (Table 7) where it disagrees with its Table 1
                      (HeadCT, DRA, 10-shot: 0.988 against 0.978).
  devnet_table5       DevNet-TPAMI Table 5, its ablations (general setting, 10 shots):
                      `devnet_ablation_auroc`.

    >>> reference_auroc("elpv", "dra", "general", 10)
    {'dra_paper': 0.845, 'ahl_paper': 0.843}
    >>> reference_auroc("elpv", "ahl(dra)", "hard", 10, known_class="mono")
    {'ahl_paper': 0.745}
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
# MVTec AD's subsets, whose mean is the mvtecad row (DRA paper Table 1, AHL paper Table 7)
_MVTEC_GENERAL = """
carpet       .746/.867 .859/.940 .778/.864 .873/.945 .802/.867 .877/.953
grid         .891/.967 .972/.987 .868/.901 .972/.990 .872/.914 .975/.992
leather      .873/.999 .989/1.000 .874/.986 .988/1.000 .880/.996 .988/1.000
tile         .752/.987 .965/.994 .872/1.000 .966/1.000 .909/1.000 .968/1.000
wood         .900/.999 .985/.998 .917/.999 .987/.998 .947/1.000 .987/.998
bottle       .976/.993 1.000/1.000 .986/.996 1.000/1.000 .994/.998 1.000/1.000
capsule      .564/.865 .631/.935 .567/.872 .646/.928 .581/.885 .665/.930
pill         .769/.866 .832/.904 .779/.882 .831/.918 .781/.900 .840/.918
transistor   .722/.924 .668/.915 .732/.907 .727/.919 .737/.912 .796/.926
zipper       .922/.990 .984/1.000 .914/.992 .983/1.000 .928/.995 .986/1.000
cable        .783/.892 .876/.909 .790/.901 .855/.914 .793/.907 .858/.921
hazelnut     .979/1.000 .977/1.000 .970/1.000 .982/1.000 .978/1.000 .989/1.000
metal_nut    .876/.991 .948/.997 .874/.992 .950/.997 .880/.997 .952/.998
screw        .399/.970 .903/.977 .766/.981 .902/.978 .769/.984 .927/.985
toothbrush   .753/.860 .650/.826 .790/.950 .675/.908 .794/.959 .710/.921
"""
# Hard setting: mean over the known-class runs (AITEX's six hard classes, Mastcam's nine,
# Hyper-Kvasir's four, ELPV mono/poly). SDD, Optical, BrainMRI and HeadCT have one class.
_HARD = """
aitex        .646/.683 .684/.733 .646/.685 .696/.733 .660/.709 .707/.747
elpv         .648/.702 .703/.766 .663/.722 .722/.771 .678/.752 .740/.788
mastcam      .511/.588 .667/.695 .519/.588 .658/.704 .535/.602 .673/.721
hyperkvasir  .595/.822 .700/.844 .598/.827 .699/.822 .619/.845 .706/.854
carpet       .767/.847 .901/.935 .774/.853 .905/.940 .785/.860 .932/.949
metal_nut    .855/.965 .932/.945 .861/.970 .936/.968 .869/.972 .939/.971
"""
# Hard setting, each known class: dataset, known class (fsad's folder name), the columns
# (DRA paper Table 2; AHL paper Table 8, whose means are _HARD's). Carpet and Metal_nut are
# MVTec AD's two subsets of the hard setting.
_HARD_CLASSES = """
carpet       color                   .716/.767 .879/.886 .701/.774 .890/.899 .718/.778 .894/.929
carpet       cut                     .666/.819 .902/.922 .679/.817 .890/.942 .684/.825 .934/.943
carpet       hole                    .721/.814 .901/.947 .729/.808 .915/.958 .736/.815 .935/.960
carpet       metal_contamination     .819/.863 .871/.933 .822/.885 .877/.916 .846/.899 .931/.921
carpet       thread                  .912/.972 .950/.989 .937/.981 .954/.985 .941/.984 .966/.991
metal_nut    bent                    .797/.904 .952/.990 .817/.907 .952/.987 .831/.909 .954/.989
metal_nut    color                   .909/.978 .946/.967 .903/.992 .930/.956 .910/.995 .933/.958
metal_nut    flip                    .764/.987 .921/.913 .751/.982 .931/.931 .755/.987 .931/.937
metal_nut    scratch                 .952/.991 .909/.911 .974/.998 .929/.998 .981/.998 .934/.999
aitex        Broken_end              .712/.658 .708/.693 .702/.658 .696/.708 .716/.688 .704/.735
aitex        Broken_pick             .552/.585 .731/.760 .567/.595 .719/.671 .575/.612 .727/.683
aitex        Cut_selvage             .689/.709 .739/.777 .674/.703 .751/.777 .680/.737 .753/.781
aitex        Fuzzyball               .617/.734 .538/.701 .629/.736 .631/.749 .644/.755 .647/.775
aitex        Nep                     .722/.810 .717/.750 .741/.806 .685/.784 .754/.836 .703/.792
aitex        Weft_crack              .586/.599 .669/.717 .561/.614 .693/.710 .588/.624 .706/.713
elpv         mono                    .634/.599 .735/.731 .620/.639 .762/.735 .638/.663 .774/.745
elpv         poly                    .662/.804 .671/.800 .705/.806 .681/.806 .717/.842 .705/.831
mastcam      bedrock                 .495/.550 .668/.658 .508/.586 .653/.654 .533/.589 .679/.673
mastcam      broken-rock             .533/.547 .645/.649 .558/.562 .640/.704 .572/.572 .661/.722
mastcam      drill-hole              .555/.583 .657/.725 .555/.590 .642/.757 .563/.610 .654/.760
mastcam      drt                     .529/.621 .713/.760 .570/.620 .733/.757 .581/.629 .724/.772
mastcam      dump-pile               .521/.705 .767/.748 .510/.689 .741/.757 .519/.695 .756/.802
mastcam      float                   .502/.615 .670/.744 .507/.640 .688/.749 .524/.647 .702/.765
mastcam      meteorite               .467/.554 .637/.716 .436/.561 .604/.689 .463/.572 .616/.691
mastcam      scuff                   .472/.528 .549/.636 .496/.447 .573/.626 .515/.506 .581/.656
mastcam      veins                   .527/.589 .699/.620 .530/.577 .650/.644 .548/.598 .687/.650
hyperkvasir  barretts                .672/.834 .772/.824 .682/.837 .788/.820 .701/.850 .792/.829
hyperkvasir  barretts-short-segment  .604/.799 .674/.835 .608/.790 .643/.829 .629/.812 .651/.895
hyperkvasir  esophagitis-a           .569/.844 .778/.881 .567/.867 .759/.854 .583/.876 .760/.878
hyperkvasir  esophagitis-b-d         .536/.810 .577/.837 .535/.812 .604/.785 .562/.842 .622/.815
"""
# The known classes the hard-setting means are over (DRA paper Table 2, AHL paper Tables
# 2/8): AITEX and Mastcam leave out their classes of only a few images.
HARD_KNOWN_CLASSES = {
    "aitex": ("Broken_end", "Broken_pick", "Cut_selvage", "Fuzzyball", "Nep", "Weft_crack"),
    "mastcam": ("bedrock", "broken-rock", "drill-hole", "drt", "dump-pile", "float",
                "meteorite", "scuff", "veins"),
    "hyperkvasir": ("barretts", "barretts-short-segment", "esophagitis-a", "esophagitis-b-d"),
    "elpv": ("mono", "poly"),
    "carpet": ("color", "cut", "hole", "metal_contamination", "thread"),
    "metalnut": ("bent", "color", "flip", "scratch"),
}
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


def _table_key(name: str) -> str:
    """A dataset's name as the tables key it: lower case, letters and digits only."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _parse(text: str, *kind: str) -> dict:
    """{(dataset, *kind, shots) (with the row's known class after kind where `text` names
    one): {(source, method): AUROC}} of the rows of `text`."""
    out = {}
    for line in text.strip().splitlines():
        dataset, *cells = line.split()
        known = (cells.pop(0),) if len(cells) == len(_COLUMNS) + 1 else ()
        for (source, method), cell in zip(_COLUMNS, cells, strict=True):
            one, ten = (float(v) for v in cell.split("/"))
            for shots, v in ((1, one), (10, ten)):
                out.setdefault((_table_key(dataset), *kind, *known, shots), {})[source, method] = v
    return out


FIGURES = {**_parse(_GENERAL, "general"), **_parse(_MVTEC_GENERAL, "general"),
           **_parse(_HARD, "hard")}
# {(dataset, known class, shots): {(source, method): AUROC}}, the hard setting's
HARD_PER_CLASS = _parse(_HARD_CLASSES)
for _key, _cells in _EXTRA.items():
    FIGURES.setdefault(_key, {}).update(_cells)
# MVTec AD's subsets (the tables' keys), apart from the papers' nine datasets in DATASETS
MVTEC_SUBSETS = tuple(_table_key(line.split()[0]) for line in _MVTEC_GENERAL.strip().splitlines())
DATASETS = tuple(sorted({k[0] for k in FIGURES} - set(MVTEC_SUBSETS)))
KNOWN_NAMES = (f"{', '.join(DATASETS)}, or a subset of MVTec AD ({', '.join(MVTEC_SUBSETS)}; "
               f"the hard setting's carpet and metal_nut)")

# fsad's dataset names (converter subsets, ImageSet names) -> the tables' names
_DATASET_ALIASES = {"kolektorsdd": "sdd", "opticalclass": "optical", "dagm": "optical",
                    "mvtec": "mvtecad"}


def canonical_dataset(name: str) -> str:
    """"AITEX", "optical_class", "Hyper-Kvasir", "MVTec AD" ... -> the tables' key."""
    key = _table_key(name)
    key = _DATASET_ALIASES.get(key, key)
    if key not in DATASETS + MVTEC_SUBSETS:
        raise UserError(f"no paper figures for dataset {name!r}; known: {KNOWN_NAMES}")
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
      known_class: hard setting only: that one known class's figure (DRA paper Table 2,
        AHL paper Table 8); None: the mean over known classes.
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
        cells = HARD_PER_CLASS.get((ds, known_class, shots), {})
    else:
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
