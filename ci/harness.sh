#!/usr/bin/env bash
# Runs the default suite and writes its reports under reports/out/ (report.json, report.xml, report.html).
# Builds first if needed. Exit code: cpharness's (0 pass, 1 a check failed, 2 error, 3 no check ran); 2 as well
# when the run passed but its page could not be rendered.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build="${CPHARNESS_BUILD_DIR:-$root/build}"
out="$root/reports/out"
if [ ! -x "$build/harness/cpharness" ] || [ ! -x "$build/harness/cpharness-core" ]; then
  "$root/ci/setup.sh"
  "$root/ci/build.sh"
fi
mkdir -p "$out"
rc=0
"$build/harness/cpharness" run "$root/cases/default" --out "$out" "$@" || rc=$?
# The page, unless cpharness has already written it for this report.
if [ -f "$out/report.json" ] && { [ ! -f "$out/report.html" ] || [ "$out/report.json" -nt "$out/report.html" ]; }; then
  if ! "$root/reports/render_html.py" "$out/report.json" -o "$out/report.html"; then
    echo "harness: report.html not written (see the line above)" >&2
    [ "$rc" -eq 0 ] && rc=2
  fi
fi
exit "$rc"
