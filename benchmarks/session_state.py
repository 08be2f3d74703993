"""What one lent GPU machine leaves to the next: the finished seeds of a table's runs and
the compiled programs, in one file that the device tool brings back (16 MiB at most).

A machine lent for minutes (benchmarks/gpu_session.sh) finishes a few cells of the ELPV
grid and spends minutes compiling; the next one starts bare. `pack` writes what is worth
carrying to the next machine, `unpack` puts it back there, and reproduce.py then reads
the carried seeds back instead of training them again (their metrics.json) and JAX's
persistent compilation cache finds the carried programs (same JAX, same GPU kind, same
program, and the same cache folder: JAX's cache key holds the folder's path, through the
autotuning subfolder that it names among XLA's options; else it compiles, as without
them). fsad's default folder, ~/.cache/fsad/jax, is one path on every lent machine
(each starts from one image and runs the commands as root):

    python benchmarks/session_state.py pack RUNS STATE.tgz [--cache DIR] [--max_mib 15]
    python benchmarks/session_state.py unpack STATE.tgz RUNS [--cache DIR]

What travels:
  * of every run under RUNS (a folder with config.json): config.json and results.json,
    and of each finished seed (its metrics.json written) metrics.json, split.json and
    test_scores.npz; an unfinished seed stays behind (its checkpoints are too large to
    carry: it trains from its start on the next machine). So do every checkpoint, AHL's
    feature cache and the lock files. Other files under RUNS (a table's table.md and
    table.json) travel when under 1 MiB.
  * an AHL run that starts from another run's trained models (`ahl.base_workdir`): the
    base run's checkpoints stay behind, so its seeds still to train on the next machine
    (a seed cut short, or more --seeds) train their base model themselves. Its carried
    config.json says ahl.base_workdir="", and its carried.json which base run its
    finished seeds started from.
  * of the compilation cache (--cache, default fsad's: `fsad.compile_cache`): XLA's
    autotuning results first (JAX keeps them in a subfolder on a GPU), then the compiled
    programs last used or written first (a carried program that this machine loaded
    counts as used, where the file system records reads: relatime, Linux's default), as
    many as fit in --max_mib with the runs.

`unpack` writes no file that exists already (what this machine made stays), and
refuses a member outside RUNS or the cache. The script imports no JAX: gpu_session.sh
packs after every stage, each time in half a second (JAX's import took 2.5 s of it).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
import tarfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fsad.atomic import whole_or_nothing  # noqa: E402
from fsad.compile_cache import compilation_cache_dir  # noqa: E402
from fsad.errors import UserError  # noqa: E402
from fsad.workdir import seed_finished  # noqa: E402

SEED_FILES = ("metrics.json", "split.json", "test_scores.npz")  # of a finished seed
RUN_FILES = ("config.json", "results.json", "carried.json")
OTHER_FILE_MAX = 1 << 20  # a table, a benchmark's json; not a run's image or array
MANIFEST = "state.json"
AUTOTUNE = "xla_gpu_per_fusion_autotune_cache_dir"  # JAX's subfolder of the cache on a GPU
SEED_DIR = re.compile(r"seed_\d+$")


def run_files(runs: str) -> tuple[dict[str, bytes | str], list[str], list[str]]:
    """What travels of RUNS. -> ({path in RUNS: a file's path, or the bytes that replace
    it}, the finished seeds as "run/seed_<s>", the AHL runs whose base is dropped)."""
    files: dict[str, bytes | str] = {}
    seeds, rebased = [], []
    for folder, dirs, names in os.walk(runs):
        rel = os.path.relpath(folder, runs)
        dirs[:] = sorted(d for d in dirs if not (
            SEED_DIR.match(d) and not seed_finished(os.path.join(folder, d))))
        in_seed = SEED_DIR.match(os.path.basename(folder)) is not None
        if in_seed:
            dirs[:] = []  # checkpoints and caches
            seeds.append(rel)
        is_run = "config.json" in names and not in_seed
        for name in sorted(names):
            path = os.path.join(folder, name)
            keep = (name in SEED_FILES) if in_seed else (name in RUN_FILES) if is_run else (
                not name.startswith(".") and ".tmp" not in name
                and os.path.getsize(path) <= OTHER_FILE_MAX)
            if keep:
                files[os.path.normpath(os.path.join(rel, name))] = path
        if is_run:
            config = rebased_ahl_run(folder, [d for d in dirs if SEED_DIR.match(d)])
            if config is not None:
                files[os.path.normpath(os.path.join(rel, "config.json"))] = config[0]
                files[os.path.normpath(os.path.join(rel, "carried.json"))] = config[1]
                rebased.append(rel)
    return files, seeds, rebased


def rebased_ahl_run(run: str, finished: list[str]) -> tuple[bytes, bytes] | None:
    """For an AHL run on another run's base (`ahl.base_workdir`): (its config.json with
    ahl.base_workdir "", a carried.json that says which base its finished seeds, the
    folders `finished` ("seed_<s>"), started from); else None."""
    with open(os.path.join(run, "config.json")) as f:
        config = json.load(f)
    base = config.get("ahl", {}).get("base_workdir", "") if config.get("method") == "ahl" \
        else ""
    if not base:
        return None
    config["ahl"]["base_workdir"] = ""
    done = sorted(int(d[len("seed_"):]) for d in finished)
    note = {"ahl.base_workdir": base, "finished_seeds_on_that_base": done,
            "why": "the base run's checkpoints stay on the machine that trained them; "
                   "a seed that trains on another machine trains its base model itself"}
    return json.dumps(config, indent=1).encode(), json.dumps(note, indent=1).encode()


def cache_files(cache: str, budget: int) -> tuple[list[tuple[str, str]], int, int]:
    """The cache's files that fit in `budget` bytes: XLA's autotuning results, then the
    compiled programs last used (read) or written first. -> ([(path in the cache, path)],
    files left out, their bytes)."""
    if not cache or not os.path.isdir(cache):
        return [], 0, 0
    tuned, programs = [], []
    for folder, _, names in os.walk(cache):
        for name in names:
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, cache)
            (tuned if rel.split(os.sep)[0] == AUTOTUNE else programs).append((rel, path))
    programs.sort(key=lambda rp: -last_use(rp[1]))
    chosen, left, left_bytes = [], 0, 0
    for rel, path in sorted(tuned) + programs:
        size = os.path.getsize(path)
        if size <= budget:
            chosen.append((rel, path))
            budget -= size
        else:
            left, left_bytes = left + 1, left_bytes + size
    return chosen, left, left_bytes


def last_use(path: str) -> float:
    """When a file was last read or written (its atime, where the file system keeps
    it, else its mtime)."""
    st = os.stat(path)
    return max(st.st_atime, st.st_mtime)


def pack(runs: str, state: str, cache: str, max_mib: float) -> dict:
    """Writes STATE (a .tgz of runs/..., cache/... and state.json). -> the manifest."""
    files, seeds, rebased = run_files(runs) if os.path.isdir(runs) else ({}, [], [])
    size = sum(len(v) if isinstance(v, bytes) else os.path.getsize(v) for v in files.values())
    limit = int(max_mib * (1 << 20))
    if size > limit:
        raise UserError(f"the runs under {runs} alone take {size / (1 << 20):.1f} MiB, over "
                        f"--max_mib {max_mib:g}; raise it, or pack fewer runs")
    # room for the tar headers and the manifest: 1 KiB a file and 64 KiB
    cached, left, left_bytes = cache_files(cache, limit - size - 1024 * len(files) - (64 << 10))
    cached_bytes = sum(os.path.getsize(p) for _, p in cached)
    manifest = {
        "made": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "runs": runs,
        "finished_seeds": seeds, "ahl_runs_rebased": rebased, "run_files": len(files),
        "cache": {"folder": cache, "files": len(cached), "bytes": cached_bytes,
                  "autotune_files": sum(r.split(os.sep)[0] == AUTOTUNE for r, _ in cached),
                  "left_out": left, "left_out_bytes": left_bytes},
        "versions": versions()}
    os.makedirs(os.path.dirname(os.path.abspath(state)), exist_ok=True)
    with whole_or_nothing(state) as tmp, tarfile.open(tmp, "w:gz") as tar:
        add_bytes(tar, MANIFEST, json.dumps(manifest, indent=1).encode())
        for rel, src in sorted(files.items()):
            if isinstance(src, bytes):
                add_bytes(tar, f"runs/{rel}", src)
            else:
                tar.add(src, f"runs/{rel}", recursive=False)
        for rel, src in cached:
            tar.add(src, f"cache/{rel}", recursive=False)
    return manifest


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), int(time.time())
    tar.addfile(info, io.BytesIO(data))


def versions() -> dict:
    """The versions a carried program was compiled with (JAX's cache checks them too)."""
    from importlib import metadata
    out = {}
    for package in ("jax", "jaxlib"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = None
    return out


def unpack(state: str, runs: str, cache: str) -> dict:
    """Extracts STATE's runs into RUNS and its programs into the cache, without
    replacing a file. -> {"runs": files written, "cache": files written, "kept": files
    that existed, "manifest": the packing's manifest}."""
    if not os.path.isfile(state):
        raise UserError(f"no state file {state!r}: give the state.tgz that "
                        f"benchmarks/gpu_session.sh left in its OUT folder")
    counts = {"runs": 0, "cache": 0, "kept": 0, "manifest": {}}
    try:
        tar = tarfile.open(state, "r:gz")
    except (tarfile.TarError, OSError) as err:
        raise UserError(f"{state!r} is no state file ({err}); give the state.tgz that "
                        f"benchmarks/gpu_session.sh left in its OUT folder") from None
    with tar:
        for member in tar.getmembers():
            if member.name == MANIFEST:
                counts["manifest"] = json.load(tar.extractfile(member))
                continue
            top, _, rel = member.name.partition("/")
            where = {"runs": runs, "cache": cache}.get(top)
            parts = rel.split("/")
            if not member.isfile() or where is None or not rel or ".." in parts or \
                    os.path.isabs(rel):
                raise UserError(f"{state!r} holds {member.name!r}, which is no file of a "
                                f"run or of the cache; it was not written by this script")
            if not where:  # the cache is off here
                continue
            dest = os.path.join(where, *parts)
            if os.path.exists(dest):
                counts["kept"] += 1
                continue
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with whole_or_nothing(dest) as tmp, tar.extractfile(member) as src, \
                    open(tmp, "wb") as f:
                f.write(src.read())
            counts[top] += 1
    return counts


def count(n, thing: str) -> str:
    """count(2, "file") -> "2 files"; n may be a list."""
    n = n if isinstance(n, int) else len(n)
    return f"{n} {thing}{'' if n == 1 else 's'}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    pk = sub.add_parser("pack", help="write RUNS' finished seeds and the cache to STATE")
    pk.add_argument("runs")
    pk.add_argument("state")
    pk.add_argument("--max_mib", type=float, default=15.0,
                    help="the file's size at most (the device tool brings back 16 MiB)")
    up = sub.add_parser("unpack", help="put STATE's runs in RUNS and its programs in the "
                        "cache, replacing no file")
    up.add_argument("state")
    up.add_argument("runs")
    for q in (pk, up):
        q.add_argument("--cache", default=None, help="the compilation cache (default "
                       "fsad's, $FSAD_COMPILE_CACHE or <fsad cache>/jax; '' for none)")
    args = p.parse_args(argv)
    cache = compilation_cache_dir() if args.cache is None else args.cache
    cache = "" if cache == "off" else cache
    try:
        if args.command == "pack":
            m = pack(args.runs, args.state, cache, args.max_mib)
            c = m["cache"]
            print(f"session_state: {args.state}: {count(m['finished_seeds'], 'finished seed')}"
                  f" ({count(m['run_files'], 'file')} of {args.runs}), "
                  f"{count(c['files'], 'cache file')} ({c['bytes'] / (1 << 20):.1f} MiB, "
                  f"{c['autotune_files']} of autotuning), {c['left_out']} left out "
                  f"({c['left_out_bytes'] / (1 << 20):.1f} MiB)"
                  + (f"; AHL runs whose seeds to come train their own base: "
                     f"{', '.join(m['ahl_runs_rebased'])}" if m["ahl_runs_rebased"] else ""))
        else:
            n = unpack(args.state, args.runs, cache)
            m = n["manifest"]
            print(f"session_state: from {args.state} (packed {m.get('made', '?')}, JAX "
                  f"{m.get('versions', {}).get('jax', '?')}): "
                  f"{count(m.get('finished_seeds', []), 'finished seed')}; "
                  f"{count(n['runs'], 'file')} into {args.runs}, {n['cache']} into the cache "
                  f"{cache or '(off: none)'}; {count(n['kept'], 'file')} already here kept")
            packed_from = m.get("cache", {}).get("folder")
            if n["cache"] and packed_from and os.path.abspath(packed_from) != \
                    os.path.abspath(cache):
                print(f"session_state: warning: the programs were packed from the cache "
                      f"{packed_from}; JAX finds them only in a folder of that path (its "
                      f"cache key holds it): unpack with --cache {packed_from}, and run with "
                      f"FSAD_COMPILE_CACHE={packed_from}", file=sys.stderr)
    except UserError as err:
        print(f"session_state: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
