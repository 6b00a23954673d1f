"""The repository's layout: no name of ours shadows an installed package, the top level shows the method, and the
imports flow one way.

The lesson behind the first test: `transformers` 5 imports Hugging Face's `kernels` package, and a folder of ours
named `kernels/` at the repository root (first on `sys.path` when a script or notebook runs there) was found first,
so every `transformers` model load failed. The check is on import names (`import X`), which are not always a
distribution's name (`pyyaml` installs `yaml`): `importlib.metadata.packages_distributions()` maps them.
"""
import ast
import importlib.metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOP_LEVEL_SCRIPTS = {"model", "config", "data", "train", "scores", "exact", "graft", "report"}
FOLDERS = {"checkpoint_io", "run_setup", "paper_report", "fused_kernels"}


def import_names(root):
    """The names `import X` finds in `root` when it is on sys.path: top-level modules and folders of Python files
    (regular packages, and namespace packages: a folder of .py files is importable without an __init__.py)."""
    names = {p.stem for p in root.glob("*.py")}
    names |= {d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".") and any(d.glob("*.py"))}
    return names


def clashes(root):
    """The import names of `root` that an installed distribution also provides, with the distributions."""
    installed = importlib.metadata.packages_distributions()
    return {name: installed[name] for name in import_names(root) if name in installed}


def test_no_name_of_ours_is_an_installed_import_name():
    assert clashes(ROOT) == {}, "rename these: an installed package has the same import name"


def test_the_clash_check_sees_a_kernels_folder(tmp_path):
    # The check fails for a folder named like an installed package: `torch` is always installed, and `kernels`
    # (Hugging Face's, which transformers 5 imports) where the test environment has it.
    for name in ["torch", "kernels"]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("")
    (tmp_path / "paper_report").mkdir()
    (tmp_path / "paper_report" / "claims.py").write_text("")
    found = clashes(tmp_path)
    assert "torch" in found and "paper_report" not in found
    if "kernels" in importlib.metadata.packages_distributions():
        assert "kernels" in found


def test_the_top_level_shows_the_method():
    # At most 9 top-level files, the design card's among them; everything else in a few named folders.
    top = {p.stem for p in ROOT.glob("*.py")}
    assert len(top) <= 9 and {"model", "data", "train", "scores", "graft"} <= top, sorted(top)
    assert top <= TOP_LEVEL_SCRIPTS, sorted(top - TOP_LEVEL_SCRIPTS)
    for folder in FOLDERS:
        assert (ROOT / folder / "__init__.py").is_file(), folder


def project_modules():
    """{dotted module name: path} of our source (top level and the folders), tests and benchmarks aside."""
    mods = {p.stem: p for p in ROOT.glob("*.py")}
    for folder in FOLDERS:
        mods |= {f"{folder}.{p.stem}": p for p in (ROOT / folder).glob("*.py") if p.stem != "__init__"}
    return mods


def imports_of(path, mods):
    """The project modules that `path` imports, anywhere in the file (function-level imports count too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        out |= {n for n in names if n in mods}
    return out


def test_imports_flow_one_way():
    mods = project_modules()
    graph = {m: imports_of(p, mods) - {m} for m, p in mods.items()}
    # No circle: repeatedly remove modules that import nothing left (Kahn's algorithm); what stays is a cycle.
    left = dict(graph)
    while True:
        leaves = [m for m, deps in left.items() if not deps & left.keys()]
        if not leaves:
            break
        for m in leaves:
            del left[m]
    assert not left, f"import cycle among {sorted(left)}"
    # The floors the design card names: the kernels import nothing of ours outside their folder; the model only
    # its config and the kernels (never the checkpoint folder); the data only the model's layer.
    for m, deps in graph.items():
        if m.startswith("fused_kernels."):
            assert all(d.startswith("fused_kernels.") for d in deps), (m, deps)
    assert {d.split(".")[0] for d in graph["model"]} <= {"config", "fused_kernels"}, graph["model"]
    assert graph["config"] == set()
    assert not {d for d in graph["data"] if d.split(".")[0] in {"train", "scores", "graft", "report", "exact"}}


def test_no_source_file_is_long():
    long = {str(p.relative_to(ROOT)): n for p in project_modules().values()
            if (n := len(p.read_text().splitlines())) > 420}
    assert long == {}, "split these files (each under about 420 lines)"


def test_docstrings_name_no_machine_path():
    # Files are named by their path in the repository, never by where one machine keeps it.
    for p in project_modules().values():
        text = p.read_text()
        assert "/home/" not in text and "/work/" not in text and "/Users/" not in text, p
