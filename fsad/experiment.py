"""One experiment: data, protocol, training and evaluation over seeds -> results.json.

A seed runs as named stages (split, train, score, metrics, explain, then the
method's own stages such as AHL's meta-training) over a `Runner` that holds what
every seed shares and is built once: the method, the mesh, the pretrained trunk
and the jitted train, score and saliency functions. A protocol grid
(benchmarks/reproduce.py) reuses one Runner across seeds and settings. What the
workdir must hold for a run to go on there is `fsad.workdir`'s.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import platform
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fsad import interrupts
from fsad.buckets import ROWS_BUCKET
from fsad.checkpoints import checkpoint_folder
from fsad.compile_cache import enable_compilation_cache
from fsad.data import dataset_without_pixels, load_imageset, make_split
from fsad.data.decode import load_image_folder
from fsad.errors import UserError
from fsad.evaluate import image_metrics, mean_std, per_class_auroc
from fsad.explain import explain_run, method_saliency_fn
from fsad.hosts import is_primary, same_on_every_host
from fsad.lock import check_not_locked, workdir_lock
from fsad.memory import check_fits, eval_fix, hint_on_oom, run_fix, train_fix
from fsad.mesh import make_mesh
from fsad.methods import build_method, method_stages
from fsad.precision import compute_dtype
from fsad.scoring import calibrate_run
from fsad.train import (Method, fit, init_state, make_score_fn, make_train_step, put_train_data,
                        score_images, variables_of)
from fsad.validate import check_against_data, check_config
from fsad.weights import pretrained_description, weights_to_check
from fsad.workdir import (base_source, changed_from_defaults, check_workdir, checkpoint_steps,
                          config_json, has_own_start, seed_dir_of, seed_finished,
                          seed_metrics_path, steps_text, workdir_change_lines,
                          write_json_atomic)


def software_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version
    out = {"python": platform.python_version()}
    for pkg in ("fsad", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy",
                "scikit-learn"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    out["devices"] = [str(d) for d in jax.devices()]
    out["processes"] = jax.process_count()  # hosts of a multi-host run (fsad.hosts)
    return out


def load_outliers(config) -> np.ndarray | None:
    """Outlier-exposure images (config.dra.outlier_root), decoded at img_size, or None
    (`fsad.data.decode.load_image_folder`: in the MVTec layout, the other subsets'
    training normals)."""
    root = config.dra.outlier_root if "dra" in config else ""
    return load_image_folder(root, config.data.img_size, config.data.get("subset", ""))


def load_pretrained(config) -> dict | None:
    """The trunk's pretrained variables (`fsad.weights.pretrained_variables`; None for
    random init), checked against the model's shapes before any step is taken."""
    from fsad.weights import merge_variables, pretrained_variables
    pretrained, _ = pretrained_variables(config.model)
    if pretrained is not None:
        size = config.data.img_size
        shapes = jax.eval_shape(build_method(config).init, jax.random.key(0),
                                jax.ShapeDtypeStruct((1, size, size, 3), np.float32))
        merge_variables(shapes, pretrained)  # raises UserError on keys or shapes that differ
    return pretrained


# ---------------------------------------------------------------- the runner

@dataclasses.dataclass
class Runner:
    """What every seed (and every setting of the same shapes) of a run shares, built
    once: the method, its optimiser, the mesh, the trunk initialisation (`init`, in
    words; its weights loaded by `trunk` at the first need), and the jitted train, score
    and saliency functions. `train_step_for` compiles the train step once per input
    signature and times the compilation apart from the steps.
    """

    config: object
    method: Method
    tx: object
    mesh: object
    init: str
    score_fn: Callable
    prepare_eval: Callable
    train_step: Callable
    compiled: dict = dataclasses.field(default_factory=dict)
    saliency_fns: dict = dataclasses.field(default_factory=dict)
    loaded: dict = dataclasses.field(default_factory=dict)

    def trunk(self) -> dict | None:
        """The trunk's pretrained variables (None: random init), loaded and checked on the
        first call (`load_pretrained`): only a seed that starts from them needs them, not
        one read back, resumed or started from another run's base."""
        if "trunk" not in self.loaded:
            self.loaded["trunk"] = load_pretrained(self.config)
        return self.loaded["trunk"]

    def train_step_for(self, state, data, key) -> tuple[Callable, float]:
        """(the compiled train step for these input shapes, seconds spent compiling it
        now: 0 when an earlier seed or setting compiled it)."""
        signature = str(jax.tree.map(lambda a: (np.shape(a), str(a.dtype)), (state, data)))
        if signature in self.compiled:
            return self.compiled[signature], 0.0
        t0 = time.time()
        devices = list(self.mesh.devices.flat)
        fix = train_fix(self.config, len(devices))
        what = (f"the train step of {self.method.name} (batch {self.config.batch_size}, "
                f"{self.config.data.img_size} px)")
        with hint_on_oom(f"compiling {what}", fix):
            compiled = self.train_step.lower(state, data, key).compile()
        check_fits(compiled, devices, what, fix)  # before a step, not an OOM inside one
        self.compiled[signature] = compiled
        return compiled, time.time() - t0

    def saliency_fn(self):
        """The jitted saliency function of the method (built once)."""
        if "fn" not in self.saliency_fns:
            self.saliency_fns["fn"] = method_saliency_fn(self.method, self.config)
        return self.saliency_fns["fn"]


def build_runner(config, devices=None) -> Runner:
    """The Runner of a config: method, optimiser, mesh, the trunk's initialisation (its
    weights not loaded yet: `Runner.trunk`) and jitted functions."""
    method = build_method(config)
    mesh = make_mesh(devices)
    tx = method.optimizer(config.steps_per_epoch)
    return Runner(config, method, tx, mesh, pretrained_description(config.model),
                  make_score_fn(method, mesh),
                  method.prepare_eval, make_train_step(method, tx, mesh, config.batch_size))


# ---------------------------------------------------------------- the stages of a seed

def split_stage(config, data, seed: int):
    """The protocol's train/test split of one seed (fsad.data.protocols)."""
    d = config.data
    return make_split(data, d.setting, d.n_anomaly, d.known_class or None, d.contamination,
                      seed, d.shot_pool)


def seeds_of(config) -> list[int]:
    """The seeds a run trains: config.seed and the config.num_seeds - 1 after it."""
    return [config.seed + i for i in range(config.num_seeds)]


def check_protocol(config, data, seeds) -> None:
    """Raises the UserError of a seed whose protocol the data cannot give (more shots than
    anomalies, an unknown known class, a contamination the test set cannot give) or whose
    split the method cannot train on (fsad.validate.check_against_data). `data` may be
    without pixels (fsad.data.dataset_without_pixels): only labels, classes and split are
    read."""
    for seed in seeds:
        check_against_data(config, len(split_stage(config, data, seed).train_normal))


def check_split_unchanged(data, split, seed: int, seed_dir: str, write: bool = True,
                          base: bool = False) -> None:
    """A seed resumes only on the training images it started with. Their fingerprint
    (and counts) go to seed_<s>/split.json at the seed's start; when that seed has kept a
    checkpoint, a split whose training images differ (the dataset gained, lost or renamed
    images since) is refused: its checkpoints were trained on other data. `data` may be
    without pixels (only file_ids are read); write=False checks without writing.
    base: seed_dir is another run's (ahl.base_workdir), whose trained base this seed
    would start from; checked only, never written.

    Raises:
      UserError: the training images differ from those of the seed's checkpoints.
    """
    ids = np.concatenate([data.file_ids[split.train_normal], data.file_ids[split.train_anomaly]])
    record = {"train_files_sha1": _ids_sha1(ids),
              "train_normal": int(len(split.train_normal)),
              "train_anomaly": int(len(split.train_anomaly)),
              **dataset_record(data),
              "train_files": [str(i) for i in ids]}  # what a refusal names
    kept = kept_split(seed_dir) if checkpoint_steps(seed_dir) else {}
    if kept and kept.get("train_files_sha1") != record["train_files_sha1"]:
        whose = (f"the base model in {seed_dir} (ahl.base_workdir) was" if base else
                 f"its checkpoints in {seed_dir} were")
        fix = ("restore the dataset as it was, or leave ahl.base_workdir empty to train "
               "the base here" if base else
               "use a new --workdir, or restore the dataset as it was")
        raise UserError(
            f"the training images of seed {seed} differ from those {whose} trained on "
            f"({kept.get('train_normal')} normals and {kept.get('train_anomaly')} seen "
            f"anomalies then, {record['train_normal']} and {record['train_anomaly']} "
            f"now: the dataset changed since{files_changed(kept, record)}); {fix}")
    if write and not base:
        os.makedirs(seed_dir, exist_ok=True)
        write_json_atomic(os.path.join(seed_dir, "split.json"), record)


def files_changed(kept: dict, now: dict, named: int = 2) -> str:
    """", e.g. a.png and b.png gone, c.png new" between two split.json records' training
    files; "" where the older one lists none (written before they were kept)."""
    if "train_files" not in kept:
        return ""
    then, current = set(kept["train_files"]), set(now["train_files"])
    parts = [f"{' and '.join(sorted(files)[:named])}"
             f"{f' and {len(files) - named} more' if len(files) > named else ''} {what}"
             for files, what in ((then - current, "gone"), (current - then, "new")) if files]
    return f", e.g. {', '.join(parts)}" if parts else ", in their order"


def kept_split(seed_dir: str) -> dict:
    """A seed's split.json (`check_split_unchanged`); {} where it has none."""
    path = os.path.join(seed_dir, "split.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _ids_sha1(ids) -> str:
    return hashlib.sha1("\n".join(map(str, ids)).encode()).hexdigest()


def dataset_record(data) -> dict:
    """The dataset a seed started on, in its split.json: its rows' sha1 and count."""
    return {"dataset_sha1": _ids_sha1(data.file_ids), "dataset_images": int(len(data.file_ids))}


def check_resumed_splits(config, data, seeds, workdir: str) -> None:
    """check_split_unchanged, without writing, for every seed of `workdir` not finished
    (a finished seed is read back, not trained): a dataset changed under a run's
    checkpoints is refused from its rows, before any weight or decode. So is one changed
    since a finished seed where another seed would train now: results.json would
    average seeds of two datasets.

    Raises:
      UserError: the dataset changed under a seed's checkpoints, or since a finished
        seed while another has training left.
    """
    left = [seed for seed in seeds if not seed_finished(seed_dir_of(workdir, seed))]
    for seed in left:
        seed_dir = seed_dir_of(workdir, seed)
        check_split_unchanged(data, split_stage(config, data, seed), seed, seed_dir,
                              write=False)
    now = dataset_record(data)
    for seed in (s for s in seeds if s not in left):
        kept = kept_split(seed_dir_of(workdir, seed))
        if kept.get("dataset_sha1", now["dataset_sha1"]) == now["dataset_sha1"]:
            continue
        changed = (f"the dataset changed since seed {seed} of {workdir} finished "
                   f"({kept.get('dataset_images')} images then, {now['dataset_images']} now)")
        if left:
            raise UserError(
                f"{changed} and seed{'s' if len(left) > 1 else ''} "
                f"{', '.join(map(str, left))} would train on it: results.json would average "
                f"seeds of two datasets; restore the dataset as it was, or use a new "
                f"--workdir")
        # every seed read back: its figures are of the dataset it ran on, said once
        logging.warning("%s: its results are read back as they were, of the dataset then; "
                        "to evaluate on the dataset as it is now, use a new --workdir",
                        changed)
        break


def check_bases(config, data, seeds, workdir: str) -> dict[int, str | None]:
    """AHL on another run's base (ahl.base_workdir): that run checked for the seeds that
    need it (`base_source`: a finished seed is read back, and a started one holds its
    base checkpoint, so the base run may be gone, e.g. a table carried elsewhere), and
    trained on this split's images (a changed dataset reused it without a word, its seen
    anomalies then among the test images). `data` may be without pixels.
    -> {seed: the base checkpoint folder it starts from, or None}."""
    bases = {seed: base_source(config, workdir, seed) for seed in seeds}
    for seed, base in bases.items():
        if base:
            check_split_unchanged(data, split_stage(config, data, seed), seed,
                                  os.path.dirname(base), write=False, base=True)
    return bases


def seeds_from_the_trunk(workdir: str, bases: dict[int, str | None]) -> list[int]:
    """The seeds of `check_bases`'s {seed: base} that would start training from the
    trunk's initialisation: not finished, without a checkpoint of their own, and not
    started from another run's base. Only they need the pretrained weights."""
    return [seed for seed, base in bases.items()
            if base is None and not has_own_start(seed_dir_of(workdir, seed))]


def train_stage(runner: Runner, data, split, seed: int, seed_dir: str):
    """Trains (or resumes, or finds finished) the method on one split. -> (state, info)."""
    config = runner.config
    key = jax.random.key(seed)
    k_init, k_train = jax.random.split(key)
    checkpoint_folder(os.path.join(seed_dir, "checkpoints"))  # before any compilation
    train_data = put_train_data(data.images[split.train_normal], data.images[split.train_anomaly],
                                runner.mesh, load_outliers(config), bucket=ROWS_BUCKET)
    # the trunk's weights go in only where no checkpoint is restored (fit's `trunk`)
    state = init_state(runner.method, k_init, train_data, runner.tx, runner.mesh)
    # compiled only when steps remain (not for a finished base run that AHL starts from)
    return fit(runner.method, state, runner.tx, train_data, runner.mesh, k_train,
               config.batch_size, config.epochs, config.steps_per_epoch, seed_dir,
               config.keep_checkpoints, desc=f"{runner.method.name} seed {seed}",
               make_step=lambda s: runner.train_step_for(s, train_data, k_train),
               start_from=base_source(config, os.path.dirname(seed_dir), seed,
                                      agree=same_on_every_host),
               checkpoint_seconds=config.checkpoint_seconds, trunk=runner.trunk)


def score_stage(runner: Runner, variables, images: np.ndarray, seed: int) -> dict:
    """Eval-mode scores of test images. -> {"score": [N], one entry per head}."""
    key = jax.random.key(seed + 10_000) if runner.method.random_scores else None
    return score_images(runner.score_fn, variables, images, runner.mesh,
                        runner.config.eval_batch_size, key=key)


def metrics_stage(labels: np.ndarray, scores: dict) -> dict:
    """Image AUROC/AUPR and each head's AUROC. -> metrics."""
    metrics = image_metrics(labels, scores["score"])
    for head, s in scores.items():
        if head != "score":
            metrics[f"auroc_{head}"] = image_metrics(labels, s)["auroc"]
    return metrics


def explain_stage(runner: Runner, variables, data, split, scores: dict, seed_dir: str) -> dict:
    """Saliency overlays and, with masks, the pixel metrics (fsad.explain). -> metrics."""
    t0 = time.time()
    test_masks = data.masks[split.test] if data.masks is not None else None
    explained = explain_run(runner.method, variables, data.images[split.test],
                            data.labels[split.test], test_masks, scores["score"],
                            data.file_ids[split.test], runner.config, seed_dir,
                            saliency_fn=runner.saliency_fn(),
                            has_mask=data.has_mask()[split.test], mesh=runner.mesh)
    out = {k: v for k, v in explained.items() if k.startswith("pixel_")}
    return {**out, "explain_seconds": time.time() - t0}


def run_seed(runner: Runner, data, seed: int, workdir: str) -> dict:
    """Split, train, score, evaluate, explain, then the method's own stages (AHL), and
    write seed_<s>/metrics.json and test_scores.npz; a finished seed is read back."""
    config = runner.config
    seed_dir = seed_dir_of(workdir, seed)
    done = seed_metrics_path(seed_dir)
    if os.path.exists(done):
        with open(done) as f:
            logging.info("seed %d already finished in %s", seed, seed_dir)
            return json.load(f)
    t0 = time.time()
    n_devices = runner.mesh.devices.size
    split = split_stage(config, data, seed)
    check_split_unchanged(data, split, seed, seed_dir)
    with hint_on_oom("training", train_fix(config, n_devices)):
        state, train_info = train_stage(runner, data, split, seed, seed_dir)
    t_eval = time.time()
    variables = runner.prepare_eval(variables_of(state))
    with hint_on_oom("scoring the test images", eval_fix(config)):
        scores = score_stage(runner, variables, data.images[split.test], seed)
    labels = data.labels[split.test]
    metrics = metrics_stage(labels, scores)
    if config.explain.enabled:
        # explanations are of the base network (AHL replaces only its heads)
        with hint_on_oom("the saliency maps", eval_fix(config)):
            metrics.update(explain_stage(runner, variables, data, split, scores, seed_dir))
    for stage in method_stages(config):
        interrupts.check()  # a Ctrl-C dropped during the stages before
        with hint_on_oom(f"the {stage.__name__.replace('_stage', '')} stage (its meta-training "
                         f"and scoring)", run_fix(config, n_devices)):
            scores, metrics = stage(runner, data, split, variables, scores, metrics, seed,
                                    seed_dir)
    cal = calibrate_run(config, scores["score"])  # the final scores' (AHL's, after its stage)
    if cal is not None:
        metrics["flagged_at_confidence"] = float(np.mean(cal["anomalous"]))
    result = {"seed": seed, **metrics,
              "per_class_auroc": per_class_auroc(labels, scores["score"], data.classes[split.test]),
              "split": split.describe(data), **train_info,
              # what model.dtype meant here ("auto": bfloat16 on a GPU, float32 on a CPU)
              "compute_dtype": jnp.dtype(compute_dtype(config.model.dtype)).name,
              "eval_seconds": time.time() - t_eval, "wall_seconds": time.time() - t0}
    if is_primary():
        os.makedirs(seed_dir, exist_ok=True)
        np.savez(os.path.join(seed_dir, "test_scores.npz"), file_ids=data.file_ids[split.test],
                 labels=labels, **({} if cal is None else {"p_value": cal["p_value"]}),
                 **scores)
    write_json_atomic(done, result)
    return result


def check_run(config, workdir: str, n_devices: int | None = None) -> list[str]:
    """Every check a run of `config` in `workdir` makes before its first step, with
    nothing written or decoded (``python -m fsad.main ... --check``): the config, every
    seed's protocol on the dataset's rows (`dataset_without_pixels`), the config stored
    in the workdir and the training images of its seeds that would resume, an AHL run's
    base run (ahl.base_workdir), and the trunk's weights where a seed starts from them:
    read where they are on this machine (their keys and shapes against the model's),
    never fetched.

    Returns:
      the config's fields that differ from its method's defaults (the variants' and
      flags' doing), one a line, then one line per seed: what it trains and tests on,
      and whether it starts, resumes or is read back.
    """
    n_devices = n_devices if n_devices is not None else len(jax.devices())
    check_config(config, n_devices)
    seeds = seeds_of(config)
    rows = dataset_without_pixels(config.data, write=False)
    check_protocol(config, rows, seeds)
    changes = workdir_change_lines(workdir, config)
    if os.path.isdir(workdir):
        check_not_locked(workdir)  # a run training there: this one would be refused
        check_resumed_splits(config, rows, seeds, workdir)
    bases = check_bases(config, rows, seeds, workdir)
    if not seeds_from_the_trunk(workdir, bases):
        weights = (f"weights: none loaded (model.pretrained={config.model.pretrained!r}): "
                   f"every seed is read back, resumes from its checkpoints or starts from its "
                   f"base run")
    else:
        weights, here = weights_to_check(config.model)
        if here:  # read as the run reads them (it refused files that --check passed:
            load_pretrained(config)  # another trunk's, a whole model, a file cut short)
            weights += "; read: its keys and shapes fit the model"
    lines = config_lines(config) + [weights, devices_line(config, n_devices)] + changes
    for seed in seeds:
        seed_dir = seed_dir_of(workdir, seed)
        finished = seed_finished(seed_dir)
        base = bases[seed]
        split = split_stage(config, rows, seed)
        kept = checkpoint_steps(seed_dir)
        trained = kept.get("checkpoints", -1) >= config.epochs * config.steps_per_epoch
        state = "finished, read back" if finished else \
            "resumes from " + ", ".join(steps_text(kept)) \
            + (" (its training done: the evaluation and the stages after it)"
               if trained and "ahl_checkpoints" not in kept else "") if kept \
            else f"starts from the trained base of ahl.base_workdir ({base})" if base \
            else "starts, training its base model first" if config.method == "ahl" \
            else "starts"
        mixed = f" (of them {len(split.contamination)} unlabelled anomalies)" \
            if len(split.contamination) else ""
        shots = len(split.train_anomaly)
        tested = int(rows.labels[split.test].sum())
        lines.append(f"seed {seed}: trains on {len(split.train_normal)} normals{mixed} and "
                     f"{shots} seen anomal{'y' if shots == 1 else 'ies'}, tests on "
                     f"{len(split.test)} images ({tested} anomal"
                     f"{'y' if tested == 1 else 'ies'}); {state}")
    return lines


def devices_line(config, n_devices: int) -> str:
    """What --check says of the devices: how many, of which kind, over how many hosts,
    and the training batch's share of each."""
    hosts = jax.process_count()
    return (f"devices: {n_devices} {jax.default_backend()}"
            + (f" over {hosts} processes" if hosts > 1 else "")
            + f"; batch_size {config.batch_size}: {config.batch_size // n_devices} images per "
            f"device (model.dtype={config.model.dtype}: "
            f"{jnp.dtype(compute_dtype(config.model.dtype)).name} here)")


def config_lines(config) -> list[str]:
    """What --check says of the config: the method, then each field the variants and
    flags set to another value than the method's config file, with that default."""
    from fsad.methods import method_title
    changed = changed_from_defaults(config)
    head = f"config: {method_title(config)}"
    if not changed:
        return [head + ", its config file's defaults"]
    unset = {"data.cache_dir": "None: $FSAD_CACHE, else ~/.cache/fsad"}  # what None reads as
    return [head + f", its config file's defaults but {len(changed)} "
            f"field{'s' if len(changed) > 1 else ''}:"] + [
        f"  {k} = {v!r} (default {unset.get(k, 'None') if d is None else repr(d)})"
        for k, v, d in changed]


def run_experiment(config, workdir: str, devices=None, runner: Runner | None = None,
                   data=None) -> dict:
    """Runs every seed of a config in `workdir` and writes workdir/results.json.

    runner, data: reuse a Runner (its compiled functions) and a decoded dataset across
    calls, as a protocol grid does (benchmarks/reproduce.py); built here when None.
    """
    t0 = time.time()
    check_config(config, len(devices) if devices is not None else len(jax.devices()))
    seeds = seeds_of(config)
    rows = None
    if data is None:  # a mistyped root or too many shots, before any weight or workdir
        rows = dataset_without_pixels(config.data)
        check_protocol(config, rows, seeds)
    # AHL's base run, before the workdir is made, any weight loaded or image decoded
    bases = check_bases(config, rows if rows is not None else data, seeds, workdir)
    with workdir_lock(workdir):  # before the config check, which may replace config.json
        check_workdir(workdir, config)
        if rows is not None:  # a dataset changed under kept checkpoints, before the weights
            check_resumed_splits(config, rows, seeds, workdir)
        enable_compilation_cache()
        runner = runner or build_runner(config, devices)
        if seeds_from_the_trunk(workdir, bases):  # the weights, before the images
            runner.trunk()
        data = data if data is not None else load_imageset(config.data)
        check_protocol(config, data, seeds)  # every seed's, before the first trains
        read_back = [seed for seed in seeds if seed_finished(seed_dir_of(workdir, seed))]
        runs = [run_seed(runner, data, seed, workdir) for seed in seeds]
        results = {
            "method": config.method if config.method != "ahl" else f"ahl({config.ahl.base})",
            "dataset": data.name,
            "init": runner.init,
            "summary": mean_std(runs),
            "runs": runs,
            "dataset_counts": data.counts(),
            "config": config_json(config),
            "versions": software_versions(),
            "wall_seconds": time.time() - t0,
            "read_back": read_back,  # seeds finished before this run: their figures read
        }
        write_json_atomic(os.path.join(workdir, "results.json"), results)
        return results


def summary_text(results: dict) -> str:
    """A one-screen summary of results.json."""
    s = results["summary"]
    r0 = results["runs"][0]
    sp = r0["split"]
    cfg = results["config"]
    d = cfg["data"]
    n = len(results["runs"])

    def pm(k):  # over the seeds that give the figure (`evaluate.mean_std`'s "n")
        given = s[k].get("n", n)
        text = f"{s[k]['mean']:.3f} ± {s[k]['std']:.3f}" if given > 1 else f"{s[k]['mean']:.3f}"
        return text + (f" ({given} of {n} seeds)" if given < n else "")

    setting = d["setting"] + (f" (known: {d['known_class']})" if d["setting"] == "hard" else "")
    if d.get("contamination"):
        setting += f", contamination {d['contamination']:g}"
    mixed = len(sp.get("contamination", []))
    lines = [
        f"fsad {results['method']} on {results['dataset']}: {setting}, {d['n_anomaly']}-shot, "
        f"{d['img_size']} px, {n} seed(s); trunk: {results.get('init', '?')}",
        f"  AUROC  {pm('auroc')}",
        f"  AUPR   {pm('aupr')}",
        f"  train: {sp['train_normal']} normal"
        + (f" (of them {mixed} unlabelled anomal{'y' if mixed == 1 else 'ies'})" if mixed
           else "")
        + f" + {sp['train_anomaly']} seen "
        f"anomal{'y' if sp['train_anomaly'] == 1 else 'ies'}; test: {sp['test_normal']} "
        f"normal + {sp['test_anomaly']} anomal{'y' if sp['test_anomaly'] == 1 else 'ies'} "
        f"({', '.join(sp['test_anomaly_classes'])})",
    ]
    for k in s:
        if k.startswith(("auroc_", "pixel_auroc", "base_auroc")):
            lines.append(f"  {k:<14} {pm(k)}")
    if "ahl" in r0:
        a = r0["ahl"]
        epoch_s = a["epoch_seconds"]  # None when a resumed run had no epoch left
        of_seed = f" (seed {r0['seed']})" if n > 1 else ""
        lines.append(f"  AHL{of_seed}: {a['tasks']} tasks on {a['cluster_on']} clusters "
                     f"{a['cluster_sizes']}, {100 * a['dead_normal_fraction']:.0f}% of normals "
                     f"with all-zero features"
                     + (f", {epoch_s:{'.1f' if epoch_s >= 10 else '.2g'}} s per meta-epoch"
                        if epoch_s else ""))
    lines.append(f"  per class AUROC (seed {r0['seed']}): " + ", ".join(
        f"{c} {v:.3f}" for c, v in r0["per_class_auroc"].items()))
    # a seed read back keeps the wall time of the run that trained it
    lines.append(f"  wall time {results['wall_seconds']:.1f} s on {jax.default_backend()}; "
                 f"{s['wall_seconds']['mean']:.1f} s per seed"
                 + (" (a seed read back: the time of the run that trained it)"
                    if results.get("read_back", True) else ""))
    return "\n".join(lines)


def print_summary(results: dict) -> None:
    print(summary_text(results), file=sys.stdout, flush=True)
