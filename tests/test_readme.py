"""The README's code runs as written: every ```python block of the section "Using the
pieces in your own JAX code" is executed, in order, in one namespace. Its commands
(fsad.main, benchmarks/reproduce.py, throughput.py and profile_step.py, in ```bash blocks
and in the text) parse and pass the checks a run makes before its first step, and so do the
commands of benchmarks/gpu_session.sh, which runs where a GPU is lent for minutes. Its
field tables give the configs' fields and defaults."""

import importlib
import importlib.util
import os
import re
import shlex
import subprocess
import sys
import tarfile

import pytest

from conftest import ROOT, cpu_env, parse_command_line

SECTION = "## Using the pieces in your own JAX code"


def readme_text() -> str:
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def readme_section(section: str) -> str:
    """The README from the heading `section` to the next level-2 heading (or the end)."""
    text = readme_text()
    start = text.index(section)
    end = text.find("\n## ", start + len(section))
    return text[start:end if end > 0 else None]


def readme_blocks(section: str = SECTION) -> list[str]:
    return re.findall(r"```python\n(.*?)```", readme_section(section), flags=re.S)


def test_readme_snippets_run_as_written(capsys):
    blocks = readme_blocks()
    assert len(blocks) >= 2  # the pieces, then a whole training step
    namespace: dict = {}
    for code in blocks:
        exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102
    out = capsys.readouterr().out
    losses = [float(x) for x in re.findall(r"loss ([0-9.eE+-]+)", out)]
    assert len(losses) == 3 and all(l == l and abs(l) < 1e6 for l in losses)  # noqa: E741
    assert namespace["scores"].shape == (8,) and namespace["loss"].shape == ()


def test_commands_in_module_docstrings_keep_their_line_breaks():
    """A command continued with a backslash in a module's docstring (fsad.main prints its
    docstring as --help) must be written `\\\\` or in a raw string: a lone backslash
    before the line break joins the two lines into one, the indentation between them."""
    import ast
    import glob
    files = [f for pattern in ("fsad/**/*.py", "benchmarks/*.py", "configs/*.py")
             for f in glob.glob(os.path.join(ROOT, pattern), recursive=True)]
    assert len(files) > 40
    joined = []
    for path in files:
        with open(path) as f:
            doc = ast.get_docstring(ast.parse(f.read()), clean=False) or ""
        joined += [f"{os.path.relpath(path, ROOT)}: {line.strip()}"
                   for line in doc.splitlines() if re.search(r"\S {4,}--", line)]
    assert joined == []


# the commands whose flags are checked, as the README writes them
COMMANDS = ("python -m fsad.main", "python benchmarks/reproduce.py",
            "python benchmarks/throughput.py", "python benchmarks/profile_step.py")
# a placeholder of a command: the values the README's text gives it
PLACEHOLDERS = {"$DT": ("float32", "bfloat16"),
                "--backbone B": ("--backbone efficientnet_lite0", "--backbone resnet18")}
CONFIGS = ("devnet", "dra", "ahl_dra", "ahl_devnet")


def readme_commands() -> list[list[str]]:
    """Every command of COMMANDS in the README's ```bash blocks (a line continued by a
    backslash joined to the next) and code spans (which may wrap), as argv from the
    script on: comments dropped, optional [--flag value] brackets opened, each
    placeholder once per value."""
    text = readme_text()
    lines = []
    for body in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        lines += re.sub(r"\\\n", " ", body).splitlines()
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    lines += [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose)]
    commands = []
    for line in lines:
        starts = [line.find(c) for c in COMMANDS if c in line]
        if not starts:
            continue
        line = line[min(starts):].replace("[", "").replace("]", "")
        variants = [line]
        for name, values in PLACEHOLDERS.items():
            variants = [v.replace(name, value) for v in variants for value in values] \
                if name in line else variants
        commands += [shlex.split(v, comments=True) for v in variants]
    return commands


def test_readme_commands_parse_and_pass_the_checks_before_a_run(tmp_path, monkeypatch,
                                                                capsys):
    """fsad.main's flags and config overrides parse as fsad.main parses them, and the
    config passes fsad.validate.check_config; reproduce.py, throughput.py and
    profile_step.py commands pass their own --check (every cell's config and protocol
    on the data's rows; the flags): nothing is decoded, compiled or trained. Relative
    paths land in tmp_path (the procedural set a command names is written there)."""
    from benchmarks import profile_step, reproduce, throughput
    from fsad.errors import UserError
    from fsad.validate import check_config
    commands = readme_commands()
    kinds = {c: sum(" ".join(argv).startswith(c) for argv in commands) for c in COMMANDS}
    assert kinds[COMMANDS[0]] >= 15 and kinds[COMMANDS[1]] >= 4 and kinds[COMMANDS[2]] >= 4
    assert kinds[COMMANDS[3]] >= 1
    for script in (throughput, profile_step):
        monkeypatch.setattr(script, "compile_seconds",
                            lambda *a: pytest.fail("--check compiled a step"))
    monkeypatch.chdir(tmp_path)
    with_torch = importlib.util.find_spec("torch") is not None
    for argv in commands:
        line = " ".join(argv)
        if argv[1] == "-m":  # fsad.main
            for run in re.findall(r"configs/run\.py:(\S+)", line):  # a run's config.json
                os.makedirs(run, exist_ok=True)
                with open(os.path.join(run, "config.json"), "w") as f:
                    f.write(importlib.import_module("configs.devnet").get_config()
                            .to_json_best_effort())
            try:
                check_config(parse_command_line(argv[3:]))
            except SystemExit:
                pytest.fail(f"{line}: {capsys.readouterr().err}")
            except UserError as err:
                pytest.fail(f"{line}: {err}")
        elif argv[1].endswith("reproduce.py"):
            code = reproduce.main([*argv[2:], "--check"])
            out, err = capsys.readouterr()
            assert code == 0 and "every cell checked" in out, f"{line}: {err}"
        elif argv[1].endswith("profile_step.py"):
            try:
                profile_step.main([*argv[2:], "--check"])
            except SystemExit:
                pytest.fail(f"{line}: {capsys.readouterr().err}")
            assert "flags and configs checked" in capsys.readouterr().out, line
        elif "--torch" in argv and not with_torch:
            continue  # refused without PyTorch, as it should be
        else:
            try:
                throughput.main([*argv[2:], "--check"])
            except SystemExit:
                pytest.fail(f"{line}: {capsys.readouterr().err}")
            assert "flags checked" in capsys.readouterr().out, line


def test_readme_fields_and_variants_are_the_configs():
    """Every --config.FIELD and --set FIELD the README names is a field of one of the
    configs, and every configs/FILE.py:VARIANTS it names loads."""
    from fsad.config import has_field
    text = readme_text()
    configs = {m: importlib.import_module(f"configs.{m}").get_config() for m in CONFIGS}
    # (a field the text says is not one, as an error's example, is left out)
    fields = set(re.findall(r"--config\.([A-Za-z_][\w.]*\w)(?![\w.]| is not a config field)",
                            text))
    fields |= set(re.findall(r"--set ([A-Za-z_][\w.]*)=", text))
    assert len(fields) > 25
    unknown = [f for f in sorted(fields) if f not in ("FIELD",)
               and not any(has_field(c, f) for c in configs.values())]
    assert unknown == []
    named = set(re.findall(r"configs/(\w+)\.py:([\w,]+)", text))
    assert len(named) >= 6
    for module, variants in sorted(named):
        if module != "run":  # configs/run.py:WORKDIR reads a run (test_a_runs_own_config)
            importlib.import_module(f"configs.{module}").get_config(variants)


def test_the_gpu_session_checks_every_stage_on_a_cpu(tmp_path):
    """benchmarks/gpu_session.sh with CHECK=1: each default stage (the throughput table,
    the bf16/fp32 parity cells, the profile of the DevNet step, the ELPV grid of 3
    methods x general and hard (mono, poly) x 10 and 1 shots) passes its script's
    checks, in seconds, with the flags the GPU run will use, in that order."""
    out, runs = tmp_path / "out", tmp_path / "runs"
    env = {**cpu_env(), "CHECK": "1", "RUNS": str(runs), "PYTHON": sys.executable}
    if importlib.util.find_spec("torch") is None:  # --torch is refused without PyTorch
        env["STAGES"] = "parity_default parity_fp32 profile grid"
    done = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_session.sh"),
                           str(out), "9"], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    log = (out / "session.log").read_text()
    stages = [] if env.get("STAGES") else ["throughput"]
    stages += ["parity_default", "parity_fp32", "profile", "grid"]
    assert re.findall(r"^## (\w+): exit 0 after", log, flags=re.M) == stages, log[-4000:]
    assert log.count("every cell checked (1)") == 2
    assert "every cell checked (18)" in log
    assert "[18/18] ahl_dra hard poly 1-shot" in log
    if "throughput" in stages:  # DevNet, AHL, DRA in bf16 (fp32 rows: THROUGHPUT_ARGS)
        rows = re.findall(r"^(?!.*seeds vmapped)(\w+) (?:batch 48 (\w+)|meta-step, 300 "
                          r"normals, float32 heads, tasks vmap), 448 px", log, flags=re.M)
        assert rows == [("devnet", "bfloat16"), ("ahl", ""), ("dra", "bfloat16")], log
    # OUT's files after every stage, not only at the end: a call cut short keeps them
    packed = [m.start() for m in re.finditer(r"^session_state: .*state\.tgz: ", log,
                                             flags=re.M)]
    ends = [m.start() for m in re.finditer(r"^## \w+: exit", log, flags=re.M)]
    assert len(packed) == len(stages) + 1, log[-3000:]
    assert all(e < p < e2 for e, p, e2 in zip(ends, packed, ends[1:] + [len(log)])), log
    # the released DevNet step (traced without command buffers), then its stem as
    # space-to-depth, then on Lite0 with slices, then with XLA's grouped convolutions not
    # autotuned, then without the pyramid and rotation, then Lite0 as the runs compile it
    # (243 s on an H200: last)
    lite0 = "model.backbone=efficientnet_lite0"
    assert "the trace: as released compiled again with XLA {'xla_gpu_enable_command_buffer'" \
        in log
    assert re.findall(r"^devnet (.+): batch 48, 448 px, bfloat16, (\w+)(.*)$", log,
                      flags=re.M) == [("as released", "resnet18", ""),
                                      ("model.stem=space_to_depth", "resnet18", ""),
                                      (f"{lite0},model.depthwise_conv=slices",
                                       "efficientnet_lite0", ""),
                                      (f"{lite0},xla_gpu_autotune_level=0",
                                       "efficientnet_lite0",
                                       " (XLA {'xla_gpu_autotune_level': 0})"),
                                      ("model.n_scales=1,augment.rotate_degrees=0",
                                       "resnet18", ""),
                                      (lite0, "efficientnet_lite0", "")], log
    assert "seeds vmapped" not in log  # answered on an H200: asked for by STAGES only
    assert os.listdir(runs) == []  # nothing ran, nothing written
    # what the next machine gets (benchmarks/session_state.py): nothing finished here
    assert "session_state: " in log and "0 finished seeds" in log
    assert (out / "state.tgz").exists() and len(os.listdir(out)) <= 8


def test_the_gpu_session_runs_the_stages_named(tmp_path):
    """STAGES picks stages (the script keeps its order); an unknown name is refused with
    the list, before anything runs. STATE, what an earlier machine left, is unpacked
    into RUNS before the first stage, and goes on to the next machine in OUT/state.tgz."""
    out, runs = tmp_path / "out", tmp_path / "runs"
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "table.md").write_text("| a table of an earlier machine |\n")
    script = os.path.join(ROOT, "benchmarks", "session_state.py")
    subprocess.run([sys.executable, script, "pack", str(earlier), str(tmp_path / "s.tgz"),
                    "--cache", ""], check=True, env=cpu_env(), timeout=120)
    env = {**cpu_env(), "CHECK": "1", "RUNS": str(runs), "PYTHON": sys.executable,
           "STAGES": "parity_fp32 vmapped_seeds", "STATE": str(tmp_path / "s.tgz")}
    script = os.path.join(ROOT, "benchmarks", "gpu_session.sh")
    done = subprocess.run(["bash", script, str(out), "3"], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    log = (out / "session.log").read_text()
    assert re.findall(r"^## (\w+): exit 0 after", log, flags=re.M) == [
        "parity_fp32", "vmapped_seeds"], log[-4000:]
    # with no grid to follow, a stage leaves 15 s of the call, not the grid's minute
    limits = [int(x) for x in re.findall(r"^## \w+ \(at most (\d+) s\)", log, flags=re.M)]
    assert len(limits) == 2 and 3 * 60 - 30 < limits[0] <= 3 * 60 - 15, log
    assert re.findall(r"^ahl meta-step, 300 normals, float32 heads, tasks vmap and map, "
                      r"448 px, resnet18$", log, flags=re.M), log  # the DevNet seeds: answered
    assert log.index(f"1 file into {runs}") < log.index("## parity_fp32")
    assert os.listdir(runs) == ["table.md"]  # the carried file; nothing else written
    with tarfile.open(out / "state.tgz") as tar:
        assert "runs/table.md" in tar.getnames()
    os.remove(runs / "table.md")
    if importlib.util.find_spec("torch") is not None:  # (--torch is checked for torch)
        # the throughput stage alone takes the whole call, not its 2/5 beside others
        done = subprocess.run(["bash", script, str(tmp_path / "out3"), "3"],
                              capture_output=True, text=True,
                              env={**env, "STAGES": "throughput", "STATE": ""},
                              timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        log = (tmp_path / "out3" / "session.log").read_text()
        (limit,) = [int(x) for x in re.findall(r"^## throughput \(at most (\d+) s\)", log,
                                               flags=re.M)]
        assert 3 * 60 - 30 < limit <= 3 * 60 - 15, log
    done = subprocess.run(["bash", script, str(tmp_path / "out2"), "3"],
                          capture_output=True, text=True,
                          env={**env, "STAGES": "profile parity"}, timeout=60)
    assert done.returncode == 2
    assert "STAGES has 'parity'; the stages are: throughput parity_default" in done.stderr
    assert not (tmp_path / "out2").exists() and os.listdir(runs) == []


# the README's field tables: (section, the config whose defaults the table gives)
FIELD_TABLES = (("## Config fields", "devnet"), ("## DRA", "dra"), ("## AHL", "ahl_dra"))
METHOD_CONFIGS = {"DevNet": "devnet", "DRA": "dra"}  # "50 (DRA 30)", "DevNet False"


def field_table_rows(section: str) -> list[tuple[list[str], list[str]]]:
    """([field, ...], [default, ...]) of each row of the table under `section`: the
    backticked names of the first column, the second column split at commas outside
    parentheses."""
    rows = []
    for line in readme_section(section).splitlines():
        if not line.startswith("| `"):
            continue
        names, defaults = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:3]]
        rows.append((re.findall(r"`([^`]+)`", names),
                     [d.strip() for d in re.split(r",\s*(?![^()]*\))", defaults)] if defaults
                     else []))
    return rows


def readme_value(text: str):
    """A default as the README writes it: `word` a string, "empty" the empty string,
    True/False, 1/3 a fraction, else a number."""
    if text.startswith("`"):
        return text.strip("`")
    if text == "empty":
        return ""
    if text in ("True", "False"):
        return text == "True"
    num, _, den = text.partition("/")
    return float(num) / float(den or 1)


def test_readme_field_tables_give_the_configs_defaults():
    """Each field of the README's tables (Config fields, DRA, AHL) is a field of its
    config, with the default the table gives: "50 (DRA 30)" is devnet's 50 and dra's 30;
    a row of fewer defaults than fields gives its first field's; an empty default is an
    empty field; a default the config leaves None (resolved at run time, as data.cache_dir)
    and a group's wildcard (`ahl.optim.*`) are checked for the field alone."""
    configs = {m: importlib.import_module(f"configs.{m}").get_config() for m in CONFIGS}

    def value(config, field):
        node = configs[config]
        for part in field.split("."):
            assert part in node, f"{field} is not a field of configs/{config}.py"
            node = node[part]
        return node

    checked = 0
    for section, config in FIELD_TABLES:
        rows = field_table_rows(section)
        assert len(rows) >= 6, section
        for fields, defaults in rows:
            for f in fields:
                group, _, last = f.rpartition(".")
                if "*" in last:  # a group, or the fields of a group that start so
                    assert any(k.startswith(last.rstrip("*")) for k in value(config, group))
                else:
                    value(config, f)
            if not defaults:
                assert all(value(config, f) == "" for f in fields), fields
                continue
            pairs = list(zip(fields, defaults))
            if len(defaults) > len(fields):  # "DevNet False, DRA True": one field, per method
                pairs = [(fields[0], d) for d in defaults]
            for f, d in pairs:
                if "*" in f:
                    continue
                m = re.fullmatch(r"(DevNet|DRA) (.+)", d)
                given = [(METHOD_CONFIGS[m.group(1)], m.group(2))] if m else []
                m = re.fullmatch(r"(.+?) \((DevNet|DRA) (.+)\)", d)
                given = given or ([(config, m.group(1)), (METHOD_CONFIGS[m.group(2)],
                                                          m.group(3))] if m else [(config, d)])
                for c, written in given:
                    have = value(c, f)
                    if have is None:
                        continue
                    want = readme_value(written)
                    assert have == want or (isinstance(want, float) and
                                            abs(have - want) <= 1e-9 * abs(want)), \
                        f"{section}: {f} is {have!r} in configs/{c}.py, the README says {d}"
                    checked += 1
    assert checked >= 50
