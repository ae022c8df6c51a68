"""The house rules of docs/ARCHITECTURE.md, checked on the source: layers, one home per concept, module size, and
a stated reason for every function-local import."""

from __future__ import annotations

import ast
import io
import re
import shutil
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*ROOT.glob("wdm3d/**/*.py"), *ROOT.glob("data_prep/**/*.py")])
MAX_LINES = 450
#: the phrase a module over MAX_LINES uses in its docstring to say why it stays one module
REASON = "One module because"


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _function_local_imports(tree: ast.AST) -> list[ast.stmt]:
    found: list[ast.stmt] = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found += [n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))]
    return found


def _comment_lines(source: str) -> set[int]:
    return {
        tok.start[0] for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT
    }


def _reasonless_local_imports(source: str) -> list[int]:
    """Lines of function-local imports with no comment on their line or above their block of imports (the reason)."""
    comments = _comment_lines(source)
    lines = source.splitlines()
    imports = _function_local_imports(ast.parse(source))
    import_lines = {ln for n in imports for ln in range(n.lineno, (n.end_lineno or n.lineno) + 1)}
    missing = []
    for n in imports:
        seen = {n.lineno}  # walk up through the block of imports (and blank lines) this one belongs to
        above = n.lineno - 1
        while above in import_lines or (above > 0 and not lines[above - 1].strip()):
            seen.add(above)
            above -= 1
        if not ((seen | {above}) & comments):
            missing.append(n.lineno)
    return missing


def test_sources_found():
    assert len(SOURCES) > 40 and any(p.name == "cli.py" for p in SOURCES)


@pytest.mark.skipif(
    shutil.which("lint-imports") is None, reason="import-linter is not installed (pip install -e .[dev])"
)
def test_layers_contract_holds():
    # the contract lives in pyproject.toml ([tool.importlinter]); a broken contract names the offending import
    result = subprocess.run(["lint-imports"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_layers_contract_catches_an_upward_import(tmp_path):
    # the same checker on a copy with one upward import (networks -> engine) must fail: the contract is not vacuous
    pytest.importorskip("importlinter")
    if shutil.which("lint-imports") is None:
        pytest.skip("import-linter is not installed")
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "wdm3d", copy / "wdm3d")
    shutil.copytree(ROOT / "data_prep", copy / "data_prep")
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    bad = copy / "wdm3d" / "networks" / "_upward.py"
    bad.write_text("from wdm3d.engine import RunConfig\n")
    result = subprocess.run(
        ["lint-imports"],
        cwd=copy,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(copy), "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"},
    )
    assert result.returncode != 0
    assert "wdm3d.networks._upward -> wdm3d.engine" in result.stdout


def test_long_modules_state_why():
    long = {}
    for path in SOURCES:
        text = path.read_text()
        lines = text.count("\n")
        if lines > MAX_LINES and REASON not in (ast.get_docstring(ast.parse(text)) or ""):
            long[_rel(path)] = lines
    assert not long, (
        f"modules over {MAX_LINES} lines: split them by concept, or say in the module docstring "
        f"'{REASON} ...' why not: {long}"
    )


def test_function_local_imports_give_a_reason():
    missing = {}
    for path in SOURCES:
        lines = _reasonless_local_imports(path.read_text())
        if lines:
            missing[_rel(path)] = lines
    assert not missing, (
        "function-local imports need a one-line comment saying why (an optional dependency, a "
        f"cycle, a slow import kept off a fast path), or should move to the top: {missing}"
    )


def test_reason_check_sees_a_missing_reason():
    bare = "def f():\n    import json\n    return json\n"
    given = "def f():\n    # json only when asked: keeps import time down\n    import json\n    return json\n"
    block = "def f():\n    # slow imports, only when asked\n    import json\n\n    import csv\n    return json, csv\n"
    after_code = "def f():\n    # slow\n    import json\n    x = 1\n    import csv\n    return json, csv, x\n"
    assert _reasonless_local_imports(bare) == [2]
    assert _reasonless_local_imports(given) == []
    assert _reasonless_local_imports(block) == []
    assert _reasonless_local_imports(after_code) == [5]


# concept -> (pattern, over the code's tokens joined by single spaces, that implements it; the one module allowed to)
ONE_HOME = {
    "torch.load (weights_only loading)": (r"\btorch \. load \(", "wdm3d/artifacts/files.py"),
    "unwrapping torch.compile": (r"_orig_mod\b", "wdm3d/artifacts/unwrap.py"),
    "newest-checkpoint resolution": (
        r"\bdef (latest_checkpoint|resolve_checkpoint|_checkpoint_file) \(",
        "wdm3d/artifacts/files.py",
    ),
    "state mismatch reporting": (
        r"\bdef (check_state_fits|state_mismatch|_state_mismatch) \(",
        "wdm3d/artifacts/weights.py",
    ),
    "freezing a loaded network": (r"\. eval \( \) \. requires_grad_ \( False \)", "wdm3d/artifacts/weights.py"),
    "reading a datalist file": (
        r"\bdef read_datalist \(|\bdef load_datalist \( path|load_decathlon_datalist",
        "wdm3d/data/datalist.py",
    ),
}


@pytest.mark.parametrize("concept", sorted(ONE_HOME))
def test_one_home_per_concept(concept):
    pattern, home = ONE_HOME[concept]
    where = sorted({_rel(p) for p in SOURCES if re.search(pattern, _code_only(p.read_text()))})
    assert where == [home], f"{concept} should live only in {home}, found in {where}"


def _code_only(source: str) -> str:
    """``source``'s tokens joined by single spaces, without comments and docstrings (which may name what they avoid);
    other string literals stay (``getattr(m, "_orig_mod")`` is code)."""
    layout = (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER)
    out, statement_start = [], True
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in layout:
            statement_start = statement_start or tok.type != tokenize.NL
            continue
        if tok.type == tokenize.COMMENT:
            continue
        if not (tok.type == tokenize.STRING and statement_start):
            out.append(tok.string)
        statement_start = False
    return " ".join(out)


def test_one_home_check_sees_a_copy():
    copy = "def _unwrap(m):\n    return getattr(m, '_orig_mod', m)\nx = torch.load(p, weights_only=True)\n"
    code = _code_only(copy)
    assert re.search(ONE_HOME["torch.load (weights_only loading)"][0], code)
    assert re.search(ONE_HOME["unwrapping torch.compile"][0], code)
    documented = 'def f(m):\n    """Unlike torch.load(p) this keeps _orig_mod."""\n    return m  # not m._orig_mod\n'
    assert _code_only(documented) == "def f ( m ) : return m"
