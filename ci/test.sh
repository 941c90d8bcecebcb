#!/usr/bin/env bash
# The test command: install dependencies, configure, build (-j2) and run every CTest test.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/ci/setup.sh"
# The layering of harness/layers.txt: no file includes a header from a layer above its own.
python3 "$root/ci/check-layering.py"
"$root/ci/build.sh"
cd "${CPHARNESS_BUILD_DIR:-$root/build}"
ctest --output-on-failure -j "${CPHARNESS_JOBS:-2}" --timeout 600
