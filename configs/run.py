"""A trained run's own config, read from its workdir's config.json.

    python -m fsad.main --config configs/run.py:runs/x --workdir runs/x --mode score \\
        --input DIR

scores (or resumes, or extends with more seeds) the run in runs/x with the config it was
made with, whatever config file, variants and flags made it: they need not be given
again. ``--config.*`` flags still apply on top (``--config.seed=1`` scores with seed 1's
model; ``--config.num_seeds=3`` adds seeds).
"""

from fsad.workdir import run_config


def get_config(workdir: str = ""):
    return run_config(workdir)
