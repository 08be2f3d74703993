"""`python -m fsad.main ARGS`, stopped by a real signal right after its Nth checkpoint in
a checkpoint folder (the end-to-end tests' interrupted runs):

    python tests/stop_at_checkpoint.py FOLDER N SIGNAL ARGS...

FOLDER: the checkpoint folder's name ("checkpoints", "ahl_checkpoints"); SIGNAL: a
signal's name ("SIGINT" for Ctrl-C, "SIGKILL"). The process sends the signal to itself
(`os.kill`) once `fsad.checkpoints.save_checkpoint` has returned for the Nth time in FOLDER,
so the run is stopped at that point whatever the host's load. A test that polled the
folder from outside and signalled then could be late: on an overloaded host the signal
once came after training had ended, and the run finished instead of being stopped.
"""

import os
import runpy
import signal
import sys


def main() -> None:
    folder, n, sig = sys.argv[1], int(sys.argv[2]), signal.Signals[sys.argv[3]]
    # patched where base training's and AHL's meta-epochs' checkpoints call it
    # (fsad.checkpoints.PacedCheckpoints), before fsad.main imports anything
    import fsad.checkpoints

    save = fsad.checkpoints.save_checkpoint
    saved = []

    def save_then_stop(mngr, step, state):
        save(mngr, step, state)
        if os.path.basename(os.path.normpath(str(mngr.directory))) == folder:
            saved.append(step)
            if len(saved) == n:
                os.kill(os.getpid(), sig)

    fsad.checkpoints.save_checkpoint = save_then_stop
    if sig == signal.SIGINT:
        # Python turns SIGINT into KeyboardInterrupt only where it was not ignored when
        # the interpreter started, and a shell ignores it in background jobs (`pytest &`)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.argv = [sys.argv[0], *sys.argv[4:]]
    runpy.run_module("fsad.main", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
