"""Scoring new images with a trained run: calibrated scores, CSV, heat maps.

    python -m fsad.main --config configs/devnet.py --workdir RUN --mode score --input DIR

DevNet's scores are calibrated against the N(mu, sigma) prior (Proposition 1):
z = (score - mu) / sigma, p = 1 - Phi(z), and an image is flagged anomalous at
confidence c when z > Phi^-1((1 + c) / 2), the paper's cut-off (1.96 for 95%).
DRA's scores are not (`prior_calibrated`): their CSV rows leave z, p_value and
anomalous empty.
"""

from __future__ import annotations

import csv
import logging
import os
import shutil

import jax
import numpy as np
from scipy import stats

from fsad import interrupts
from fsad.atomic import whole_or_nothing
from fsad.checkpoints import checkpoint_manager, restore_latest
from fsad.data.decode import IMAGE_SUFFIXES, decode_many, images_and_others
from fsad.errors import UserError
from fsad.hosts import is_primary, progress
from fsad.memory import eval_fix, hint_on_oom
from fsad.mesh import make_mesh, replicated
from fsad.methods import base_method_name, build_method, method_title
from fsad.train import make_score_fn, score_images
from fsad.workdir import saved_steps, seed_dir_of, stored_seeds


def calibrate(scores: np.ndarray, mu: float = 0.0, sigma: float = 1.0,
              confidence: float = 0.95) -> dict[str, np.ndarray]:
    """z-scores, p-values and decisions for [N] anomaly scores (Proposition 1)."""
    if not 0.0 < confidence < 1.0:
        raise UserError(f"explain.confidence={confidence} is not a confidence; use a value in "
                        f"(0, 1), e.g. 0.95")
    z = (np.asarray(scores, np.float64) - mu) / sigma
    cut = stats.norm.ppf((1.0 + confidence) / 2.0)
    return {"z": z, "p_value": stats.norm.sf(z), "anomalous": z > cut, "cutoff": cut}


def prior_calibrated(config) -> bool:
    """Whether a run's image score is one deviation-trained score, which Proposition 1
    reads against the N(mu, sigma) prior: DevNet's and AHL(DevNet)'s. DRA's score adds
    three heads' scores and subtracts the normality head's (spec §6), which its training
    pushes to the margin (5) on normal images: no prior describes that sum, and the
    DRA paper claims no calibration."""
    return base_method_name(config) == "devnet"


def calibrate_run(config, scores: np.ndarray) -> dict[str, np.ndarray] | None:
    """`calibrate` with the run's prior and explain.confidence, or None where the run's
    scores have no calibration (`prior_calibrated`)."""
    if not prior_calibrated(config):
        return None
    return calibrate(scores, config.loss.prior_mu, config.loss.prior_sigma,
                     config.explain.confidence)


def load_trained(config, workdir: str, mesh=None):
    """(method, variables, mesh) of the trained seed `config.seed` in workdir.

    The variables are read in the structure the checkpoint was saved with, replicated on
    the mesh: no model is built to restore into, so nothing depends on the training
    data's size (DRA's per-batch reference pool is all its training normals).
    """
    from fsad.workdir import base_run_checkpoints
    mesh = mesh or make_mesh()
    method = build_method(config)
    # the seed's own checkpoints; AHL on another run's base (ahl.base_workdir) keeps its
    # start there too (adopted), but a run trained before that reads the base run's
    ckpt = os.path.join(seed_dir_of(workdir, config.seed), "checkpoints")
    if not saved_steps(ckpt):
        ckpt = base_run_checkpoints(config, config.seed) or ckpt
    if not saved_steps(ckpt):  # missing, empty, or a first save cut short
        older = (" (an AHL run trained on another run's base before fsad kept a copy of "
                 "it reads it there: pass that run as --config.ahl.base_workdir)"
                 if config.method == "ahl" else "")
        raise UserError(f"no checkpoints in {ckpt!r}; train this workdir first "
                        f"(--mode train), or point --workdir at a trained run{older}")
    mngr = checkpoint_manager(ckpt)
    saved = restore_latest(mngr, sharding=replicated(mesh))
    mngr.close()
    if saved is None:
        raise UserError(f"no checkpoint in {ckpt!r} could be read; train this workdir "
                        f"again (--mode train), or point --workdir at a trained run")
    step, total = int(saved["step"]), config.epochs * config.steps_per_epoch
    if step < total:  # a run still training, stopped, or diverged: say so, score anyway
        logging.warning("scoring with the checkpoint of step %d of %d in %s: that run has "
                        "not finished training", step, total, ckpt)
    return method, {k: saved.get(k) or {} for k in ("params", "batch_stats", "extras")}, mesh


def images_to_score(path: str) -> tuple[list[str], str]:
    """(the image files to score relative to a folder, that folder): every image under a
    folder (searched recursively), or one image file.

    Raises:
      UserError: the path does not exist, is a file that is not an image, or a folder
        without images.
    """
    if not os.path.exists(path):
        what = f"is a link to {os.readlink(path)!r}, which does not exist" \
            if os.path.islink(path) else "does not exist"
        raise UserError(f"--input {path!r} {what}; pass an image or a folder of images")
    if not os.path.isdir(path):
        if not path.lower().endswith(IMAGE_SUFFIXES) or not os.path.isfile(path):
            raise UserError(f"--input {path!r} is not an image file fsad reads "
                            f"({', '.join(IMAGE_SUFFIXES)}); pass one (another format "
                            f"converted, e.g. to .png) or a folder of images")
        return [os.path.basename(path)], os.path.dirname(path) or "."
    files, skipped = images_and_others(path, require_images=False)
    named = ", ".join(skipped[:3]) + (", ..." if len(skipped) > 3 else "")
    if not files:
        held = (f"; it holds only files fsad does not read as images ({named}): convert "
                f"them, e.g. to .png") if skipped else "; point it at a folder that holds images"
        raise UserError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under --input {path!r}{held}")
    if skipped:
        logging.warning("%d file(s) under --input are not images fsad reads and are not "
                        "scored (%s); it reads %s", len(skipped), named,
                        ", ".join(IMAGE_SUFFIXES))
    return files, path


def is_stream(path: str) -> bool:
    """Whether --output names a stream, written to as it is (appended to), rather than a
    file to replace: a device, a pipe, or one of the process's own descriptors
    (/dev/stdout, /dev/fd/N, /proc/self/fd/N: a shell's `>> all.csv` behind them is
    appended to, not replaced). A file in /dev/shm is a file."""
    if path in ("/dev/stdout", "/dev/stderr") or path.startswith(("/dev/fd/", "/proc/")) \
            or os.path.realpath(path).startswith("/proc/"):
        return True
    return os.path.exists(path) and not os.path.isfile(path)


def writable_output(path: str) -> str:
    """path, once a file could be written there (checked before any image is scored;
    a folder it needs is made only when the CSV is written, not for a scoring that fails).

    Raises:
      UserError: path is a folder, or a file cannot be created there.
    """
    if os.path.isdir(path):
        raise UserError(f"--output {path!r} is a folder; pass a file path, e.g. "
                        f"{os.path.join(path, 'scores.csv')}")
    real = os.path.realpath(path)
    folder = os.path.dirname(real)
    existing = folder  # the folders to make are made by `write_csv`, at the end
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    try:
        if is_stream(path):  # not opened here: a pipe's reader would take that as its end
            if not os.access(path, os.W_OK):
                raise PermissionError(13, "Permission denied")
        elif not os.path.isdir(existing):
            raise NotADirectoryError(20, f"{existing!r} is a file")
        elif existing != folder:
            if not os.access(existing, os.W_OK | os.X_OK):
                raise PermissionError(13, f"{existing!r} cannot be written")
        else:  # a file beside it (`write_csv` writes one, then renames it)
            probe = f"{real}.tmp{os.getpid()}"
            with open(probe, "w"):
                pass
            os.remove(probe)
    except OSError as err:
        raise UserError(f"cannot write the scores to {path!r} ({err.strerror or err}); pass "
                        f"a writable --output path") from None
    return path


def seed_suffix(workdir: str, seed: int) -> str:
    """"" for the first seed of the run in workdir, "_seed<s>" for its others: what the
    default names of a scoring's outputs add, so that scoring another seed keeps the
    first's."""
    seeds = stored_seeds(workdir)
    return "" if not seeds or seed == seeds[0] else f"_seed{seed}"


def heatmap_dir(workdir: str, seed: int) -> str:
    """Where --mode score --heatmaps writes its overlays with the model of `seed`:
    WORKDIR/heatmaps, or WORKDIR/heatmaps_seed<s> for a run's seed after its first."""
    return os.path.join(workdir, "heatmaps" + seed_suffix(workdir, seed))


def default_scores_path(workdir: str, seed: int) -> str:
    """Where --mode score writes its CSV without --output: WORKDIR/scores.csv, or
    WORKDIR/scores_seed<s>.csv for a run's seed after its first."""
    return os.path.join(workdir, f"scores{seed_suffix(workdir, seed)}.csv")


def score_folder(config, workdir: str, input_dir: str, output: str | None = None,
                 heatmaps: bool = False) -> str:
    """Scores every image under input_dir (or the one image it names); writes a CSV (and
    heat maps); returns its path.

    CSV columns: file (relative to input_dir), score, z, p_value, anomalous; the last
    three empty for a run whose scores have no calibration (DRA's: `prior_calibrated`);
    with heatmaps, heatmap: the image's overlay (`heatmap_path`), relative to the CSV's
    folder (absolute where output is a stream, which has no folder). The CSV is written
    last, whole or not at all (`write_csv`): a scoring stopped or failed before its end
    leaves none, and a CSV there before as it was.
    An AHL run scores with its unified heads (as its evaluation does); its heat maps,
    like its evaluation's, are the base network's saliency.
    """
    files, input_dir = images_to_score(input_dir)
    output = writable_output(output or default_scores_path(workdir, config.seed))
    # the run first: one without a checkpoint is said before a folder is decoded
    method, variables, mesh = load_trained(config, workdir)
    images = decode_many([os.path.join(input_dir, f) for f in files], config.data.img_size,
                         desc="decoding")
    variables = method.prepare_eval(variables)
    with hint_on_oom("scoring", eval_fix(config)):
        if config.method == "ahl":  # the unified heads on the base trunk's features
            from fsad.methods.ahl import score_unified
            scores = score_unified(config, method, variables, images, mesh,
                                   seed_dir_of(workdir, config.seed), config.seed)
        else:
            key = jax.random.key(config.seed + 10_000) if method.random_scores else None
            scores = score_images(make_score_fn(method, mesh), variables, images, mesh,
                                  config.eval_batch_size, key=key)["score"]
    cal = calibrate_run(config, scores)
    if cal is None:
        logging.warning("%s's scores have no calibrated p-value (only DevNet's and "
                        "AHL(DevNet)'s follow their N(0, 1) prior): the CSV leaves z, "
                        "p_value and anomalous empty; rank the images by score",
                        method_title(config))
    overlays = [heatmap_path(workdir, config.seed, name) for name in files] if heatmaps \
        else None
    if heatmaps:  # before the CSV, which names them
        from fsad.explain import explain_images, overlay_png
        with hint_on_oom("the saliency maps", eval_fix(config)):
            maps = explain_images(method, variables, images, config, mesh=mesh)
        if is_primary():
            for path, image, heat in progress(list(zip(overlays, images, maps)),
                                              desc="writing heat maps", leave=False,
                                              disable=len(files) < 64):
                overlay_png(path, image, heat)
    interrupts.check()  # a Ctrl-C dropped on its way: no CSV
    if is_primary():  # the other hosts of a multi-host run computed the same
        # (a stream's folder, /dev for /dev/stdout, is not where its text ends up)
        here = None if is_stream(output) else os.path.dirname(os.path.abspath(output))
        rows = [["file", "score", "z", "p_value", "anomalous"]
                + (["heatmap"] if heatmaps else [])]
        for i, name in enumerate(files):
            decision = ["", "", ""] if cal is None else [
                f"{cal['z'][i]:.6g}", f"{cal['p_value'][i]:.6g}", int(cal["anomalous"][i])]
            rows.append([name, f"{scores[i]:.6g}", *decision] + (
                [os.path.abspath(overlays[i]) if here is None
                 else os.path.relpath(os.path.abspath(overlays[i]), here)] if heatmaps else []))
        write_csv(output, rows)
    return output


def write_csv(path: str, rows: list[list]) -> None:
    """Writes rows as a CSV whole or not at all: into a file beside `path`, renamed over
    it once complete (a CSV there before stays as it was if the writing fails; the new
    one keeps its permissions). A link is written through. File names that are not
    UTF-8 (bytes a file system allows) are written as their bytes. A stream
    (`is_stream`: /dev/stdout, a named pipe) is appended to as it is.

    Raises:
      UserError: the file cannot be written (a full disk, a folder made read-only since
        the start).
    """
    stream = is_stream(path)
    real = path if stream else os.path.realpath(path)

    def write(to: str, mode: str) -> None:
        with open(to, mode, newline="", encoding="utf-8", errors="surrogateescape") as f:
            csv.writer(f).writerows(rows)

    try:
        os.makedirs(os.path.dirname(real), exist_ok=True)
        if stream:
            write(real, "a")
        else:
            with whole_or_nothing(real) as tmp:
                write(tmp, "w")
                if os.path.exists(real):
                    shutil.copymode(real, tmp)
    except OSError as err:
        kept = "" if stream else "nothing was written there: "
        raise UserError(f"cannot write the scores to {path!r} ({err.strerror or err}); "
                        f"{kept}free space or pass another --output, and score again") from None


def heatmap_path(workdir: str, seed: int, name: str) -> str:
    """The overlay of the image `name` (relative to --input): its path under the heat-map
    folder, with ".png" added to the whole name (x.png and x.jpg, sub/y.png and
    sub__y.png each get their own: one overlay took another's place)."""
    return os.path.join(heatmap_dir(workdir, seed), name + ".png")
