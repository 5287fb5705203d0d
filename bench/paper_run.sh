#!/usr/bin/env bash
# The paper preset (issue 21) on a lent GPU, resumable across its 10-minute calls.
# Usage: OUT=dir bash bench/paper_run.sh STRUCTURE [MINUTES [more example arguments...]]
#   STRUCTURE: 4ake | 1ol5. MINUTES: this call's training time (--time-limit, default 5):
#   the simulation, compilation and autotuning, the epoch running at the limit and the final
#   evaluation come on top, inside the call's 600 s.
# Runs `examples/cryoem.py --preset paper --structure STRUCTURE --pose-init uniform --device
# cuda` in $TMPDIR or /tmp (its 1.3 GB particle stack never goes to $OUT). A checkpoint carried in
# runs/device/paper_STRUCTURE/ is resumed (the data set regenerates from its seed, bit for
# bit: tests/cryoem/test_cryoem_distributed.py, the time-limit test). $OUT/paper_STRUCTURE/
# gets every file of the run but the data set, and log.txt. Exit status: the example's
# (3: stopped by the time limit; go on in the next call).
# Between calls, here: `mkdir -p runs/device && cp -r FILES_AT/paper_STRUCTURE runs/device/`
# and name `runs/device` and `.whl` (bash bench/gpu_wheels.sh) in the call's `carry`.
# PRESET (default paper), DEVICE (default cuda) and CARRIED (the carried folder) override:
# PRESET=tiny DEVICE=cpu tries the protocol on a CPU (tests/cryoem/test_device_scripts.py).
set -u
cd "$(dirname "$0")/.."
source bench/device_env.sh  # PYTHONPATH, the carried wheels, has_modules, versions
structure=${1:?usage: OUT=dir bash bench/paper_run.sh STRUCTURE [MINUTES [args...]]}
minutes=${2:-5}
shift $(( $# < 2 ? $# : 2 ))
OUT=${OUT:-/tmp/fieldkern_gpu}
name=paper_$structure
run=${TMPDIR:-/tmp}/fieldkern_$name
carried=${CARRIED:-runs/device/$name}
dest=$OUT/$name
if ! has_modules mrcfile starfile gemmi; then
  echo "paper_run: mrcfile, starfile or gemmi missing: run bash bench/gpu_wheels.sh here and carry .whl" >&2
  exit 1
fi
rm -rf "$run" && mkdir -p "$run" "$dest"
args=(--preset "${PRESET:-paper}" --structure "$structure" --pose-init uniform --device "${DEVICE:-cuda}"
      --time-limit "$minutes" --no-progress --out "$run" "$@")
if [ -e "$carried/checkpoint.pt" ]; then
  cp "$carried"/checkpoint.pt "$run"/
  for f in "$carried"/stage*.mrc; do [ -e "$f" ] && cp "$f" "$run"/; done
  args+=(--resume)
fi
{ versions; echo "python examples/cryoem.py ${args[*]}"; } > "$dest/log.txt"
PYTHONUNBUFFERED=1 python examples/cryoem.py "${args[@]}" >> "$dest/log.txt" 2>&1
rc=$?
echo "exit status $rc" >> "$dest/log.txt"
find "$run" -maxdepth 1 -type f -exec cp {} "$dest"/ \;
tail -n 12 "$dest/log.txt"
exit $rc
