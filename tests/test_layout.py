"""The package's layout: stages import one way, and the remote-code model files import nothing of the package."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ledit_convert"
# each stage may import the stages listed before it (and itself); the top level may import everything
ORDER = ["models", "conversion", "data", "inference", "evaluation", "training", "replication"]
EXCEPTIONS = {("training/periodic.py", "replication")}  # the shapes' structure metric, imported lazily


def package_imports(path: Path):
    """(stage imported, line) for every relative import of the package in a module, function-level included."""
    here = path.relative_to(PACKAGE).parts
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = list(here[:-1])[: len(here) - node.level]  # the package the import is relative to
            target = base + (node.module.split(".") if node.module else [])
            yield (target[0] if target else "", node.lineno)


def test_stages_import_one_way():
    bad = []
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).parts
        if len(parts) == 1 or parts[0] not in ORDER:
            continue  # cli.py, demo.py, errors.py, __init__.py sit on top
        stage = parts[0]
        allowed = set(ORDER[: ORDER.index(stage) + 1]) | {"errors", ""}
        rel = "/".join(parts)
        for target, line in package_imports(path):
            if target not in allowed and (rel, target) not in EXCEPTIONS:
                bad.append(f"{rel}:{line} imports {target}")
    assert not bad, bad


def test_remote_code_model_files_are_self_contained():
    for name, allowed in (("positions.py", set()), ("attention.py", {"positions"}),
                          ("dit.py", {"attention", "positions"}), ("pixart.py", {"attention", "dit", "positions"}),
                          ("sd3.py", {"attention", "dit", "positions"})):
        tree = ast.parse((PACKAGE / "models" / name).read_text())
        relative = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level}
        absolute = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        absolute |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level}
        assert relative <= allowed and "ledit_convert" not in absolute, (name, relative)
