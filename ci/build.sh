#!/usr/bin/env bash
# Configures and builds cpharness against the libtorch of the setup venv (or $CMAKE_PREFIX_PATH if set).
# Usage: ci/build.sh [extra cmake args...]. Build tree: $CPHARNESS_BUILD_DIR (default build/).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build="${CPHARNESS_BUILD_DIR:-$root/build}"
venv="${CPHARNESS_VENV:-$HOME/.local/share/cpharness/venv}"
prefix="${CMAKE_PREFIX_PATH:-$("$venv/bin/python" -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')}"
cmake -S "$root" -B "$build" -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_BUILD_TYPE=RelWithDebInfo "$@" >"$build.configure.log" 2>&1 \
  || { cat "$build.configure.log"; exit 1; }
cmake --build "$build" -j "${CPHARNESS_JOBS:-2}"
