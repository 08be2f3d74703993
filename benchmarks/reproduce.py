"""A paper table with one command: methods x settings x shots x seeds.

Every cell is an ordinary fsad run (`fsad.experiment.run_experiment`) in its own
workdir under --out (``<method>/<setting>[_<known class>]/<shots>shot``), so a cell's
results.json, checkpoints and test scores are those of `python -m fsad.main`. The
dataset is decoded once; a method's Runner (its compiled train, score and saliency
functions) is built once and reused by every setting, shot count and seed. An
interrupted table resumes: finished seeds are read back, an unfinished one resumes
from its last checkpoint. The hard setting runs, as the known class, each class the
papers average over for the dataset (AITEX's six, Mastcam's nine, Hyper-Kvasir's four,
ELPV mono and poly; every anomaly class of another dataset; or those given by
--known_classes) and reports their mean, as the papers do.

Prints a markdown table (AUROC mean ± std over seeds, the papers' figures for the cell
from `fsad.paper_figures.reference_auroc`, the training-and-evaluation wall time of
the cell) and writes it to OUT/table.md, with every number in OUT/table.json, after
every cell. With --budget_minutes no cell starts after that time (for a machine lent for
a fixed time), and --order protocol runs every method on a cell before the next cell.
--check checks every cell and lists the grid without decoding or training anything.

    python benchmarks/reproduce.py --dataset elpv --methods devnet dra ahl_dra \\
        --settings general hard --shots 10 1 --seeds 3 --out runs/elpv_table
    python benchmarks/reproduce.py --dataset elpv --methods devnet dra --variants quick,lite0 \\
        --settings general --shots 10 --seeds 1 --out runs/elpv_quick
    python benchmarks/reproduce.py --dataset folder --set data.root=/data/mvtec \\
        --set data.subset=bottle --methods dra --out runs/bottle

On several hosts, run the same command on each with fsad.main's host flags
(--distributed, or --coordinator_address, --num_processes and --process_id) and an
--out that all hosts share: every cell is one multi-host run, the first host prints
and writes the table, every host waits for the others after each cell (so all read
the files the first one wrote), and the first host's clock decides --budget_minutes.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fsad import interrupts  # noqa: E402

if __name__ == "__main__":
    interrupts.defer()  # before JAX's import: a Ctrl-C from here on stops the table

import jax  # noqa: E402
import numpy as np  # noqa: E402
from fsad.atomic import whole_or_nothing  # noqa: E402
from fsad.config import has_field, nearest_field, override  # noqa: E402
from fsad.data import dataset_without_pixels, load_imageset  # noqa: E402
from fsad.errors import UserError  # noqa: E402
from fsad.experiment import (build_runner, check_protocol, check_resumed_splits,  # noqa: E402
                             run_experiment, seeds_of)
from fsad.hosts import (is_primary, lost_host, same_on_every_host,  # noqa: E402
                        wait_for_every_host)
from fsad.main import EXIT_HOST_LOST, join_hosts, kept_checkpoints  # noqa: E402
from fsad.methods.devnet import devnet_variant  # noqa: E402
from fsad.paper_figures import (KNOWN_NAMES, canonical_dataset,  # noqa: E402
                                devnet_ablation_auroc, is_devnet_ablation,
                                config_protocol_note, dataset_of, paper_known_classes,
                                reference_auroc)
from fsad.validate import check_config  # noqa: E402
from fsad.workdir import (base_fields_that_differ, beyond_seed_count,  # noqa: E402
                          check_workdir_config, checkpoint_steps, fields_with_run_values,
                          seed_dir_of, seed_finished, steps_text, stored_config_diff,
                          write_json_atomic)

METHODS = ("devnet", "dra", "ahl_devnet", "ahl_dra")
# the fields each cell sets from this script's own flags: they change from cell to cell
# and leave the method, its shapes and its compiled functions as they are (`runner_key`);
# a --set of one is refused (every cell would overwrite it), and fsad's advice names the
# flag
GRID_FLAGS = {"data.setting": "--settings", "data.known_class": "--known_classes",
              "data.n_anomaly": "--shots", "seed": "--seed", "num_seeds": "--seeds"}


def method_configs(methods, variants: str, overrides: list[str], dataset: str) -> dict:
    """{method: its config with the table's variants and --set overrides}. An override
    applies to the methods whose config has the field (``ahl.epochs`` to the AHL methods
    alone); one that no method of the table has is an error."""
    configs = {}
    for m in methods:
        if m not in METHODS:
            raise UserError(f"method {m!r} is not known; use any of {', '.join(METHODS)}")
        configs[m] = importlib.import_module(f"configs.{m}").get_config(variants or None)
        if dataset:
            configs[m].data.name = dataset
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set {item!r}: write FIELD=VALUE, e.g. --set data.img_size=96")
        field, text = item.split("=", 1)
        if field in GRID_FLAGS:
            raise UserError(f"--set {item}: every cell of a table sets {field}; pass it as "
                            f"{GRID_FLAGS[field]}")
        if field == "ahl.base_workdir":  # (each AHL cell's was set over it, silently)
            raise UserError(f"--set {item}: every AHL cell sets its own, the base method's "
                            f"cell of the same protocol where the table has one (--methods "
                            f"dra ahl_dra); a base run elsewhere serves one protocol only: "
                            f"run fsad.main with --config.ahl.base_workdir for it")
        # with no taker, the override raises "not a config field" for the first config
        # that has a field of a name close to it (which the error names), else the first
        takers = [c for c in configs.values() if has_field(c, field)] or sorted(
            configs.values(), key=lambda c: nearest_field(c, field) is None)
        for c in takers:
            override(c, field, text)
    return configs


def runner_key(config) -> str:
    """The config without the protocol fields: cells with equal keys share a Runner."""
    d = config.to_dict()
    for field in GRID_FLAGS:
        *groups, name = field.split(".")
        node = d
        for group in groups:
            node = node[group]
        node.pop(name, None)
    d.get("ahl", {}).pop("base_workdir", None)
    return json.dumps(d, sort_keys=True, default=str)


def base_cell_workdir(cell: dict, configs: dict, config, out: str, seeds: int) -> str:
    """For an AHL cell whose base method's cell of the same protocol is in the table and
    finished with the same base settings, its trained models kept: that cell's workdir
    (the AHL run starts from them, `ahl.base_workdir`); else "" (the AHL run trains its
    base). A base cell carried from another machine without its checkpoints
    (benchmarks/session_state.py) is no base."""
    stored = os.path.join(cell_dir(out, cell), "config.json")
    if os.path.exists(stored):  # a cell begun earlier keeps its choice (and can resume)
        with open(stored) as f:
            return json.load(f).get("ahl", {}).get("base_workdir", "")
    base = config.ahl.base if config.method == "ahl" else ""
    workdir = cell_dir(out, {**cell, "method": base}) if base in configs else ""
    if not workdir or not finished(workdir, seeds) or not all(
            "checkpoints" in checkpoint_steps(seed_dir_of(workdir, s))
            for s in seeds_of(config)):
        return ""
    with open(os.path.join(workdir, "config.json")) as f:
        return "" if base_fields_that_differ(config, json.load(f)) else workdir


def anomaly_classes(data) -> list[str]:
    return sorted({str(c) for c, y in zip(data.classes, data.labels) if y == 1})


def hard_known_classes(given, data, paper_name: str) -> list[str]:
    """The hard setting's known classes: those given (--known_classes), else the ones the
    papers average over for this dataset (`fsad.paper_figures.paper_known_classes`:
    AITEX and Mastcam leave out their classes of a few images, which 10 shots would
    exhaust), else every anomaly class of the data."""
    if given:
        return list(given)
    present = anomaly_classes(data)
    paper = paper_known_classes(paper_name)
    missing = [c for c in paper if c not in present]
    if missing:
        say(f"the papers' known classes {', '.join(missing)} are not in the data; "
            f"running the others")
    return [c for c in paper if c in present] or present


def cells(methods, settings, shots, known_classes, order: str = "method") -> list[dict]:
    """The grid: one dict per (method, setting, known class, shots).

    order "method" runs a method's every cell before the next method's; "protocol" runs
    every method on a (setting, known class, shots) before the next, so that a table cut
    short (--budget_minutes) has all methods side by side on the cells it reached.
    """
    # (a value given twice: once; it made a row twice, and weighed a class twice in a mean)
    methods, settings, shots, known_classes = (list(dict.fromkeys(v)) for v in (
        methods, settings, shots, known_classes))
    protocols = [(s, k, n) for s in settings for k in (known_classes if s == "hard" else [""])
                 for n in shots]
    pairs = ([(m, p) for m in methods for p in protocols] if order == "method"
             else [(m, p) for p in protocols for m in methods])
    return [{"method": m, "setting": s, "known_class": k, "shots": n} for m, (s, k, n) in pairs]


def cell_config(base: dict, cell: dict, args):
    """A cell's config: its method's (`method_configs`) with the cell's protocol and the
    table's seeds."""
    config = base[cell["method"]].copy_and_resolve_references()
    config.data.setting = cell["setting"]
    config.data.known_class = cell["known_class"]
    config.data.n_anomaly = cell["shots"]
    config.seed = args.seed
    config.num_seeds = args.seeds
    return config


def check_grid(grid: list[dict], base: dict, args, data) -> None:
    """Raises the UserError of the first cell that cannot run, before any cell does: its
    config (`check_config`), a run of another config in its folder
    (`check_workdir_config`), a data.img_size other than the first method's, or a protocol
    the data cannot give for one of its seeds (more shots than a known class has
    anomalies), which would otherwise stop the table after the cells before it had
    trained, or a resumed seed whose training images changed since its checkpoints, or
    a dataset changed since a finished seed of a cell with seeds left
    (`check_resumed_splits`). `data` may be without pixels
    (`fsad.data.dataset_without_pixels`)."""
    img_size = base[grid[0]["method"]].data.img_size if grid else None
    for cell in grid:
        config = cell_config(base, cell, args)
        check_config(config, len(jax.devices()))
        if config.data.img_size != img_size:
            raise UserError("every method of a table must use the same data.img_size; "
                            "pass the same variants and --set data.img_size for all")
        seeds = seeds_of(config)
        check_protocol(config, data, seeds)
        workdir = cell_dir(args.out, cell)
        check_resumed_splits(config, data, seeds, workdir)
        # a cell run before with another config (a --set changed since): refused now, not
        # when its turn comes after the cells before it trained (or read as finished; its
        # ahl.base_workdir, set per cell, is not compared: fsad.workdir.BASE_SOURCE)
        try:
            check_workdir_config(workdir, config)
        except UserError:  # said in this script's terms (--set, --out)
            diff = beyond_seed_count(stored_config_diff(workdir, config))
            raise UserError(f"{cell_name(cell)}: {workdir} holds a run of another config "
                            f"({fields_with_run_values(workdir, config, diff)}); pass those "
                            f"values with --set to resume or extend this table, or use a "
                            f"new --out") from None


def cell_dir(out: str, cell: dict) -> str:
    setting = cell["setting"] + (f"_{cell['known_class']}" if cell["known_class"] else "")
    return os.path.join(out, cell["method"], setting, f"{cell['shots']}shot")


def finished(workdir: str, seeds: int) -> bool:
    """Whether a cell's run is complete in workdir (results.json with every seed)."""
    path = os.path.join(workdir, "results.json")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        return len(json.load(f)["runs"]) == seeds


def cell_state(workdir: str, first_seed: int, seeds: int) -> str:
    """A cell's state for --check: "finished", "to run", or what a run would read back
    and resume ("1 of 2 seeds finished; seed 1 resumes from checkpoints step 10")."""
    if finished(workdir, seeds):
        return "finished"
    dirs = {s: seed_dir_of(workdir, s) for s in range(first_seed, first_seed + seeds)}
    done = [s for s, d in dirs.items() if seed_finished(d)]
    kept = {s: checkpoint_steps(d) for s, d in dirs.items() if s not in done}
    parts = [f"{len(done)} of {seeds} seeds finished"] if done else []
    parts += [f"seed {s} resumes from " + ", ".join(steps_text(k)) for s, k in kept.items()
              if k]
    return "; ".join(parts) or "to run"


def run_table(args, on_cell=None, on_start=None) -> dict:
    """Runs (or resumes) every cell and returns {"cells": [...], "rows": [...],
    "skipped": [...]}; on_cell(table) is called after each cell with the table so far,
    on_start(workdir) before each cell runs.

    With args.budget_minutes, no cell starts once that many minutes have passed (cells
    already finished are still read back); the cells left out are listed in "skipped".
    With args.check, every cell is checked and listed, none run: "skipped" holds the grid.
    """
    t0 = time.time()
    if args.known_classes and "hard" not in args.settings:
        raise UserError("--known_classes is read only by the hard setting and --settings "
                        f"is {' '.join(args.settings)}; add --settings hard (or general hard)")
    if args.paper_dataset:  # a misspelt name left the papers' column empty
        try:
            canonical_dataset(args.paper_dataset)
        except UserError:
            raise UserError(f"--paper_dataset {args.paper_dataset!r} is not a dataset of the "
                            f"papers' tables; use one of {KNOWN_NAMES}, or leave it out"
                            ) from None
    base = method_configs(args.methods, args.variants, args.set, args.dataset)
    first = base[args.methods[0]]
    # the grid is checked before a decode (--check: nothing written either)
    rows = dataset_without_pixels(first.data, write=not args.check)
    paper_name = args.paper_dataset or dataset_of(first)
    known = hard_known_classes(args.known_classes, rows, paper_name)
    runners: dict = {}
    results, skipped = [], []
    grid = cells(args.methods, args.settings, args.shots, known, args.order)
    check_grid(grid, base, args, rows)
    notes = protocol_notes(base, paper_name)
    for note in notes:
        say(f"note: {note}")
    if args.check:  # the grid as it would run, and nothing decoded or trained
        for i, cell in enumerate(grid):
            workdir = cell_dir(args.out, cell)
            say(f"[{i + 1}/{len(grid)}] {cell_name(cell)} -> {workdir} "
                f"({cell_state(workdir, args.seed, args.seeds)})")
        say(f"every cell checked ({len(grid)}); nothing trained (--check)")
        return {"cells": [], "rows": [], "skipped": grid}
    data = load_imageset(first.data)

    def table() -> dict:
        return {"dataset": paper_name, "init": sorted({r["init"] for r in results}),
                "variants": args.variants, "overrides": args.set, "cells": results,
                "rows": rows_of(results, paper_name), "skipped": skipped,
                "notes": notes, "wall_seconds": time.time() - t0}

    for i, cell in enumerate(grid):
        workdir = cell_dir(args.out, cell)
        # on several hosts, the first one's clock decides for all
        spent = args.budget_minutes is not None and same_on_every_host(
            time.time() - t0 > 60 * args.budget_minutes)
        done = finished(workdir, args.seeds)
        if spent and not done:
            say(f"[{i + 1}/{len(grid)}] {cell_name(cell)}: not started, the "
                f"{args.budget_minutes:g}-minute budget is spent")
            skipped.append(cell)
            continue
        config = cell_config(base, cell, args)
        if config.method == "ahl":
            config.ahl.base_workdir = base_cell_workdir(cell, base, config, args.out,
                                                        args.seeds)
        key = runner_key(config)
        if key not in runners:
            runners[key] = build_runner(config)
        runner = dataclasses.replace(runners[key], config=config)  # shares compiled steps
        say(f"[{i + 1}/{len(grid)}] {cell_name(cell)} -> {workdir}"
            + (" (finished: read back)" if done else ""))
        if on_start is not None:
            on_start(workdir)
        res = run_experiment(config, workdir, runner=runner, data=data)
        # the first host has written the cell's files: every host reads the same ones for
        # the next cells (finished? an AHL cell's base cell)
        wait_for_every_host(f"reproduce cell {i}")
        aurocs = [r["auroc"] for r in res["runs"]]
        # AHL: its base model's AUROC in the same run (the heads it started from)
        base_aurocs = [r["base_auroc"] for r in res["runs"] if "base_auroc" in r]
        # which of DevNet-TPAMI's ablations the cell is, for the figures beside it
        kind = {"variant": devnet_variant(config), "backbone": config.model.backbone}
        results.append({**cell, "auroc": aurocs, "base_auroc": base_aurocs, "init": res["init"],
                        "seconds": float(sum(r["wall_seconds"] for r in res["runs"])),
                        **kind, "paper": reference_auroc_or_empty(paper_name, cell, **kind)})
        if on_cell is not None:
            on_cell(table())
    return table()


def protocol_notes(base: dict, dataset: str) -> list[str]:
    """`fsad.paper_figures.protocol_note` of each method of the table (its config in
    `base`): where its cells depart from the protocol of the papers' figures beside them."""
    notes = [config_protocol_note(config, dataset) for config in base.values()]
    return [in_reproduce_terms(n) for n in notes if n]


def say(line: str) -> None:
    """Prints a progress line, once for all hosts (by the first)."""
    if is_primary():
        print(line, flush=True)


def cell_name(cell: dict) -> str:
    return (f"{cell['method']} {cell['setting']} {cell['known_class'] or ''}"
            f"{' ' if cell['known_class'] else ''}{cell['shots']}-shot")


def reference_auroc_or_empty(dataset: str, cell: dict, variant: str = "MIL-DS",
                             backbone: str = "resnet18") -> dict:
    """The papers' figures for a cell; {} where they report none (other datasets, shots
    other than 1 and 10). A DevNet ablation (`devnet.variant` other than MIL-DS, or the
    AlexNet or ResNet-50 trunk) gets DevNet-TPAMI Table 5's figure, not DevNet's."""
    try:
        if cell["method"] == "devnet" and is_devnet_ablation(variant, backbone):
            return devnet_ablation_auroc(dataset, variant, backbone, cell["setting"],
                                         cell["shots"])
        return reference_auroc(dataset, cell["method"], cell["setting"], cell["shots"],
                               cell["known_class"] or None)
    except UserError:
        return {}


def rows_of(results: list[dict], dataset: str) -> list[dict]:
    """One row per cell, and per (method, shots) of the hard setting one more, after that
    pair's last cell: the mean over known classes of each seed's AUROC, then mean ± std
    over seeds. AHL rows carry `base_mean`, their base model's mean AUROC in the same
    runs (None for the others)."""
    def base_mean(aurocs):
        return float(np.mean(aurocs)) if len(aurocs) else None

    def hard_mean(m, n, rs):
        per_seed = np.mean([r["auroc"] for r in rs], axis=0)  # [seeds]
        classes, theirs = {r["known_class"] for r in rs}, set(paper_known_classes(dataset))
        # the papers' mean is over their known classes: beside a mean over some of them
        # (a time budget spent, --known_classes) or others, none
        partial = classes < theirs
        label = (f"hard (mean over {len(classes)} of the papers' {len(theirs)} known "
                 f"classes)" if partial else "hard (mean over known classes)")
        paper = {} if theirs and classes != theirs else reference_auroc_or_empty(
            dataset, {"method": m, "setting": "hard", "shots": n, "known_class": ""},
            rs[0].get("variant", "MIL-DS"), rs[0].get("backbone", "resnet18"))
        return {"method": m, "setting": label, "shots": n,
                "mean": float(per_seed.mean()), "std": float(per_seed.std()),
                "base_mean": base_mean([a for r in rs for a in r["base_auroc"]]),
                "seeds": len(per_seed), "paper": paper,
                "seconds": float(sum(r["seconds"] for r in rs))}

    hard: dict = {}  # (method, shots) -> the indices of its hard cells
    for i, r in enumerate(results):
        if r["setting"] == "hard":
            hard.setdefault((r["method"], r["shots"]), []).append(i)
    last_of = {ix[-1]: key for key, ix in hard.items() if len(ix) >= 2}
    rows = []
    for i, r in enumerate(results):
        rows.append({"method": r["method"], "setting": r["setting"] + (
            f" ({r['known_class']} known)" if r["known_class"] else ""), "shots": r["shots"],
            "mean": float(np.mean(r["auroc"])), "std": float(np.std(r["auroc"])),
            "base_mean": base_mean(r["base_auroc"]),
            "seeds": len(r["auroc"]), "paper": r["paper"], "seconds": r["seconds"]})
        if i in last_of:
            rows.append(hard_mean(*last_of[i], [results[j] for j in hard[last_of[i]]]))
    return rows


def markdown(table: dict) -> str:
    lines = [f"{table['dataset']}, {', '.join(table['init'])}"
             + (f", variants {table['variants']}" if table["variants"] else "")
             + (f", {' '.join(table['overrides'])}" if table["overrides"] else ""), "",
             "| method | setting | shots | AUROC (mean ± std) | seeds | papers | wall time |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in table["rows"]:
        paper = ", ".join(f"{k.replace('_', ' ')} {v:.3f}" for k, v in r["paper"].items()) or "–"
        base = f" (its base {r['base_mean']:.3f})" if r.get("base_mean") is not None else ""
        spread = f" ± {r['std']:.3f}" if r["seeds"] > 1 else ""  # no std of one seed
        lines.append(f"| {r['method']} | {md(r['setting'])} | {r['shots']} | "
                     f"{r['mean']:.3f}{spread}{base} | {r['seeds']} | {paper} | "
                     f"{r['seconds']:.0f} s |")
    legend = (["± is the population std over seeds (np.std)."]
              if any(r["seeds"] > 1 for r in table["rows"]) else [])
    if any("mean over" in r["setting"] for r in table["rows"]):
        legend.append("A hard mean row averages each seed's AUROC over the known classes; "
                      "its wall time is its cells' sum.")
    lines += ["", " ".join(legend)] if legend else []
    if table.get("skipped"):
        lines += ["", "Not run (the time budget was spent): "
                  + "; ".join(cell_name(c) for c in table["skipped"]) + "."]
    lines += [f"\nNote: {md(n)}." for n in table.get("notes", [])]
    return "\n".join(lines) + "\n"


def md(text: str) -> str:
    """Text as markdown shows it: <a folder> was read as an HTML tag and hidden, a | as a
    column's end."""
    return text.replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")


def write_table(out: str, table: dict) -> str:
    """Writes OUT/table.json and OUT/table.md (each whole or not at all); returns the
    markdown."""
    os.makedirs(out, exist_ok=True)
    write_json_atomic(os.path.join(out, "table.json"), table)
    text = markdown(table)
    with whole_or_nothing(os.path.join(out, "table.md")) as tmp, open(tmp, "w") as f:
        f.write(text)
    return text


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="", help="data.name: elpv (default of the configs), "
                   "folder, synthetic or tfds")
    p.add_argument("--methods", nargs="+", default=["devnet", "dra", "ahl_dra"],
                   choices=METHODS)
    p.add_argument("--variants", default="", help="config variants, e.g. quick,lite0")
    p.add_argument("--settings", nargs="+", default=["general"], choices=["general", "hard"])
    p.add_argument("--shots", nargs="+", type=int, default=[10])
    p.add_argument("--known_classes", nargs="*", default=None,
                   help="hard setting: the known classes (default: those the papers average "
                   "over for the dataset, e.g. AITEX's six, else every anomaly class)")
    p.add_argument("--seeds", type=int, default=3, help="seeds seed .. seed+N-1 per cell")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="a config override for every cell, e.g. --set data.img_size=96")
    p.add_argument("--paper_dataset", default="", help="the dataset's name in the papers' "
                   "tables (default data.subset or data.name)")
    p.add_argument("--order", choices=["method", "protocol"], default="method",
                   help="method: each method's cells in turn; protocol: every method on a "
                   "cell before the next cell (best with --budget_minutes)")
    p.add_argument("--budget_minutes", type=float, default=None,
                   help="start no cell after this many minutes (finished cells are still "
                   "read back); the table lists the cells left out")
    p.add_argument("--out", required=True, help="folder of the cells' workdirs and the table")
    p.add_argument("--check", action="store_true", help="check every cell (its config, its "
                   "protocol against the data's rows, a resumed seed's images) and list the "
                   "grid, then stop: no image is decoded, no cell trained, no table written")
    hosts = p.add_argument_group("several hosts", "the same command on every host, one "
                                 "process each, on shared files (as fsad.main's host flags)")
    hosts.add_argument("--distributed", action="store_true", help="join a multi-host run; "
                       "jax.distributed.initialize() finds the hosts on a TPU pod, under "
                       "SLURM or Open MPI")
    hosts.add_argument("--coordinator_address", default=None,
                       help="elsewhere: process 0's host:port")
    hosts.add_argument("--num_processes", type=int, default=None)
    hosts.add_argument("--process_id", type=int, default=None)
    return p.parse_args(argv)


def in_reproduce_terms(message: str) -> str:
    """fsad's advice in this script's flags: "--config.batch_size" is "--set batch_size",
    "--config.data.n_anomaly" is "--shots" (GRID_FLAGS), a variant "--config FILE:quick"
    is "--variants quick"."""
    message = re.sub(r"--config FILE:(\w+)", r"--variants \1", message)

    def flag(m: re.Match) -> str:
        field, value = m.group(1), m.group(0).endswith("=")
        if field in GRID_FLAGS:
            return GRID_FLAGS[field] + (" " if value else "")
        return f"--set {field}" + ("=" if value else "")

    return re.sub(r"--config\.([\w.]+)=?", flag, message)


def main(argv=None) -> int:
    """Returns the exit status: 0; 2 for a UserError, 130 for Ctrl-C and 3 for the loss of
    another host, each said in one line."""
    args = parse_args(argv)

    started: list[str] = []  # the cells' workdirs, as each starts

    def on_cell(table):  # written by the first host alone, as a run's files are
        if is_primary():
            write_table(args.out, table)

    try:  # the table so far is on disk after every cell: a run cut short still leaves one
        interrupts.check()  # a Ctrl-C during the start-up (`interrupts.defer`)
        join_hosts(args.distributed, args.coordinator_address, args.num_processes,
                   args.process_id)
        table = run_table(args, on_cell=on_cell, on_start=started.append)
    except UserError as err:
        print(f"reproduce: error: {in_reproduce_terms(str(err))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback
        interrupts.delivered()
        kept = os.path.join(args.out, "table.md")
        kept = f"the table of the finished cells is {kept}" if os.path.exists(kept) else \
            "no cell had finished"
        if started:  # the cell it stopped in: its finished seeds and kept checkpoints
            kept += f"; the cell it stopped in: {kept_checkpoints(started[-1])[0]}"
        print(f"reproduce: interrupted ({kept}); run the same command to resume (finished "
              f"cells are read back, the unfinished one resumes from its checkpoints)",
              file=sys.stderr)
        return interrupts.exit_status()  # 130 for Ctrl-C, 143 for SIGTERM
    except Exception as err:  # noqa: BLE001 - only a lost host is answered here
        if not lost_host(err):
            raise
        print(f"reproduce: another host of the run stopped ({' '.join(str(err).split())[:200]}"
              f"); run the same command on every host to resume", file=sys.stderr)
        return EXIT_HOST_LOST
    if is_primary() and not args.check:
        print(write_table(args.out, table))
    return 0


if __name__ == "__main__":
    interrupts.install()  # a Ctrl-C that Python drops is raised again (fsad/interrupts.py)
    code = main()
    interrupts.delivered()  # done: a press in the teardown ends it, not with a traceback
    if code:  # the one line is printed: leave before background threads add their
        # shutdown noise, and (a lost host) before JAX's shutdown barrier waits for it
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
