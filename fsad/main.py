"""Command line.

Train and evaluate (resumes from the last checkpoint of the same workdir)::

    python -m fsad.main --config configs/devnet.py --workdir runs/x

Score a folder of new images with a trained run (CSV of file, score, z,
p-value, decision; ``--heatmaps`` adds saliency overlays)::

    python -m fsad.main --config configs/devnet.py --workdir runs/x --mode score --input DIR

Any config field can be overridden: ``--config.data.n_anomaly=1``,
``--config.data.setting=hard --config.data.known_class=mono``, ``--config.seed=2``.
"""

from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

from fsad.experiment import check_stored_config, print_summary, run_experiment

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/devnet.py "
                                          "or configs/devnet.py:quick.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints and results.json.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "score"],
                          "train: train and evaluate; score: score --input with the trained run.")
_INPUT = flags.DEFINE_string("input", None, "score mode: folder of images (searched recursively).")
_OUTPUT = flags.DEFINE_string("output", None, "score mode: CSV path (default WORKDIR/scores.csv).")
_HEATMAPS = flags.DEFINE_bool("heatmaps", False, "score mode: also write saliency overlays to "
                              "WORKDIR/heatmaps/.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    config, workdir = _CONFIG.value, _WORKDIR.value
    if _MODE.value == "score":
        if not _INPUT.value:
            raise app.UsageError("--mode score needs --input DIR")
        from fsad.scoring import score_folder
        if config.method == "ahl":
            raise app.UsageError("--mode score does not support AHL runs yet: it scores with "
                                 "the base network; use the base method's config and workdir")
        check_stored_config(workdir, config, must_exist=True)
        path = score_folder(config, workdir, _INPUT.value, _OUTPUT.value, _HEATMAPS.value)
        print(f"scores: {path}")
        return
    results = run_experiment(config, workdir)
    print_summary(results)
    print(f"results: {workdir}/results.json")


def run():
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)


if __name__ == "__main__":
    run()
