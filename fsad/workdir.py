"""What a run's workdir holds, and whether a run may start, go on or be scored there.

A workdir holds one config (config.json), the checkpoints of each seed (seed_<s>/
checkpoints, and AHL's seed_<s>/ahl_checkpoints), each finished seed's metrics.json and
the run's results.json. A run refuses a workdir made with another config (fields that
only batch the evaluation or pace the checkpoints, the cache folder, and the count of
seeds aside; scoring lets more differ: `check_stored_config`); AHL may start from another
workdir's base run when that run trained the same base model (`base_run_checkpoints`).
"""

from __future__ import annotations

import json
import logging
import os
from types import SimpleNamespace
from typing import Callable

from fsad.atomic import whole_or_nothing
from fsad.config import defaults_of, has_field, method_defaults
from fsad.errors import UserError


def seed_dir_of(workdir: str, seed: int) -> str:
    """The folder of one seed of a run: its checkpoints, split.json and metrics.json."""
    return os.path.join(workdir, f"seed_{seed}")


def seed_metrics_path(seed_dir: str) -> str:
    """seed_<s>/metrics.json, written when the seed has finished: a seed that has it is
    read back, not trained again."""
    return os.path.join(seed_dir, "metrics.json")


def seed_finished(seed_dir: str) -> bool:
    """Whether a seed's folder holds its metrics.json (`seed_metrics_path`)."""
    return os.path.exists(seed_metrics_path(seed_dir))


def config_json(config) -> dict:
    """The config as plain JSON values: what workdir/config.json holds."""
    return json.loads(config.to_json_best_effort())


# fields that only batch the evaluation: a run may go on, or be scored, with other values
# (they change no trained weight and, with a fixed reference set, no score)
BATCHING_ONLY = ("eval_batch_size", "explain.batch_size")
# how often checkpoints are saved: a run may go on with another value (every save holds
# the same state an uninterrupted run has at that step)
CHECKPOINT_PACE = ("checkpoint_seconds",)
# where AHL's base model comes from: a finished run with the same base settings (checked
# by `base_run_checkpoints`) or training it in place give the same model, and a seed
# keeps the start it adopted (`fsad.checkpoints.adopt_checkpoint`)
BASE_SOURCE = ("ahl.base_workdir",)
# a run may go on with another count of seeds: each seed is a run of its own (seed_<s>),
# so more seeds train the new ones beside the finished ones, and fewer report the first
SEED_COUNT = ("num_seeds",)
# where decoded images are kept: the same images from any cache or none
CACHE_PLACE = ("data.cache_dir",)
# what scoring new images leaves unread: the test masks (pixel metrics are training's) and
# where the training data lie (a dataset moved since: the trained model is the workdir's)
SCORING_UNREAD = ("data.mask_resize", "data.root", "data.tfds_dir", "dra.outlier_root",
                  "ahl.texture_root")


def _flat(tree: dict, prefix: str = "") -> dict:
    """{"data": {"img_size": 448}} -> {"data.img_size": 448}."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def run_config(workdir: str):
    """The config the run in workdir was made with (its config.json's fields over its
    method's config file; a field the run's fsad lacked keeps its default):
    ``--config configs/run.py:WORKDIR``, to score or extend a run without giving its
    config file, variants and flags again.

    Raises:
      UserError: workdir is empty or holds no run's config.json.
    """
    if not workdir:
        raise UserError("configs/run.py reads a run's config; name the run's folder after "
                        "a colon, e.g. --config configs/run.py:runs/devnet")
    workdir = os.path.expanduser(workdir)  # a shell leaves ~ after a colon as it is
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise UserError(f"configs/run.py:{workdir}: {workdir!r} holds no run (no "
                        f"config.json); name a trained run's --workdir after the colon")
    try:
        with open(path) as f:
            stored = json.load(f)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {path} ({' '.join(str(err).split())[:200]}); name a "
                        f"trained run's --workdir after the colon, or pass its config "
                        f"file and flags") from None
    if not isinstance(stored, dict) or stored.get("method") not in ("devnet", "dra", "ahl"):
        raise UserError(f"{path} is not an fsad run's config (no method of fsad's in it); "
                        f"name a trained run's --workdir after the colon")
    config = defaults_of(stored["method"], stored.get("ahl", {}).get("base"))
    # (an empty group, and a field this fsad no longer has, left out)
    config.update_from_flattened_dict({k: v for k, v in _flat(stored).items()
                                       if not isinstance(v, dict) and has_field(config, k)})
    return config


def _with_defaults(stored: dict, current: dict, config) -> dict:
    """A stored config (flat) with the fields it lacks that the current one (config,
    flat) has, at their defaults for config's method: fields added to fsad after the
    stored run was saved, which ran as their defaults do."""
    defaults = _flat(config_json(method_defaults(config)))
    return {**{k: defaults[k] for k in current if k in defaults}, **stored}


def changed_from_defaults(config) -> list[tuple[str, object, object]]:
    """(field, value, default) for each field (dotted, sorted) in which config differs
    from its method's config file without variants (`method_defaults`): what the
    variants and ``--config.*`` flags changed."""
    current, defaults = _flat(config_json(config)), _flat(config_json(method_defaults(config)))
    return [(k, current.get(k), defaults.get(k)) for k in sorted(set(current) | set(defaults))
            if current.get(k) != defaults.get(k)]


def stored_config_diff(workdir: str, config) -> list[str] | None:
    """The fields (dotted, e.g. "data.img_size") in which config differs from the one
    stored in workdir/config.json, less CHECKPOINT_PACE, BASE_SOURCE, CACHE_PLACE and
    BATCHING_ONLY (unless DRA draws its test reference per batch, where the batch changes
    the scores); None when none is stored. A field the stored config lacks was added to
    fsad after that run was saved, which ran as its default does: it differs only where
    config sets it to another value."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return None
    current = _flat(config_json(config))
    with open(path) as f:
        stored = _with_defaults(_flat(json.load(f)), current, config)
    per_batch = "dra" in config and config.dra.get("test_reference") == "per_batch"
    return sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k)
                  and k not in CHECKPOINT_PACE + BASE_SOURCE + CACHE_PLACE
                  and (per_batch or k not in BATCHING_ONLY))


CHECKPOINT_FOLDERS = ("checkpoints", "ahl_checkpoints")  # base training, AHL's meta-training


def saved_steps(folder: str) -> list[int]:
    """The complete steps of a checkpoint folder (Orbax names a step's folder by its
    number once it is whole; a half-written save, or an adoption under way, is no
    step); [] where the folder is missing."""
    return [int(d) for d in os.listdir(folder) if d.isdigit()] if os.path.isdir(folder) \
        else []


def checkpoint_steps(seed_dir: str) -> dict[str, int]:
    """{checkpoint folder: its newest complete step} of one seed's folder, for the
    folders of CHECKPOINT_FOLDERS that hold one (a half-written save is no step)."""
    found = {}
    for folder in CHECKPOINT_FOLDERS:
        steps = saved_steps(os.path.join(seed_dir, folder))
        if steps:
            found[folder] = max(steps)
    return found


def seed_folders(workdir: str) -> list[str]:
    """The names of a workdir's seed folders (seed_<s>), seeds in order; [] where the
    workdir is missing."""
    seeds = [d for d in os.listdir(workdir) if d.startswith("seed_")] \
        if os.path.isdir(workdir) else []
    return sorted(seeds, key=lambda d: int(d[5:]) if d[5:].isdigit() else -1)


def newest_checkpoints(workdir: str) -> list[str]:
    """The newest checkpoint of each checkpoint folder in a workdir, as
    "seed_0/checkpoints step 60" (base training) or "seed_0/ahl_checkpoints step 2"
    (AHL's meta-training), seeds in order."""
    return [f"{seed}/{kept}" for seed in seed_folders(workdir)
            for kept in steps_text(checkpoint_steps(os.path.join(workdir, seed)))]


def steps_text(kept: dict[str, int]) -> list[str]:
    """`checkpoint_steps`'s folders in words: ["checkpoints step 60", ...]."""
    return [f"{folder} step {step}" for folder, step in kept.items()]


def saved_in(workdir: str) -> list[str]:
    """What runs saved in a workdir: each checkpoint folder's newest checkpoint, each
    finished seed, the results; empty when a run there stopped before saving anything."""
    finished = [f"{d} finished" for d in seed_folders(workdir)
                if seed_finished(os.path.join(workdir, d))]
    results = ["results.json"] if os.path.exists(os.path.join(workdir, "results.json")) else []
    return newest_checkpoints(workdir) + finished + results


def fields_with_run_values(workdir: str, config, diff: list[str]) -> str:
    """"fields a, b; in the run: 1, 'x'" for a config difference: the fields and, for up
    to 4, the values the run in workdir was made with (a field its config.json lacks at
    its default), which a user scoring or resuming it must give again."""
    text = f"field{'s' if len(diff) > 1 else ''} {', '.join(diff)}"
    if len(diff) > 4:
        return text
    with open(os.path.join(workdir, "config.json")) as f:
        stored = _with_defaults(_flat(json.load(f)), _flat(config_json(config)), config)
    return text + "; in the run: " + ", ".join(repr(stored.get(k)) for k in diff)


def _different_config(workdir: str, config, diff: list[str]) -> UserError:
    """The error for a workdir of another run; diff: the fields that differ, num_seeds
    aside (it may change)."""
    with open(os.path.join(workdir, "config.json")) as f:
        stored = json.load(f)
    if config.method == "ahl" and stored.get("method") == config.ahl.base:
        # the base method's run, given as --workdir where ahl.base_workdir was meant
        return UserError(f"{workdir!r} holds a {stored['method']} run, not an AHL one; to "
                         f"meta-train on its trained base models, pass it as "
                         f"--config.ahl.base_workdir={workdir} with a new --workdir")
    if config.method == "ahl" and ahl_fields_only(diff) and meta_training_started(workdir):
        return UserError(f"{workdir!r} holds an AHL run whose meta-training has started, and "
                         f"AHL's fields may change only before that "
                         f"({fields_with_run_values(workdir, config, diff)}); to meta-train "
                         f"with the new ones on its trained base models, use a new --workdir "
                         f"with --config.ahl.base_workdir={workdir}")
    if diff == ["seed"]:  # another first seed: the run's seeds are seed.. seed+n-1
        first, last = stored.get("seed", 0), config.seed + config.num_seeds - 1
        more = (f"keep --config.seed={first} and raise --config.num_seeds (to "
                f"{last - first + 1}: seeds {first} to {last}), or " if last > first else "")
        return UserError(f"{workdir!r} holds a run whose seeds start at {first}, and "
                         f"--config.seed={config.seed} starts another run; to add seeds to it, "
                         f"{more}use a new --workdir for a run of these")
    return UserError(f"{workdir!r} holds a run with a different config "
                     f"({fields_with_run_values(workdir, config, diff)}); give it those "
                     f"values to resume or extend that run (--config configs/run.py:"
                     f"{workdir} gives them all), or use a new --workdir for these "
                     f"(deleting this one discards what it trained)")


def seed_has_work(seed_dir: str) -> bool:
    """Whether a seed's folder holds what a run saved: its metrics or a checkpoint."""
    return seed_finished(seed_dir) or bool(checkpoint_steps(seed_dir))


def stored_seeds(workdir: str) -> list[int]:
    """The seeds of the run in workdir: those of its config.json (its seed and the
    num_seeds - 1 after it, the first first), then any other seed folder with a checkpoint
    or its metrics (a run rerun with fewer seeds keeps the others'); [] where no config is
    stored."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        stored = json.load(f)
    seeds = [stored.get("seed", 0) + i for i in range(stored.get("num_seeds", 1))]
    for d in seed_folders(workdir):
        if d[5:].isdigit() and int(d[5:]) not in seeds and seed_has_work(
                os.path.join(workdir, d)):
            seeds.append(int(d[5:]))
    return seeds


def check_stored_config(workdir: str, config, must_exist: bool = False) -> bool:
    """Compares config with workdir/config.json, before the run there scores images
    (--mode score) with the model of seed config.seed; True when one is stored.

    Raises:
      UserError: the stored config differs (`stored_config_diff`'s fields, SCORING_UNREAD
        and explain.* fields aside: these shape the heat maps, the decision cut-off and
        the test masks, not the trained model or its scores; and seed and num_seeds, where
        config.seed is one of the run's seeds): the error asks for the config the run
        was trained with, not for another workdir; or config.seed is not one of the
        run's seeds; or none is stored and must_exist.
    """
    diff = stored_config_diff(workdir, config)
    if diff is None:
        if must_exist:
            raise UserError(f"{workdir!r} holds no trained run (no config.json); train it "
                            f"first with --mode train, or point --workdir at a trained run")
        return False
    seeds = stored_seeds(workdir)
    other = [k for k in diff if not k.startswith("explain.")
             and k not in ("seed",) + SEED_COUNT + SCORING_UNREAD]
    if "seed" in diff and config.seed not in seeds:
        several = len(seeds) > 1
        also = (f" (and the config differs in "
                f"{fields_with_run_values(workdir, config, other)})" if other else "")
        raise UserError(f"{workdir!r} holds a run of seed{'s' if several else ''} "
                        f"{', '.join(map(str, seeds))}, and --config.seed={config.seed} is "
                        f"{'not one of them' if several else 'another'}{also}; pass "
                        f"--config.seed={seeds[0]}{' (or another of them)' if several else ''}"
                        f" to score with that seed's model")
    diff = other
    if diff:
        raise UserError(f"{workdir!r} holds a run trained with a different config "
                        f"({fields_with_run_values(workdir, config, diff)}); score with the "
                        f"config it was trained with: --config configs/run.py:{workdir} "
                        f"reads it from the run, or give the same --config FILE:VARIANTS "
                        f"and --config.* flags")
    return True


def ahl_fields_only(diff: list[str]) -> bool:
    """Whether every field of `diff` is one of AHL's own (its meta-training's), which the
    trained base models do not depend on: ahl.* less ahl.base."""
    return bool(diff) and all(k.startswith("ahl.") and k != "ahl.base" for k in diff)


def meta_training_started(workdir: str) -> bool:
    """Whether a seed of the run in workdir has started AHL's meta-training
    (`seed_meta_training_started`)."""
    return any(seed_meta_training_started(os.path.join(workdir, d))
               for d in seed_folders(workdir))


def seed_meta_training_started(seed_dir: str) -> bool:
    """Whether a seed has an AHL meta-training checkpoint or has finished (AHL
    included): its base training is over."""
    return seed_finished(seed_dir) or "ahl_checkpoints" in checkpoint_steps(seed_dir)


def beyond_seed_count(diff: list[str] | None) -> list[str]:
    """The fields of a config difference other than SEED_COUNT's."""
    return sorted(set(diff or []) - set(SEED_COUNT))


def check_workdir_config(workdir: str, config) -> tuple[list[str] | None, bool]:
    """A workdir holds one config: a run made with another is refused, unless that run
    saved nothing (it stopped before its first checkpoint: a download that failed, out of
    memory), whose config this one replaces, or the two differ only in `num_seeds`
    (SEED_COUNT), or only in AHL's own fields before any seed's meta-training started (a
    fix an AHL error asked for, as ahl.cluster_on: the trained base models serve it).
    Reads only. -> (the fields that differ, None when no config is stored; whether the
    run there saved something).

    Raises:
      UserError: the workdir holds a run of another config that saved something.
    """
    diff = stored_config_diff(workdir, config)
    saved = bool(diff) and bool(saved_in(workdir))
    beyond_seeds = beyond_seed_count(diff)
    if saved and beyond_seeds and not (
            ahl_fields_only(beyond_seeds) and not meta_training_started(workdir)):
        raise _different_config(workdir, config, beyond_seeds)
    return diff, saved


def check_not_a_file(workdir: str) -> None:
    """Raises a UserError where --workdir names a file."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise UserError(f"--workdir {workdir!r} is a file; pass a folder (a new one for a new "
                        f"run)")


def stored_config_change(workdir: str, config) -> tuple[str, list[str] | None, str]:
    """What a run of config does with the config stored in workdir (`check_workdir_config`,
    which reads only): (kind, the fields that differ or None, a sentence for the user or
    ""). kind: "new" (none stored), "same", "replaces" (the stored run saved nothing),
    "seed count" (only num_seeds differs), "fewer seeds" (so, and seeds that hold work
    are left out) or "ahl fields" (AHL's own fields, before any seed's meta-training).

    Raises:
      UserError: as `check_workdir_config`.
    """
    diff, saved = check_workdir_config(workdir, config)
    if diff is None:
        return "new", None, ""
    if not diff:
        return "same", diff, ""
    if not saved:
        return "replaces", diff, (f"held the config of a run that saved nothing (no "
                                  f"checkpoint, no finished seed); this run's config "
                                  f"replaces it (it differed in {', '.join(diff)})")
    changed = beyond_seed_count(diff)
    if changed:  # check_workdir_config let only AHL's own fields through
        features = any(os.path.exists(os.path.join(workdir, d, "ahl_features.npz"))
                       for d in seed_folders(workdir))
        return "ahl fields", diff, (f"AHL's fields changed ({', '.join(changed)}) before any "
                                    f"seed's meta-training; the base models' checkpoints "
                                    f"are kept"
                                    + (", their AHL features made again" if features else ""))
    said = (f"the run goes on with num_seeds={config.num_seeds}; finished seeds are kept, "
            f"the others trained")
    seeds = range(config.seed, config.seed + config.num_seeds)
    left = [s for s in stored_seeds(workdir)
            if s not in seeds and seed_has_work(seed_dir_of(workdir, s))]
    if not left:
        return "seed count", diff, said
    return "fewer seeds", diff, (
        f"{said}; seed{'s' if len(left) > 1 else ''} {', '.join(map(str, left))} "
        f"keep{'' if len(left) > 1 else 's'} {'their' if len(left) > 1 else 'its'} work but "
        f"stay{'' if len(left) > 1 else 's'} out of results.json (raise --config.num_seeds "
        f"to take {'them' if len(left) > 1 else 'it'} in)")


def workdir_change_lines(workdir: str, config) -> list[str]:
    """`stored_config_change`'s sentence for ``--check`` (`check_workdir` logs it), where
    the run would replace the stored config, change AHL's fields, or leave out seeds
    that hold work (another seed count is otherwise said by the seed lines). Reads only.

    Raises:
      UserError: as `check_workdir_config`, or workdir names a file.
    """
    check_not_a_file(workdir)
    if not os.path.isdir(workdir):
        return []
    kind, _, said = stored_config_change(workdir, config)
    return [f"workdir: {said}"] if kind in ("replaces", "ahl fields", "fewer seeds") else []


def check_workdir(workdir: str, config) -> None:
    """`check_workdir_config`, then the config stored where none is or where it replaces
    another; the workdir must be writable (checked now, not at the first checkpoint)."""
    # (fsad.hosts imports JAX: here, so that the layout's readers import none)
    from fsad.hosts import is_primary, same_on_every_host, wait_for_every_host
    check_not_a_file(workdir)
    try:
        os.makedirs(workdir, exist_ok=True)
        kind, _, said = stored_config_change(workdir, config)
        if kind == "ahl fields":
            logging.warning("%s: %s", workdir, said)
        elif kind == "seed count":
            logging.info("%s: %s", workdir, said)
        elif kind == "fewer seeds":
            logging.warning("%s: %s", workdir, said)
        elif kind == "replaces":
            logging.warning("%s %s", workdir, said)
        # every host takes the first host's branch, so that their waits match
        if same_on_every_host(kind in ("ahl fields", "replaces")):
            # AHL's features hang on the ahl.* fields (its pseudo anomalies) and on the
            # base model, which a replaced config trains again: a run killed before its
            # first checkpoint (keep_checkpoints=0 keeps none) left features that the new
            # config's AHL stage read as its own
            if is_primary():
                for seed in seed_folders(workdir):
                    cache = os.path.join(workdir, seed, "ahl_features.npz")
                    if os.path.exists(cache):
                        os.remove(cache)
            wait_for_every_host("ahl_feature_caches")  # none reads a stale one after
        if kind != "same":  # none stored yet, or replaced (unsaved, seed count, AHL's)
            write_json_atomic(os.path.join(workdir, "config.json"), config_json(config))
    except OSError as err:
        raise UserError(f"cannot write to --workdir {workdir!r} ({err.strerror or err}); "
                        f"choose a writable folder with free space") from err


# fields of an AHL config that do not change its base model's trained weights (a group,
# or one dotted field): AHL's own, the seeds (each seed is checked apart), and
# evaluation and bookkeeping
NOT_BASE_TRAINING = ("method", "ahl", "seed", "num_seeds", "explain", "eval_batch_size",
                     "keep_checkpoints", "checkpoint_seconds", "data.mask_resize",
                     *CACHE_PLACE)


def base_fields_that_differ(config, base: dict) -> list[str]:
    """The fields (dotted, e.g. "data.n_anomaly") that shape the trained base model in
    which an AHL config and a base run's config (a config.json dict) differ: none when
    that run trained the same base model (a field the base run's config lacks counts as
    its default, as in `stored_config_diff`)."""
    mine = _flat(config_json(config))
    theirs = _with_defaults(_flat(base), mine, config)
    return sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k)
                  and k not in NOT_BASE_TRAINING and k.split(".")[0] not in NOT_BASE_TRAINING)


def base_run_checkpoints(config, seed: int) -> str | None:
    """AHL with ahl.base_workdir: the checkpoint folder of that run's seed, after checking
    that the run trained this config's base model and finished that seed; else None."""
    if config.method != "ahl" or not config.ahl.get("base_workdir"):
        return None
    from fsad.methods import method_title
    root = config.ahl.base_workdir
    path = os.path.join(root, "config.json")
    if not os.path.exists(path):
        if os.path.isdir(root) and os.listdir(root):  # a folder, but no run's
            raise UserError(f"ahl.base_workdir={root!r} is not a run's workdir (it has no "
                            f"config.json); point it at the --workdir of a finished "
                            f"{config.ahl.base} run, or leave ahl.base_workdir empty to "
                            f"train the base here")
        raise UserError(f"ahl.base_workdir={root!r} holds no run (no config.json); train "
                        f"the base first (--config configs/{config.ahl.base}.py --workdir "
                        f"{root}), or leave ahl.base_workdir empty to train it here")
    with open(path) as f:
        base = json.load(f)
    differ = base_fields_that_differ(config, base)
    # an AHL run on the same base method serves too: its seeds' checkpoints folders hold
    # their trained base models
    of_ahl = base.get("method") == "ahl" and base.get("ahl", {}).get("base") == config.ahl.base
    held = method_title(SimpleNamespace(  # as the papers write it: DevNet, AHL(DRA)
        method=base.get("method", "unknown"),
        ahl=SimpleNamespace(base=base.get("ahl", {}).get("base", "?"))))
    if base.get("method") != config.ahl.base and not of_ahl:
        raise UserError(f"ahl.base_workdir={root!r} holds {_a(held)} {held} run, and this "
                        f"{method_title(config)} run needs a {config.ahl.base} run "
                        f"(--config configs/{config.ahl.base}.py) or an "
                        f"{method_title(config)} run with the same settings; or leave "
                        f"ahl.base_workdir empty")
    if differ:
        raise UserError(f"ahl.base_workdir={root!r} holds {_a(held)} {held} run whose base "
                        f"differs from this {method_title(config)} run's in "
                        f"{', '.join(differ)}; use a base run with the same settings, or "
                        f"leave ahl.base_workdir empty")
    seed_dir = seed_dir_of(root, seed)
    checkpoints = os.path.join(seed_dir, "checkpoints")
    total, steps = config.epochs * config.steps_per_epoch, saved_steps(checkpoints)
    if not of_ahl:
        trained = seed_finished(seed_dir)
    elif steps:  # an AHL run's seed: its base checkpoint at the last step
        trained = max(steps) >= total
    else:  # none kept: trained where meta-training started (the error below names it)
        trained = seed_meta_training_started(seed_dir)
    if not trained:
        covered = seed in stored_seeds(root)
        raise UserError(f"ahl.base_workdir={root!r} has not finished "
                        f"{'the base training of ' if of_ahl else ''}seed {seed}; rerun that "
                        f"run's own command (it resumes)"
                        f"{'' if covered else f', with --config.num_seeds covering seed {seed}'}"
                        f", or leave ahl.base_workdir empty")
    if not saved_steps(checkpoints):
        raise UserError(f"ahl.base_workdir={root!r} kept no checkpoint of seed {seed} (its "
                        f"checkpoints folder is empty or gone); rerun the base with "
                        f"keep_checkpoints of 1 or more, or leave ahl.base_workdir empty")
    return checkpoints


def _a(word: str) -> str:
    """The indefinite article of a method's name ("an AHL(dra)", "a dra")."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def base_source(config, workdir: str, seed: int,
                agree: Callable[[bool], bool] = lambda holds: holds) -> str | None:
    """`base_run_checkpoints` for a seed that still needs its base model from another
    run: None for a finished seed (read back) and for one that holds a checkpoint of its
    own (its adopted start, or its own training), whose base run may be gone.

    agree: makes that finding every host's (`fsad.hosts.same_on_every_host`) where the
      answer decides a step all hosts take together (the adoption, which waits for every
      host): the first host may have adopted the start already when another looks.
    """
    if agree(has_own_start(seed_dir_of(workdir, seed))):
        return None
    return base_run_checkpoints(config, seed)


def has_own_start(seed_dir: str) -> bool:
    """Whether a seed goes on from what its own folder holds: finished (read back), or a
    checkpoint of its base training (its own, or the start it adopted from a base run).
    A seed without either starts afresh: from another run's base, or from the trunk."""
    return seed_finished(seed_dir) or "checkpoints" in checkpoint_steps(seed_dir)


def write_json_atomic(path: str, obj) -> None:
    """Writes JSON through a temporary file and a rename: a crash leaves the old file or
    the new one, never half of one. In a multi-host run the primary process writes it
    (the others hold the same object, `fsad.hosts`)."""
    from fsad.hosts import is_primary
    if not is_primary():
        return
    with whole_or_nothing(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
