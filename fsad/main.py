"""Command line.

Train and evaluate (resumes from the last checkpoint of the same workdir)::

    python -m fsad.main --config configs/devnet.py --workdir runs/x

Check a run before it starts (the config, the dataset, every seed's protocol, the workdir;
nothing written or trained)::

    python -m fsad.main --config configs/devnet.py --workdir runs/x --check

Score a folder of new images (or one image) with a trained run (CSV of file, score, z,
p-value, decision; ``--heatmaps`` adds saliency overlays)::

    python -m fsad.main --config configs/devnet.py --workdir runs/x --mode score --input DIR

Any config field can be overridden: ``--config.data.n_anomaly=1``,
``--config.data.setting=hard --config.data.known_class=mono``, ``--config.seed=2``.

On several hosts (one process each, the same command and shared files; `fsad.hosts`)::

    python -m fsad.main --config ... --workdir runs/x --distributed      # TPU pod, SLURM
    python -m fsad.main --config ... --workdir runs/x --coordinator_address HOST0:1234 \\
        --num_processes 2 --process_id I
"""

from __future__ import annotations

import importlib
import logging as std_logging
import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from fsad import interrupts
from fsad.errors import UserError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/devnet.py "
                                          "or configs/devnet.py:quick.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints and results.json.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "score"],
                          "train: train and evaluate; score: score --input with the trained run.")
_INPUT = flags.DEFINE_string("input", None, "score mode: a folder of images (searched "
                             "recursively) or one image.")
_OUTPUT = flags.DEFINE_string("output", None, "score mode: CSV path (default "
                              "WORKDIR/scores.csv; scores_seed<s>.csv for a run's later "
                              "seeds, scored with --config.seed=<s>).")
_HEATMAPS = flags.DEFINE_bool("heatmaps", False, "score mode: also write saliency overlays to "
                              "WORKDIR/heatmaps/ (heatmaps_seed<s>/ for a run's later "
                              "seeds).")
_CHECK = flags.DEFINE_bool("check", False, "train mode: check the config, the dataset, "
                           "every seed's protocol and the workdir as a run does before its "
                           "first step, say what each seed would train on, and stop: nothing "
                           "is written, fetched, decoded or trained.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Join a multi-host run: one process per host, each running the "
    "same command on shared files. jax.distributed.initialize() finds the other hosts on a "
    "TPU pod, under SLURM or Open MPI; elsewhere pass --coordinator_address, "
    "--num_processes and --process_id.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "multi-host: process 0's "
                                   "host:port, reachable from every host (implies "
                                   "--distributed).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "multi-host: the number of "
                                      "processes (hosts) of the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "multi-host: this process's index, "
                                   "0 (the coordinator) to num_processes - 1.")

# the flags every command needs: how to give each
REQUIRED_FLAGS = {
    "config": "pass a config file, e.g. --config configs/devnet.py (variants after a colon: "
              "configs/devnet.py:quick)",
    "workdir": "pass the run's folder (checkpoints, results.json; the same one again "
               "resumes), e.g. --workdir runs/devnet"}
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT: what a shell reports for a command stopped by Ctrl-C
EXIT_HOST_LOST = 3  # another process of a multi-host run stopped


def error_line(message: str) -> str:
    """``fsad: error: <what is wrong>; <how to fix it>`` on one line."""
    return "fsad: error: " + " ".join(str(message).split())


def interrupted_line(workdir: str, mode: str) -> str:
    """The one line for a run stopped by Ctrl-C: what was kept, and how to go on."""
    if mode == "score":
        return "fsad: interrupted; nothing of the scoring is kept: run the command again"
    kept, go_on = kept_checkpoints(workdir)
    return f"fsad: interrupted ({kept}); run the same command to {go_on}"


def kept_checkpoints(workdir: str) -> tuple[str, str]:
    """What a stopped run left to resume from, in words, and what the same command does
    next: "resume from there", or "start it again" where the run saved nothing."""
    from fsad.workdir import newest_checkpoints, saved_in, seed_finished, seed_folders
    finished = [d for d in seed_folders(workdir) if seed_finished(os.path.join(workdir, d))]
    # a finished seed's checkpoints are said as the seed's end: it is read back, not resumed
    kept = [c for c in newest_checkpoints(workdir) if c.split("/")[0] not in finished]
    # saved_in lists the checkpoints too: read the folders again only when there are none
    go_on = "resume from there" if kept or saved_in(workdir) else "start it again"
    done = f"{', '.join(finished)} finished; " if finished else ""
    return done + (f"checkpoints kept in {workdir}: {', '.join(kept)}" if kept else
                   f"no checkpoint was written yet in {workdir}" if not finished else
                   f"no other checkpoint in {workdir}"), go_on


def host_lost_line(workdir: str, mode: str, err: Exception) -> str:
    """The one line for a multi-host run that lost one of its processes."""
    lost = f"another host of this multi-host run stopped ({' '.join(str(err).split())[:200]})"
    if mode == "score":
        return error_line(f"{lost}; run the same command again on every host")
    kept, go_on = kept_checkpoints(workdir)
    return error_line(f"{lost}; {kept}; run the same command on every host to {go_on}")


def execute(config, workdir: str, mode: str = "train", input_dir: str | None = None,
            output: str | None = None, heatmaps: bool = False, check: bool = False) -> int:
    """Runs one command; returns the exit status. A UserError (bad input, bad config)
    prints one line to stderr and returns 2; Ctrl-C (KeyboardInterrupt) prints one line
    naming the checkpoints kept and returns 130, as does (with 3) the loss of another
    process of a multi-host run; any other exception keeps its traceback."""
    from fsad.experiment import check_run, print_summary, run_experiment
    from fsad.workdir import check_stored_config
    from fsad.hosts import check_same_folder, is_primary, lost_host, same_command_on_every_host
    from fsad.paper_figures import config_protocol_note
    from fsad.validate import check_method, check_scoring_config, config_warnings
    try:
        # one program over every host's devices: a host given another config would train
        # another model into the same files, silently
        # (the score-mode flags' presence, not their paths: mounts may differ by host)
        same_command_on_every_host(f"{mode} {check} {bool(input_dir)} {bool(output)} "
                                   f"{heatmaps} {config.to_json_best_effort()}")
        check_same_folder(workdir)  # (the path may differ by host: mounts may)
        if check and mode == "score":
            raise UserError("--check checks a training run and --mode is score; leave "
                            "--check out (scoring checks its run and images before it scores)")
        if mode == "score":
            from fsad.scoring import heatmap_dir, is_stream, score_folder
            if not input_dir:
                raise UserError("--mode score needs the images to score; pass --input DIR "
                                "(or --input IMAGE)")
            check_scoring_config(config)  # the fields scoring may change (train checks all)
            check_stored_config(workdir, config, must_exist=True)
            path = score_folder(config, workdir, input_dir, output, heatmaps)
            if is_primary():  # (beside the CSV where that goes to standard output)
                where = sys.stderr if is_stream(path) else sys.stdout
                print(f"scores: {path}", file=where)
                if heatmaps:
                    print(f"heatmaps: {heatmap_dir(workdir, config.seed)} (one overlay per "
                          f"image: image | heat map | blend, each map scaled to its own "
                          f"range; the CSV's heatmap column names it)", file=where)
            return 0
        given = [f for f, v in (("--input", input_dir), ("--output", output),
                                ("--heatmaps", heatmaps)) if v]
        if given:  # they were ignored, and a run trained in the workdir
            raise UserError(f"{', '.join(given)} {'is a' if len(given) == 1 else 'are'} "
                            f"score-mode flag{'s' if len(given) > 1 else ''} and --mode is "
                            f"train; add --mode score to score images with the trained run "
                            f"in --workdir, or leave {'it' if len(given) == 1 else 'them'} out")
        check_method(config)  # (the notes read the method's own fields)
        notes = [config_protocol_note(config), *config_warnings(config)]
        for note in notes:
            if note and is_primary():
                logging.warning("%s", note)
        if check:
            lines = check_run(config, workdir)
            if is_primary():
                print("\n".join(lines + ["checked: nothing was written or trained; run the "
                                          "same command without --check to train"]))
            return 0
        results = run_experiment(config, workdir)
    except UserError as err:
        print(error_line(err), file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(interrupted_line(workdir, mode), file=sys.stderr, flush=True)
        interrupts.delivered()  # (after the line: a press from here ends the process)
        return interrupts.exit_status()  # EXIT_INTERRUPTED, or 143 for SIGTERM
    except Exception as err:  # noqa: BLE001 - only a lost host is answered here
        if not lost_host(err):
            raise
        print(host_lost_line(workdir, mode, err), file=sys.stderr, flush=True)
        return EXIT_HOST_LOST
    if is_primary():  # every host of a multi-host run holds the same results
        print_summary(results)
        print(f"results: {workdir}/results.json")
    return 0


def join_hosts(distributed: bool, coordinator: str | None, num_processes: int | None,
               process_id: int | None) -> None:
    """Joins a multi-host run (`fsad.hosts.initialize`) when asked to; the processes
    other than the first then log errors only (their warnings repeat the first's).

    Raises:
      UserError: the host flags are incomplete, or JAX refuses them (a coordinator that
        cannot be reached, or a host that never joins, ends in JAX's abort after its
        5-minute timeout instead).
    """
    if not (distributed or coordinator or num_processes is not None or process_id is not None):
        return
    given = [coordinator, num_processes, process_id]
    if any(v is not None for v in given) and any(v is None for v in given):
        raise UserError("a multi-host run given its hosts needs all of --coordinator_address "
                        "(process 0's host:port), --num_processes and --process_id")
    if num_processes is not None and not 0 <= process_id < num_processes:
        raise UserError(f"--process_id {process_id} is not in 0 to {num_processes - 1} "
                        f"(--num_processes {num_processes})")
    from fsad.hosts import initialize, is_primary
    if coordinator:  # JAX says nothing while it waits (minutes, then an abort)
        print(f"fsad: process {process_id} of {num_processes} joining through {coordinator}; "
              f"it waits until every process has started (one that has not within 5 "
              f"minutes: JAX ends this one with an abort)", file=sys.stderr, flush=True)
    try:
        initialize(coordinator, num_processes, process_id)
    except Exception as err:  # noqa: BLE001 - JAX's errors here are all the set-up's
        raise UserError(f"cannot join the multi-host run ({' '.join(str(err).split())[:300]});"
                        f" pass --coordinator_address, --num_processes and --process_id, "
                        f"the same coordinator on every host") from err
    if not is_primary():
        logging.set_verbosity(logging.ERROR)


def main(argv):
    if len(argv) > 1:
        print(error_line(f"unexpected arguments {' '.join(argv[1:])}; fields are set as "
                         f"--config.FIELD=VALUE"), file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    logging.set_verbosity(logging.WARNING)
    # warnings read "fsad: WARNING: ..." rather than absl's file:line prefix
    logging.get_absl_handler().setFormatter(std_logging.Formatter("fsad: %(levelname)s: "
                                                                  "%(message)s"))
    try:
        for module in ("fsad.experiment", "fsad.scoring"):  # the start-up's imports (JAX,
            importlib.import_module(module)  # Orbax, scikit-learn): Ctrl-C only recorded
        interrupts.install()
        interrupts.check()  # a Ctrl-C during the start-up (`interrupts.defer`)
        join_hosts(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value,
                   _PROCESS_ID.value)
    except UserError as err:
        print(error_line(err), file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("fsad: interrupted before the run started; nothing was written",
              file=sys.stderr, flush=True)
        os._exit(interrupts.exit_status())
    code = execute(_CONFIG.value, _WORKDIR.value, _MODE.value, _INPUT.value, _OUTPUT.value,
                   _HEATMAPS.value, _CHECK.value)
    interrupts.delivered()  # done: a press in the teardown ends it, not with a traceback
    if code in (EXIT_USER_ERROR, EXIT_INTERRUPTED, EXIT_HOST_LOST):
        # the one line is printed: leave before background threads (Orbax's writers of a
        # failed or interrupted checkpoint) add their shutdown noise, and (a lost host)
        # before JAX's shutdown barrier waits for the host that is gone
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _config_file(argv) -> str:
    """The --config value of a command line (the file, without its variants)."""
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a.split("=", 1)[1].split(":")[0]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1].split(":")[0]
    return "?"


def config_problem(err: Exception, argv) -> str | None:
    """The one line (without its "fsad: error: ") for a flag, config file, variant or
    config field that cannot be used; None for an exception that is not one of those."""
    message = str(err)
    path = _config_file(argv)
    marker = "fsad.errors.UserError: "  # a UserError raised inside the config file
    if isinstance(err, UserError) or marker in message:
        return message.split(marker)[-1]
    if path.endswith(".json") and os.path.isfile(path):  # a run's config.json (read as
        # Python, it fails)
        return (f"{path!r} is a run's record, not a config file; to use the config of the "
                f"run it belongs to, pass --config configs/run.py:"
                f"{os.path.dirname(path) or '.'}")
    if isinstance(err, SyntaxError):
        return (f"config file {err.filename or path!r} line {err.lineno}: {err.msg}; fix the "
                f"file, or start from one of configs/*.py")
    if isinstance(err, OSError) and ("Failed loading config file" in message
                                     or "Configuration is not available" in message):
        # ml_collections could not read the file: its last line says why, e.g.
        # "[Errno 2] No such file or directory: 'configs/nope.py'"
        reason = message.strip().splitlines()[-1].strip()
        reason = reason.split("earlier failure to load: ")[-1]
        return (f"cannot load config file {path!r} ({reason}); pass a config file, e.g. "
                f"configs/devnet.py, configs/dra.py, configs/ahl_dra.py or "
                f"configs/ahl_devnet.py (variants after a colon: configs/devnet.py:quick)")
    if isinstance(err, (AttributeError, KeyError)):
        if "get_config" in message:
            return (f"config file {path!r} defines no get_config(); a config file defines "
                    f"get_config() returning an ml_collections ConfigDict (see "
                    f"configs/devnet.py)")
        return unknown_field_line(err, argv)
    if isinstance(err, flags.Error):
        missing = re.search(r"Flag --(\w+) must have a value other than None", message)
        if missing and missing.group(1) in REQUIRED_FLAGS:
            return f"--{missing.group(1)} is required; {REQUIRED_FLAGS[missing.group(1)]}"
        return message if "; " in message else (
            message.rstrip(".") + "; see python -m fsad.main --helpfull for the flags")
    return None


def unknown_field_line(err: Exception, argv) -> str:
    """The line for an override of no field: ml_collections raises a KeyError (or an
    AttributeError holding one) whose text is the name, quoted, then, for a name close to
    a field's at its level, 'Did you mean "NAME" instead of "name"?' on the next line."""
    while isinstance(err, (AttributeError, KeyError)) and err.args and \
            isinstance(err.args[0], BaseException):
        err = err.args[0]
    text = str(err.args[0]) if err.args else str(err)
    name = text.splitlines()[0].strip("\"'") if text.strip() else "?"
    given = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    bad = next((g for g in given if name in g.split(".")[1:]), f"--config.*.{name}")
    from fsad.config import config_files_with_field
    elsewhere = config_files_with_field(bad[len("--config."):])
    if elsewhere:  # spelt right, but another method's field
        return (f"{bad} is a field of {' and '.join(elsewhere)}, not of this --config; "
                f"use one of those config files, or leave the flag out")
    hint = re.search(r'Did you mean "([^"]+)"', text)
    near = "" if not hint else " (did you mean " + ".".join(
        hint.group(1) if part == name else part for part in bad.split(".")) + "?)"
    return (f"{bad} is not a config field{near}; check its spelling against the config "
            f"file (fsad/config.py lists the shared fields)")


def parse_flags(argv):
    """absl's flag parsing and the config file's loading (which ml_collections may leave
    to the first use of the flag's value), with a bad flag, config file, variant or
    config field answered in one line (exit 2) instead of absl's usage text or a
    traceback."""
    try:
        parsed = flags.FLAGS(argv)
        if _CONFIG.value is not None:
            # a config file that failed to load is a placeholder that raises on first use:
            # use it now, where the error becomes one line
            _CONFIG.value.keys()
        return parsed
    except Exception as err:  # noqa: BLE001  (config_problem says which are the user's)
        message = config_problem(err, argv)
        if message is None:
            raise
    print(error_line(message), file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


def run():
    """The command line (``python -m fsad.main``, the ``fsad`` script): absl's flags, the
    config file, then `main`."""
    interrupts.defer()  # first, before JAX's import: a Ctrl-C from here on stops the run
    flags.mark_flags_as_required(list(REQUIRED_FLAGS))
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
