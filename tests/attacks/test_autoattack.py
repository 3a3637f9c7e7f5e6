"""AutoAttack through torchattacks is an optional extra: importing vptlab never needs it, and its
absence is one clear error. Its contract (budget, modes, seeding) is checked in test_registry.py."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vptlab.attacks import create_attack
from vptlab.errors import ConfigError


def test_without_torchattacks_is_one_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchattacks", None)  # import torchattacks -> ImportError
    with pytest.raises(ConfigError, match=r"needs the torchattacks package.*vptlab\[attacks\]"):
        create_attack("autoattack", eps=0.1)


def test_square_without_pyautoattack_is_one_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyautoattack", None)
    with pytest.raises(ConfigError, match=r"pyautoattack package.*vptlab\[attacks\]") as err:
        create_attack("square", eps=0.1)
    assert "\n" not in str(err.value)


def test_vptlab_imports_without_torchattacks():
    code = (
        "import sys; sys.modules['torchattacks'] = None; sys.modules['pyautoattack'] = None\n"
        "import vptlab, vptlab.attacks, vptlab.cli\n"
        "vptlab.attacks.create_attack('pgd', eps=0.1)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)

