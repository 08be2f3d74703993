"""The README's code runs as written: every ```python block of the section "Using the
pieces in your own JAX code" is executed, in order, in one namespace."""

import os
import re

from conftest import ROOT

SECTION = "## Using the pieces in your own JAX code"


def readme_blocks(section: str = SECTION) -> list[str]:
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    start = text.index(section)
    end = text.find("\n## ", start + len(section))
    body = text[start:end if end > 0 else None]
    return re.findall(r"```python\n(.*?)```", body, flags=re.S)


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
