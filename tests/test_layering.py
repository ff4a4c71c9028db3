"""Import lint: the algorithms package never imports infrastructure (DESIGN.md, layer rule)."""

import ast
import pathlib
import subprocess
import sys

# never imported by instdiff's own sources
FORBIDDEN = {"ray", "pyarrow", "fsspec", "s3fs", "fastapi", "pipelines", "cluster", "boto3", "starlette"}
# never loaded at all by importing instdiff (third-party libraries may pull in others, e.g. boto3)
FORBIDDEN_LOADED = {"ray", "pyarrow", "fsspec", "s3fs", "fastapi", "pipelines", "cluster"}
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _imports(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_instdiff_sources_import_no_infrastructure():
    offenders = {}
    for path in (ROOT / "instdiff").rglob("*.py"):
        bad = _imports(path) & FORBIDDEN
        if bad:
            offenders[str(path.relative_to(ROOT))] = sorted(bad)
    assert not offenders, f"instdiff must stay free of infrastructure: {offenders}"


def test_importing_instdiff_loads_no_infrastructure():
    modules = [p.stem for p in (ROOT / "instdiff").glob("*.py") if p.stem != "__init__"]
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module('instdiff.' + m)\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {sorted(FORBIDDEN_LOADED)!r})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"instdiff imports pulled in: {out.stdout.strip()}"


def test_leaf_modules_import_nothing_heavy():
    """``instdiff.config``, ``errors`` and ``types`` are leaves: no torch, no diffusers, no other project module."""
    code = (
        "import sys\n"
        "import instdiff.config, instdiff.errors, instdiff.types\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers', 'numpy'))\n"
        "project = sorted(m for m in sys.modules if m.startswith(('instdiff.', 'pipelines', 'cluster')))\n"
        "print(','.join(heavy)); print(','.join(project))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    heavy, project = out.stdout.splitlines()
    assert heavy == "", f"leaf modules pulled in {heavy}"
    assert project == "instdiff.config,instdiff.errors,instdiff.types"


def test_every_project_error_derives_from_the_base():
    import inspect

    from instdiff import errors

    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, Exception)]
    assert len(classes) >= 8
    assert all(issubclass(c, errors.InstdiffError) for c in classes)
