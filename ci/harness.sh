#!/usr/bin/env bash
# Runs the default suite and writes its reports under reports/out/. Builds first if needed.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build="${CPHARNESS_BUILD_DIR:-$root/build}"
if [ ! -x "$build/harness/cpharness" ]; then
  "$root/ci/setup.sh"
  "$root/ci/build.sh"
fi
mkdir -p "$root/reports/out"
exec "$build/harness/cpharness" run "$root/cases/default" --out "$root/reports/out" "$@"
