"""dvc.yaml's code deps cover what each stage runs: every module a stage's script imports,
directly or through other modules (function-local imports included), is a dep or lies in a
folder that is one. A stage missing a dep would not rerun when that code changes."""

import ast
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
OURS = ("hfedit", "pipelines", "stages")
# Edges that record, serve, start Ray, start the process (arguments, logging, exit status) or
# draw progress bars, and never change a stage's outputs (dvc.yaml says so).
EDGES = {"hfedit/__init__.py", "pipelines/__init__.py", "stages/__init__.py",
         "pipelines/tracking.py", "pipelines/serving.py", "pipelines/ray_runtime.py",
         "pipelines/entry.py", "hfedit/progress.py"}


def _module_file(name: str) -> Path | None:
    path = ROOT / name.replace(".", "/")
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else None


def import_closure(script: str) -> set[str]:
    """Files of ours that ``script`` imports, transitively, as repo-relative paths."""
    todo, seen = [ROOT / script], set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        if str(path.relative_to(ROOT)) in EDGES:
            continue  # an edge's own imports (serving's front door, say) are not the stage's
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                continue
            for name in names:
                parts = name.split(".")
                if parts[0] in OURS:
                    todo += [f for i in range(1, len(parts) + 1)
                             if (f := _module_file(".".join(parts[:i])))]
    return {str(p.relative_to(ROOT)) for p in seen}


def test_every_imported_module_is_a_stage_dep():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    missing = {}
    for name, stage in stages.items():
        script = next(w for w in stage["cmd"].split() if w.endswith(".py"))
        deps = [d if isinstance(d, str) else next(iter(d)) for d in stage["deps"]]
        uncovered = sorted(f for f in import_closure(script) - EDGES
                           if not any(f == d or f.startswith(d.rstrip("/") + "/") for d in deps))
        if uncovered:
            missing[name] = uncovered
    assert len(stages) >= 7
    assert not missing, f"add to these stages' deps in dvc.yaml: {missing}"


def test_closure_follows_function_local_imports(tmp_path):
    # stages/prepare.py imports the data package inside main(): the walk must see it
    assert "hfedit/data/prepared.py" in import_closure("stages/prepare.py")
