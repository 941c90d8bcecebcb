#!/usr/bin/env bash
# The test command: install dependencies, configure, build (-j2) and run every CTest test.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
# Each stage says how long it took, so that a slow CI run shows where its time went.
stage() { local start=$SECONDS; "$@"; echo "test.sh: $1 took $((SECONDS - start)) s"; }
stage "$root/ci/setup.sh"
# The layering of harness/layers.txt: no file includes a header from a layer above its own.
python3 "$root/ci/check-layering.py"
stage "$root/ci/build.sh"
cd "${CPHARNESS_BUILD_DIR:-$root/build}"
stage ctest --output-on-failure -j "${CPHARNESS_JOBS:-2}" --timeout 600
