#!/usr/bin/env bash
# Fetch, here (where pip reaches PyPI), the wheels of fieldkern's file libraries for the lent
# GPU machine, which has torch, triton, numpy, pandas, pyarrow, matplotlib and tqdm but not
# these, and no network (../.library/device/KINDS.md): mrcfile (MRC maps and stacks),
# starfile (RELION STAR files) and gemmi (structure -> density). Without them simulate(),
# load_particles() and examples/cryoem.py fail there, and so does run_gpu.sh's `paper` step.
# Usage: bash bench/gpu_wheels.sh  (writes .whl/, git-ignored, ~3 MB), then name `.whl` in
# the device call's `carry`; bench/run_gpu.sh installs them when it finds them.
# The versions are the ones the CPU tests ran with (2026-12-04); the device's Python is 3.12.
set -euo pipefail
cd "$(dirname "$0")/.."
PY_VERSION=${PY_VERSION:-3.12}
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl mrcfile==1.5.4 starfile==0.5.13 gemmi==0.7.5
ls -l .whl
