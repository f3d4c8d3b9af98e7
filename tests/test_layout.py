"""The shape of the code a newcomer carries on: imports go one way (stages -> pipelines ->
hfedit; the library never imports ray, mlflow or dvc, and no stage imports a Ray job module),
files stay under 500 lines, and ``import hfedit`` offers the public API cheaply."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = ("ray", "mlflow", "dvc")
JOBS = ("pipelines.pretrain_rectifier", "pipelines.train_edits", "pipelines.edit_ablation",
        "pipelines.edit_batch", "pipelines.batch_job", "pipelines.batch_actor")


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_the_library_never_imports_ray_mlflow_or_dvc():
    offenders = {str(p.relative_to(ROOT)): sorted(n for n in _imports(p)
                                                  if n.split(".")[0] in FORBIDDEN)
                 for p in (ROOT / "hfedit").rglob("*.py")}
    assert not {k: v for k, v in offenders.items() if v}


def test_no_stage_imports_a_ray_job_module():
    offenders = {p.name: sorted(n for n in _imports(p) if n.startswith(JOBS))
                 for p in (ROOT / "stages").glob("*.py")}
    assert not {k: v for k, v in offenders.items() if v}


def test_no_source_file_is_over_500_lines():
    files = [p for d in ("hfedit", "pipelines", "stages", "tests", "benchmarks")
             for p in (ROOT / d).rglob("*.py")]
    long = {str(p.relative_to(ROOT)): n for p in files
            if (n := len(p.read_text().splitlines())) > 500}
    assert not long


def test_import_hfedit_is_cheap_and_help_shows_the_public_api():
    probe = ("import sys, hfedit\n"
             "assert 'torch' not in sys.modules, 'import hfedit loaded torch'\n"
             "import hfedit.data.parquet\n"
             "assert 'torch' not in sys.modules, 'the Parquet reader loaded torch'\n"
             "help(hfedit)\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    import hfedit

    for name in ("HFEditPipeline", "load_backbone", "invert", "replay", "Editor", "Rectifier",
                 "load_config"):
        assert name in hfedit.__all__ and name in out.stdout
        assert getattr(hfedit, name).__module__.startswith("hfedit.")


def test_the_design_layout_names_every_module():
    """docs/DESIGN.md's Layout block lists each module of hfedit/ under its folder, and each
    module of pipelines/ and stages/ by name."""
    text = (ROOT / "docs" / "DESIGN.md").read_text()
    layout = text[text.index("## Layout"):text.index("## ", text.index("## Layout") + 3)]
    missing = [str(p.relative_to(ROOT)) for d in ("hfedit", "pipelines", "stages")
               for p in (ROOT / d).rglob("*.py")
               if p.name != "__init__.py" and p.name not in layout]
    folders = {p.parent.name for p in (ROOT / "hfedit").rglob("*.py")} - {"hfedit"}
    missing += [f"hfedit/{f}/" for f in folders if f"{f}/" not in layout]
    assert not missing, f"add to docs/DESIGN.md's Layout: {missing}"
