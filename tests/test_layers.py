"""The floors of vptlab hold: import-linter's layers contract (pyproject.toml) passes, and every
module imports alone in a fresh interpreter (no import circle that the test order would hide)."""

from __future__ import annotations

import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import vptlab

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(
    m.name for m in pkgutil.walk_packages(vptlab.__path__, prefix="vptlab.")
)


def test_every_package_is_a_regular_package() -> None:
    """A folder without __init__.py is a namespace package, which import-linter cannot see."""
    folders = [p.parent for p in Path(vptlab.__file__).parent.rglob("*.py")]
    missing = sorted({str(f) for f in folders if not (f / "__init__.py").is_file()})
    assert missing == []


def test_the_layers_contract_holds() -> None:
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert lint is not None, "import-linter is a dev dependency: run scripts/setup.sh"
    done = subprocess.run([lint], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "0 broken" in done.stdout


def test_modules_are_found() -> None:
    assert {"vptlab.config", "vptlab.steps.resolve", "vptlab.engine.loop", "vptlab.cli"} <= set(
        MODULES
    )


# All modules in one fresh interpreter each would take minutes (torch's import is seconds):
# one child imports each module in its own interpreter state by clearing vptlab's modules first.
CHILD = """
import importlib, sys
failed = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "vptlab" or m.startswith("vptlab.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception as error:
        failed.append(f"{name}: {type(error).__name__}: {error}")
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


@pytest.mark.parametrize("chunk", range(2))
def test_every_module_imports_alone(chunk: int) -> None:
    """Each module imported first, with no vptlab module loaded before it (third-party modules
    stay cached: they are not what a circle runs through)."""
    names = MODULES[chunk::2]
    done = subprocess.run(
        [sys.executable, "-c", CHILD, *names], cwd=ROOT, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
