"""The package declares what its commands import; pytest from the root collects the right folder."""

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Import name -> distribution name, where they differ.
DISTRIBUTION = {"PIL": "pillow"}
# Imported only by the optional GPU kernels (the "triton" extra) and the step caches (the "cache" extra),
# and checked for before use.
OPTIONAL = {"triton", "cache_dit"}


def _declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = set()
    for requirement in project["dependencies"]:
        name = requirement.split(";")[0]
        for separator in "<>=!~[ ":
            name = name.split(separator)[0]
        names.add(name.lower())
    return names


def _third_party_imports(folder: Path) -> set[str]:
    modules = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    local = {"sdtm", "sdtm_kernels"}
    return {m for m in modules if m not in sys.stdlib_module_names and m not in local}


def test_every_third_party_import_is_a_declared_dependency():
    imported = _third_party_imports(ROOT / "sdtm") | _third_party_imports(ROOT / "sdtm_kernels")
    assert "matplotlib" in imported  # the demo's picture
    missing = {DISTRIBUTION.get(m, m).lower() for m in imported - OPTIONAL} - _declared()
    assert not missing, f"imported but not in pyproject's dependencies: {sorted(missing)}"


def _collected(*args: str) -> list[str]:
    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return [line for line in result.stdout.splitlines() if "::" in line]


def test_plain_pytest_collects_tests_and_benchmark_only_collects_benchmarks():
    plain = _collected()
    assert plain and all(line.startswith("tests/") for line in plain)
    benchmarks = _collected("--benchmark-only")
    assert benchmarks and all(line.startswith("benchmarks/") for line in benchmarks)
