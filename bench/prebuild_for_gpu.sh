#!/usr/bin/env bash
# Builds the compiled extension on this machine (no GPU needed) for the GPU machine's Python and
# torch, into .gpu_prebuilt/ (git ignores it), so that gpu_check.sh's build step copies it there
# instead of compiling for a minute or more of the lease. Send it along with the run (the device
# tool's carry: [".gpu_prebuilt"]). gpu_check.sh uses it only where its id (bench/prebuilt.py:
# sources, Python, torch build, CUDA archs) is the machine's own and it loads with its CUDA ops;
# otherwise it builds as before.
#
#   PYTHON=/path/to/python bench/prebuild_for_gpu.sh
#
# PYTHON: the GPU machine's Python minor version with its exact torch. For the H200 machine of
# 2026-11 (Python 3.12, torch 2.11.0+cu130, which is also the default torch 2.11.0 wheel), a
# Python 3.12 venv with `pip install torch==2.11.0 setuptools==81.* wheel ninja` does; nvcc of
# torch's major CUDA version must be found (CUDA_HOME, else `nvcc --dryrun`, as setup.py does).
# MAX_JOBS (default 2) sets the compile jobs. 40 s on the 2-core development machine (2026-11-29).
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO"
PY="${PYTHON:?set PYTHON to an interpreter with the Python and torch of the GPU machine}"
OUT="$REPO/.gpu_prebuilt"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# A copy of the tree as it would travel (tracked and untracked files git does not ignore): the
# build writes build/ and the .so into the tree it builds, and this one stays as it is.
mkdir "$WORK/src"
# (--ignore-failed-read: a tracked file deleted in the working tree does not travel either)
git ls-files -z --cached --others --exclude-standard \
    | tar --null --ignore-failed-read -T - -cf - | tar -xf - -C "$WORK/src"
ID="$("$PY" "$WORK/src/bench/prebuilt.py")"
echo "building for: $ID"
# The flags of gpu_check.sh's own build step.
env TORCH_CUDA_ARCH_LIST="$("$PY" "$WORK/src/bench/prebuilt.py" --archs)" \
    EM_KERNELS_REQUIRE_CUDA=1 MAX_JOBS="${MAX_JOBS:-2}" \
    "$PY" -m pip wheel -q --no-build-isolation --no-deps -w "$WORK/wheel" "$WORK/src"
(cd "$WORK/wheel" && "$PY" -m zipfile -e ./*.whl "$WORK/unpacked")
LIBRARY="$(ls "$WORK"/unpacked/em_kernels/_C*.so)"

# It must load beside the sources, with both parts registered (its CUDA part cannot run here).
cp "$LIBRARY" "$WORK/src/em_kernels/"
(cd "$WORK/src" && "$PY" -c "
import sys, torch, em_kernels
status = em_kernels.available_backends()
print('backends here:', status)
if status['cpu'] != 'available' or not hasattr(torch.ops.em_C, 'em_inf_adjust'):
    sys.exit('the prebuilt extension does not load with its ops')
if 'without its CUDA part' in status['cuda']:
    sys.exit('the prebuilt extension has no CUDA part')
")

rm -rf "$OUT"
mkdir -p "$OUT"
cp "$LIBRARY" "$OUT/"
echo "$ID" > "$OUT/build-id"
echo "wrote $OUT: $(basename "$LIBRARY") ($(du -h "$LIBRARY" | cut -f1)), build-id: $ID"
