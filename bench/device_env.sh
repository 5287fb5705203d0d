# Sourced by the lent-GPU scripts (bench/run_gpu.sh, bench/paper_run.sh) from the repo root.
# The device image lacks mrcfile, starfile and gemmi (simulate, load_particles, the example)
# and has no network: installed, where missing, from the wheels bench/gpu_wheels.sh fetches
# into .whl (name `.whl` in the call's `carry`).
export PYTHONPATH="$PWD:$PWD/bench${PYTHONPATH:+:$PYTHONPATH}"
has_modules() { local names="$*"; python -c "import ${names// /, }" 2> /dev/null; }  # has_modules mrcfile starfile
if ! has_modules mrcfile starfile gemmi && compgen -G ".whl/*.whl" > /dev/null; then
  python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/fieldkern_site \
    .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/fieldkern_site"
fi
versions() {
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  python -c "import mrcfile, starfile, gemmi; from importlib.metadata import version as v
print(*(f'{n} {v(n)}' for n in ('mrcfile', 'starfile', 'gemmi')))" 2> /dev/null ||
    echo "file libraries missing (bash bench/gpu_wheels.sh here, then carry .whl)"
}
