"""Command line: ``python -m fsad.main --config configs/devnet.py --workdir runs/x``.

Any config field can be overridden: ``--config.data.n_anomaly=1``,
``--config.data.setting=hard --config.data.known_class=mono``, ``--config.seed=2``.
A rerun with the same workdir resumes from the last checkpoint.
"""

from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

from fsad.experiment import print_summary, run_experiment

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/devnet.py "
                                          "or configs/devnet.py:quick.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints and results.json.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    results = run_experiment(_CONFIG.value, _WORKDIR.value)
    print_summary(results)
    print(f"results: {_WORKDIR.value}/results.json")


def run():
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)


if __name__ == "__main__":
    run()
