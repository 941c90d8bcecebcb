#!/usr/bin/env bash
# Runs pip ("$@": the pip executable and its arguments) with its resolver's complaints about packages left out on
# purpose filtered from stderr: ci/setup.sh installs torch without its CUDA wheels, and pip then prints
# "torch requires nvidia-... which is not installed", which a new user reads as a failure. Everything else pip
# prints, and its exit status, are kept.
set -uo pipefail
log=$(mktemp)
trap 'rm -f "$log"' EXIT
"$@" 2>"$log"
rc=$?
grep -v -e "dependency resolver does not currently take into account" -e "which is not installed" "$log" >&2
exit "$rc"
