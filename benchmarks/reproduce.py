"""A paper table with one command: methods x settings x shots x seeds.

Every cell is an ordinary fsad run (`fsad.experiment.run_experiment`) in its own
workdir under --out (``<method>/<setting>[_<known class>]/<shots>shot``), so a cell's
results.json, checkpoints and test scores are those of `python -m fsad.main`. The
dataset is decoded once; a method's Runner (its compiled train, score and saliency
functions) is built once and reused by every setting, shot count and seed. An
interrupted table resumes: finished seeds are read back, an unfinished one resumes
from its last checkpoint. The hard setting runs every anomaly class as the known class
(or those given by --known_classes) and reports their mean, as the papers do.

Prints a markdown table (AUROC mean ± std over seeds, the papers' figures for the cell
from `fsad.paper_figures.reference_auroc`, the training-and-evaluation wall time of
the cell) and writes it to OUT/table.md, with every number in OUT/table.json.

    python benchmarks/reproduce.py --dataset elpv --methods devnet dra ahl_dra \
        --settings general hard --shots 10 1 --seeds 3 --out runs/elpv_table
    python benchmarks/reproduce.py --dataset elpv --methods devnet dra --variants quick,lite0 \
        --settings general --shots 10 --seeds 1 --out runs/elpv_quick
    python benchmarks/reproduce.py --dataset folder --set data.root=/data/mvtec \
        --set data.subset=bottle --methods dra --out runs/bottle
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fsad.config import override  # noqa: E402
from fsad.data import load_imageset  # noqa: E402
from fsad.errors import UserError  # noqa: E402
from fsad.experiment import build_runner, run_experiment, write_json_atomic  # noqa: E402
from fsad.paper_figures import reference_auroc  # noqa: E402

METHODS = ("devnet", "dra", "ahl_devnet", "ahl_dra")
# fields that change from cell to cell and leave the method, its shapes and its
# compiled functions as they are
PROTOCOL_FIELDS = ("setting", "known_class", "n_anomaly")


def method_config(method: str, variants: str, overrides: list[str], dataset: str):
    """The config of one method with the table's variants and --set overrides."""
    if method not in METHODS:
        raise UserError(f"method {method!r} is not known; use any of {', '.join(METHODS)}")
    config = importlib.import_module(f"configs.{method}").get_config(variants or None)
    if dataset:
        config.data.name = dataset
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set {item!r}: write FIELD=VALUE, e.g. --set data.img_size=96")
        override(config, *item.split("=", 1))
    return config


def runner_key(config) -> str:
    """The config without the protocol fields: cells with equal keys share a Runner."""
    d = config.to_dict()
    for f in PROTOCOL_FIELDS:
        d["data"].pop(f, None)
    d.pop("seed", None)
    d.pop("num_seeds", None)
    return json.dumps(d, sort_keys=True, default=str)


def anomaly_classes(data) -> list[str]:
    return sorted({str(c) for c, y in zip(data.classes, data.labels) if y == 1})


def cells(methods, settings, shots, known_classes) -> list[dict]:
    """The grid: one dict per (method, setting, known class, shots)."""
    out = []
    for m in methods:
        for s in settings:
            for k in (known_classes if s == "hard" else [""]):
                for n in shots:
                    out.append({"method": m, "setting": s, "known_class": k, "shots": n})
    return out


def cell_dir(out: str, cell: dict) -> str:
    setting = cell["setting"] + (f"_{cell['known_class']}" if cell["known_class"] else "")
    return os.path.join(out, cell["method"], setting, f"{cell['shots']}shot")


def run_table(args) -> dict:
    """Runs (or resumes) every cell and returns {"cells": [...], "rows": [...]}."""
    base = {m: method_config(m, args.variants, args.set, args.dataset) for m in args.methods}
    first = base[args.methods[0]]
    data = load_imageset(first.data)
    known = args.known_classes or anomaly_classes(data)
    paper_name = args.paper_dataset or first.data.get("subset") or first.data.name
    runners: dict = {}
    results = []
    grid = cells(args.methods, args.settings, args.shots, known)
    for i, cell in enumerate(grid):
        config = base[cell["method"]].copy_and_resolve_references()
        config.data.setting = cell["setting"]
        config.data.known_class = cell["known_class"]
        config.data.n_anomaly = cell["shots"]
        config.seed = args.seed
        config.num_seeds = args.seeds
        if config.data.img_size != first.data.img_size:
            raise UserError("every method of a table must use the same data.img_size; "
                            "pass the same variants and --set data.img_size for all")
        key = runner_key(config)
        if key not in runners:
            runners[key] = build_runner(config)
        runner = dataclasses.replace(runners[key], config=config)  # shares compiled steps
        workdir = cell_dir(args.out, cell)
        print(f"[{i + 1}/{len(grid)}] {cell['method']} {cell['setting']} "
              f"{cell['known_class'] or ''} {cell['shots']}-shot -> {workdir}", flush=True)
        res = run_experiment(config, workdir, runner=runner, data=data)
        aurocs = [r["auroc"] for r in res["runs"]]
        # AHL: its base model's AUROC in the same run (the heads it started from)
        base_aurocs = [r["base_auroc"] for r in res["runs"] if "base_auroc" in r]
        results.append({**cell, "auroc": aurocs, "base_auroc": base_aurocs, "init": res["init"],
                        "seconds": float(sum(r["wall_seconds"] for r in res["runs"])),
                        "paper": reference_auroc_or_empty(paper_name, cell)})
    table = {"dataset": paper_name, "init": sorted({r["init"] for r in results}),
             "variants": args.variants, "overrides": args.set, "cells": results,
             "rows": rows_of(results, paper_name)}
    return table


def reference_auroc_or_empty(dataset: str, cell: dict) -> dict:
    """The papers' figures for a cell; {} where they report none (other datasets, shots
    other than 1 and 10)."""
    try:
        return reference_auroc(dataset, cell["method"], cell["setting"], cell["shots"],
                               cell["known_class"] or None)
    except UserError:
        return {}


def rows_of(results: list[dict], dataset: str) -> list[dict]:
    """One row per cell, and per (method, shots) of the hard setting one more: the mean
    over known classes of each seed's AUROC, then mean ± std over seeds. AHL rows carry
    `base_mean`, their base model's mean AUROC in the same runs (None for the others)."""
    def base_mean(aurocs):
        return float(np.mean(aurocs)) if len(aurocs) else None

    rows = [{"method": r["method"], "setting": r["setting"] + (
        f" ({r['known_class']} known)" if r["known_class"] else ""), "shots": r["shots"],
        "mean": float(np.mean(r["auroc"])), "std": float(np.std(r["auroc"])),
        "base_mean": base_mean(r["base_auroc"]),
        "seeds": len(r["auroc"]), "paper": r["paper"], "seconds": r["seconds"]}
        for r in results]
    hard: dict = {}
    for r in results:
        if r["setting"] == "hard":
            hard.setdefault((r["method"], r["shots"]), []).append(r)
    for (m, n), rs in hard.items():
        if len(rs) < 2:
            continue
        per_seed = np.mean([r["auroc"] for r in rs], axis=0)  # [seeds]
        rows.append({"method": m, "setting": "hard (mean over known classes)", "shots": n,
                     "mean": float(per_seed.mean()), "std": float(per_seed.std()),
                     "base_mean": base_mean([a for r in rs for a in r["base_auroc"]]),
                     "seeds": len(per_seed),
                     "paper": reference_auroc_or_empty(dataset, {"method": m, "setting": "hard",
                                                                 "shots": n, "known_class": ""}),
                     "seconds": float(sum(r["seconds"] for r in rs))})
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
        lines.append(f"| {r['method']} | {r['setting']} | {r['shots']} | "
                     f"{r['mean']:.3f} ± {r['std']:.3f}{base} | {r['seeds']} | {paper} | "
                     f"{r['seconds']:.0f} s |")
    return "\n".join(lines) + "\n"


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
                   help="hard setting: the known classes (default every anomaly class)")
    p.add_argument("--seeds", type=int, default=3, help="seeds seed .. seed+N-1 per cell")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="a config override for every cell, e.g. --set data.img_size=96")
    p.add_argument("--paper_dataset", default="", help="the dataset's name in the papers' "
                   "tables (default data.subset or data.name)")
    p.add_argument("--out", required=True, help="folder of the cells' workdirs and the table")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.time()
    try:
        table = run_table(args)
    except UserError as err:
        print(f"reproduce: error: {err}", file=sys.stderr)
        return 2
    table["wall_seconds"] = time.time() - t0
    os.makedirs(args.out, exist_ok=True)
    write_json_atomic(os.path.join(args.out, "table.json"), table)
    text = markdown(table)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
