"""The package's shape: what imports what, what installs where, and what loading a part costs.

The parts a user swaps (encoders, connectors) and the pure losses depend only on the small contract modules;
loading a saved model loads no training code; no module imports a higher layer, and no imports go round in a
circle. Read from the source with ``ast``, so that a lazy import inside a function counts too.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# source folder -> the installed package it becomes
FOLDERS = {"mmpost": "mmpost", "encoders": "mmpost.encoders", "connectors": "mmpost.connectors"}
CONTRACT = {"mmpost", "mmpost.interfaces", "mmpost.registry", "mmpost.weights"}
# lower part -> higher parts it must never import
NEVER = {
    "mmpost.model": ("mmpost.quant", "mmpost.training", "mmpost.stages", "mmpost.data", "mmpost.synthetic"),
    "mmpost.data": ("mmpost.stages", "mmpost.training", "mmpost.synthetic", "mmpost.quant"),
    "mmpost.training": ("mmpost.stages", "mmpost.synthetic", "mmpost.export", "mmpost.quant"),
    "mmpost.config": ("mmpost.stages", "mmpost.training", "mmpost.model", "mmpost.data"),
    "mmpost.export": ("mmpost.stages", "mmpost.training", "mmpost.synthetic"),
    "mmpost.quant": ("mmpost.stages", "mmpost.training", "mmpost.synthetic"),
}


def modules() -> dict[str, Path]:
    """Every module of the installed package, by its dotted name."""
    found = {}
    for folder, package in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The package modules ``path`` imports (anywhere in the file), as dotted names of modules that exist."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in names if name in known}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports_of(path, set(found)) - {name} for name, path in found.items()}


def test_every_package_folder_is_installed(graph):
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {name for name, path in modules().items() if path.name == "__init__.py"}
    assert packages == listed
    folders = {p.parent for p in ROOT.joinpath("mmpost").rglob("*.py")}
    assert all((f / "__init__.py").is_file() for f in folders), "every folder of mmpost/ is a regular package"


def test_swappable_parts_and_losses_import_only_the_contract_modules(graph):
    for name, imported in graph.items():
        if name.startswith(("mmpost.encoders", "mmpost.connectors")):
            own = "mmpost.encoders" if name.startswith("mmpost.encoders") else "mmpost.connectors"
            assert {m for m in imported if not m.startswith(own)} <= CONTRACT, (name, imported)
        if name.startswith("mmpost.losses"):
            assert not {m for m in imported if not m.startswith("mmpost.losses")}, (name, imported)


@pytest.mark.parametrize("lower", sorted(NEVER))
def test_no_part_imports_a_higher_one(graph, lower):
    for name, imported in graph.items():
        if name == lower or name.startswith(lower + "."):
            bad = sorted(m for m in imported if m.startswith(NEVER[lower]))
            assert not bad, f"{name} imports {bad}"


def test_no_import_cycle(graph):
    done: set[str] = set()

    def visit(name: str, trail: list[str]) -> None:
        if name in trail:
            cycle = trail[trail.index(name) :] + [name]
            # a package's __init__ importing its own submodules is not a cycle between files
            if not all(b.startswith(a + ".") or a.startswith(b + ".") for a, b in zip(cycle, cycle[1:], strict=False)):
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            return
        if name in done:
            return
        for child in sorted(graph[name]):
            visit(child, [*trail, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


def loaded_after(code: str) -> list[str]:
    script = f"import sys\n{code}\nprint(sorted(m for m in sys.modules if m.startswith('mmpost')))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd="/")
    return eval(out.stdout.strip().splitlines()[-1])  # a printed list of strings


def test_importing_an_encoder_loads_only_the_contract_modules():
    loaded = set(loaded_after("import mmpost.encoders.timm_vision"))
    assert loaded - {"mmpost.encoders", "mmpost.encoders.timm_vision"} <= CONTRACT, loaded


def test_loading_a_saved_model_loads_no_training_code(finished_model):
    loaded = loaded_after(f"import mmpost\nmmpost.load({str(finished_model)!r})")
    assert not [m for m in loaded if m.startswith(("mmpost.training", "mmpost.stages", "mmpost.data"))], loaded


@pytest.fixture(scope="module")
def finished_model(tmp_path_factory, llm_dir, clip_dir):
    import mmpost

    model = mmpost.LMM(
        llm=str(llm_dir),
        encoders={"image": mmpost.encoder("hf_vision", path=str(clip_dir))},
        connectors={"image": mmpost.connector("mlp")},
    )
    path = tmp_path_factory.mktemp("saved") / "model"
    model.save(path)
    return path


def test_every_stage_is_built_from_its_config_by_one_function():
    """``mmpost train``, the demo and the tools all call ``build_stage``; no other code constructs a stage."""
    constructs, builds = [], []
    for path in [*ROOT.joinpath("mmpost").rglob("*.py"), *ROOT.joinpath("tools").glob("*.py")]:
        text, rel = path.read_text(), path.relative_to(ROOT).as_posix()
        if "STAGES.build(" in text or re.search(r"STAGES\.get\([^)]*\)\(", text):
            constructs.append(rel)
        if "build_stage(cfg)" in text:
            builds.append(rel)
    assert constructs == ["mmpost/stages/__init__.py"]
    assert {"mmpost/cli.py", "mmpost/demo.py", "tools/bench.py", "tools/connector_table.py"} <= set(builds)
