#!/usr/bin/env bash
# Exports the Hugging Face goldens of one transformers version into golden/hf-<VERSION>/.
#
#   golden/export_hf.sh VERSION [--cpharness BIN] [--out DIR]
#
# Makes (once) a virtual environment ~/.local/share/cpharness/hf-<VERSION> with transformers==VERSION from PyPI.
# It does not download torch again: the environment reuses the pinned torch 2.11.0 of the setup venv
# ($CPHARNESS_VENV, default ~/.local/share/cpharness/venv) through a .pth file, and transformers' own
# dependencies are installed with pip, which sees that torch and leaves it alone.
# Then records the inputs of the cases in cases/hf/ with the C++ side (cpharness golden record) and runs
# golden/export_hf.py on them. Refreshing goldens this way is an explicit, reviewable commit.
set -euo pipefail
[[ $# -ge 1 ]] || { echo "usage: golden/export_hf.sh VERSION [--cpharness BIN] [--out DIR]" >&2; exit 2; }
version=$1; shift
root=$(cd "$(dirname "$0")/.." && pwd)
bin="$root/build/harness/cpharness"
out="$root/golden/hf-$version"
while [[ $# -gt 0 ]]; do
  case $1 in
    --cpharness) bin=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "export_hf.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
base="${CPHARNESS_VENV:-$HOME/.local/share/cpharness/venv}"
env_dir="${CPHARNESS_HF_VENV_ROOT:-$HOME/.local/share/cpharness}/hf-$version"
[[ -x "$base/bin/python" ]] || { echo "export_hf.sh: no setup venv at $base (run ci/setup.sh)" >&2; exit 2; }
[[ -x "$bin" ]] || { echo "export_hf.sh: no cpharness binary at $bin (run ci/build.sh)" >&2; exit 2; }

if [[ ! -f "$env_dir/.ready" ]]; then
  "$base/bin/python" -m venv "$env_dir"
  site_base=$("$base/bin/python" -c 'import site; print(site.getsitepackages()[0])')
  site_new=$("$env_dir/bin/python" -c 'import site; print(site.getsitepackages()[0])')
  echo "$site_base" > "$site_new/cpharness-torch.pth"   # torch (and numpy) from the setup venv
  "$env_dir/bin/python" -m pip install -q --upgrade pip
  "$env_dir/bin/python" -m pip install -q "transformers==$version" h5py
  "$env_dir/bin/python" - <<'PY'
import torch, transformers
assert torch.__version__.startswith("2.11.0"), f"expected the pinned torch 2.11.0, got {torch.__version__}"
print(f"transformers {transformers.__version__}, torch {torch.__version__} ({torch.__file__})")
PY
  touch "$env_dir/.ready"
fi

mkdir -p "$out"
inputs=$(mktemp -d)
trap 'rm -rf "$inputs"' EXIT
for case_file in "$root"/cases/hf/*.json; do
  id=$(basename "$case_file" .json)
  "$bin" golden record "$case_file" -o "$inputs/$id.h5" --force >/dev/null
done
# The checkpoints of the three models go through save_pretrained too (the C++ loader and cases/checkpoints use them); on a cache-gated
# version (5.5.0/5.5.1) the models with KV sharing are also exported with use_cache=False (the dead-K/V bug).
"$env_dir/bin/python" "$root/golden/export_hf.py" --inputs "$inputs" --out "$out" --no-cache-variant --packed-by-positions \
  --save-pretrained tiny-e2b-hf --save-pretrained tiny-e4b-hf --save-pretrained tiny-31b-hf
du -sh "$out"
