#!/usr/bin/env bash
# What travels to the GPU machine is the working tree (tracked files, untracked ones git does not ignore) plus the
# carried bundle, at most 64 MiB together. The transformers goldens (golden/hf-*/, ~33 MiB) are not read there (the
# GPU stages run cases/default, cases/gpu and the gpu tests), and with them the tree and the bundle are over the
# limit. This parks them outside the repository for the device call and brings them back after.
#
#   ci/gpu-travel.sh size       what would travel now, with the bundle (MiB), against the limit
#   ci/gpu-travel.sh park       move golden/hf-*/ to ../cpharness-parked/ (then: size, the device call, restore)
#   ci/gpu-travel.sh restore    move them back (git status is clean again; restore before committing anything)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
parked="$root/../cpharness-parked"
bundle="$root/build-gpu-bundle/bundle.tar.xz"
cd "$root"
case "${1:-size}" in
  size)
    tree=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } |
            while IFS= read -r -d '' f; do [ -f "$f" ] && stat -c %s "$f"; done | awk '{s += $1} END {print s + 0}')
    carried=$( [ -f "$bundle" ] && stat -c %s "$bundle" || echo 0)
    awk -v t="$tree" -v b="$carried" 'BEGIN {
      total = (t + b) / 1048576
      over = (total > 64)
      verdict = over ? ": over; run ci/gpu-travel.sh park" : ""
      printf "gpu-travel: working tree %.1f MiB + bundle %.1f MiB = %.1f MiB (limit 64 MiB)%s\n", t / 1048576, b / 1048576, total, verdict
      exit over }' ;;
  park)
    mkdir -p "$parked"
    for d in golden/hf-*/; do [ -d "$d" ] && mv "$d" "$parked/"; done
    # Also out of the index (staged as removed, nothing committed): whether the transfer to the GPU machine skips a
    # tracked file that is missing or refuses it, the parked files are then neither tracked nor present.
    git rm -r -q --cached --ignore-unmatch -- 'golden/hf-*' >/dev/null
    echo "gpu-travel: parked $(ls "$parked" | tr '\n' ' ')in $parked; ci/gpu-travel.sh restore brings them back" ;;
  restore)
    [ -d "$parked" ] || { echo "gpu-travel: nothing parked" >&2; exit 0; }
    for d in "$parked"/hf-*/; do [ -d "$d" ] && mv "$d" golden/; done
    git reset -q -- golden >/dev/null
    rmdir "$parked" 2>/dev/null || true
    git status --short golden | head -5 ;;
  *) echo "usage: ci/gpu-travel.sh size|park|restore" >&2; exit 2 ;;
esac
