#!/usr/bin/env bash
# The one prepared command for a GPU machine (../shared/gpu.md): environment checks, the `gpu` tests, the
# real-size cases and the benchmarks, every figure written as JSON into OUT_DIR (default reports/gpu/), ready to
# commit. It runs the bundle that ci/gpu-bundle.sh packed on a CPU machine (build-gpu-bundle/), against the GPU
# machine's own torch 2.11.0+cu130 libraries.
#
#   ci/gpu-check.sh [--out DIR] [--stages env,kernels,suite,bench,cases] [--quick] [--no-peers] [--peer-args "..."] [--dry-run]
#
# Stages: env (nvidia-smi, torch, library resolution), kernels (the `gpu` tests: CUDA attention and the harness on
# CUDA), suite (cases/default on CUDA, ranks as threads and as processes), bench (attention kernel vs FlexAttention / SDPA), cases
# (cases/gpu, the real-size cases, ranks as threads; CASES="file ..." picks some).
#
# CUDA_ATTENTION=kernel-fp32 (or ops) runs the suite and cases stages without the tensor-core kernels.
# --quick: the attention benchmark at S 8k only; --no-peers: without FlexAttention / SDPA (their compiles take minutes).
#
# --dry-run (on a CPU machine): checks the bundle and the library resolution, runs every stage that needs no GPU
# with GPU tests reported as skipped, and prints the commands it would run. Exit code: 0 when every stage that
# ran passed, 1 otherwise. A log of everything goes to OUT_DIR/gpu-check.log.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out="$root/reports/gpu"
stages="env,kernels,suite,bench,cases"
# The harness's attention on CUDA for the suite and cases stages: kernel (bf16/fp16 on tensor cores), kernel-fp32
# (the fp32 CUDA-core kernels: the fallback if the tensor-core ones fail the kernels stage) or ops.
attention="${CUDA_ATTENTION:-kernel}"
quick=0
dry=0
peers=1
peer_args=""
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --stages) stages="$2"; shift 2 ;;
    --quick) quick=1; shift ;;
    --dry-run) dry=1; shift ;;
    --no-peers) peers=0; shift ;;
    --peer-args) peer_args="$2"; shift 2 ;;
    *) echo "gpu-check: unknown argument $1" >&2; exit 2 ;;
  esac
done
mkdir -p "$out"
# The bundle: ci/gpu-bundle.sh's tarball, unpacked once per machine (or an unpacked folder named by CPHARNESS_GPU_BUNDLE).
bundle="${CPHARNESS_GPU_BUNDLE:-}"
if [ -z "$bundle" ]; then
  tarball="$root/build-gpu-bundle/bundle.tar.xz"
  [ -f "$tarball" ] || { echo "gpu-check: no $tarball: run ci/gpu-bundle.sh on a CPU machine first" >&2; exit 2; }
  bundle="${TMPDIR:-/tmp}/cpharness-gpu-bundle"
  rm -rf "$bundle" && mkdir -p "$bundle" && xz -dc "$tarball" | tar -C "$bundle" -xf - || { echo "gpu-check: cannot unpack $tarball" >&2; exit 2; }
fi
log="$out/gpu-check.log"
: > "$log"
say() { echo "gpu-check: $*" | tee -a "$log" >&2; }
has_stage() { [[ ",$stages," == *",$1,"* ]]; }

# The Python with the machine's torch: the GPU image's venv, else the setup venv (CPU machines, dry run).
python=""
for p in "${CPHARNESS_GPU_PYTHON:-}" /opt/torch/.venv/bin/python "$HOME/.local/share/cpharness/venv/bin/python" python3; do
  [ -n "$p" ] && command -v "$p" >/dev/null 2>&1 && "$p" -c 'import torch' 2>/dev/null && { python="$p"; break; }
done
[ -n "$python" ] || { say "no Python with torch found"; exit 2; }
# libtorch and the nvidia-* wheels (cuBLAS, cuDNN, NCCL, cudart) of that torch, then the bundle's Debian libraries.
libpath=$("$python" - <<'EOF'
import glob, os, torch
site = os.path.dirname(os.path.dirname(torch.__file__))
dirs = [os.path.join(os.path.dirname(torch.__file__), "lib")]
dirs += sorted({os.path.dirname(p) for p in glob.glob(os.path.join(site, "nvidia", "**", "*.so*"), recursive=True)})
print(":".join(dirs))
EOF
)
export LD_LIBRARY_PATH="$libpath:$bundle/lib:/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
bin="$bundle/bin"
[ -d "$bin" ] || { say "no bundle at $bundle: run ci/gpu-bundle.sh on a CPU machine first"; exit 2; }
cat "$bundle/README" 2>/dev/null | tee -a "$log"

failed=()
run_stage() {  # name, command...: runs it, logs it, records a failure
  local name="$1"; shift
  say "[$name] $*"
  local t0=$(date +%s)
  "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  say "[$name] exit $rc in $(( $(date +%s) - t0 ))s"
  # A dry run on a CPU machine: exit 3 (every case skipped: no CUDA device) is the expected outcome.
  if [ "$dry" -eq 1 ] && [ "$rc" -eq 3 ]; then return 0; fi
  [ "$rc" -eq 0 ] || failed+=("$name:$rc")
  return 0
}

if has_stage env; then
  run_stage env-nvidia-smi bash -c 'command -v nvidia-smi >/dev/null && nvidia-smi || echo "no nvidia-smi"'
  run_stage env-torch "$python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
"available", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")'
  for b in "$bin"/*; do
    missing=$(ldd "$b" | grep 'not found' || true)
    [ -z "$missing" ] || { say "unresolved libraries in $b:"; echo "$missing" | tee -a "$log"; failed+=("ldd:$(basename "$b")"); }
  done
  [ -x "$bin/cpharness" ] && run_stage env-cpharness "$bin/cpharness" --help
fi

gpu_name=$("$python" -c 'import torch; print(torch.cuda.get_device_name().replace(" ", "-") if torch.cuda.is_available() else "no-gpu")' 2>/dev/null || echo no-gpu)
stamp="$(date -u +%Y-%m-%d)-${gpu_name}"

if has_stage kernels; then
  # The CUDA attention tests: host checks and every GPU test (skipped, never passed, without a device).
  run_stage kernels-host "$bin/cuda_attention_tests" --gtest_brief=1 --gtest_filter='CudaAttentionHost.*'
  run_stage kernels-gpu "$bin/cuda_attention_tests" --gtest_brief=1 --gtest_filter='CudaAttentionGpu.*' \
    --gtest_output="xml:$out/$stamp-cuda-attention-tests.xml"
  run_stage harness-gpu "$bin/gpu_tests" --gtest_brief=1 --gtest_output="xml:$out/$stamp-harness-gpu-tests.xml"
fi

if has_stage suite; then
  # The default suite on CUDA: reference and candidates on the GPU, every check as on the CPU. Ranks as threads on
  # this GPU (--comm local, each case's own cp sizes), then as one process per rank (mpirun, device tensors
  # host-staged, every rank on this GPU).
  run_stage suite-cuda-threads "$bin/cpharness" run "$root/cases/default" --device cuda --cuda-attention "$attention" --timeout 300 \
    --report "$out/$stamp-default-suite-cuda-threads.json" --junit "$out/$stamp-default-suite-cuda-threads.xml"
  run_stage suite-cuda-mpi2 "$bin/cpharness" run "$root/cases/default" --device cuda --cuda-attention "$attention" --comm mpi --nproc 2 \
    --timeout 300 --report "$out/$stamp-default-suite-cuda-cp2.json" --junit "$out/$stamp-default-suite-cuda-cp2.xml"
  run_stage suite-cuda-ops "$bin/cpharness" run "$root/cases/default/e4b-pattern.json" --device cuda --cuda-attention ops \
    --comm mpi --nproc 2 --timeout 300 --report "$out/$stamp-e4b-pattern-cuda-ops.json"
fi

if has_stage bench; then
  if [ "$dry" -eq 1 ]; then
    say "[bench] dry run: would run bench/flex_attention_peer.py --bin $bin/bench_cuda_attention"
  else
    # --quick: the tensor-core and fp32 kernels side by side at S 8k.
    q=(); [ "$quick" -eq 1 ] && q=(--quick --kernels both)
    [ "$peers" -eq 0 ] && q+=(--no-peers)
    # shellcheck disable=SC2206
    [ -n "$peer_args" ] && q+=($peer_args)
    run_stage bench-attention env PYTHONUNBUFFERED=1 "$python" "$root/bench/flex_attention_peer.py" \
      --bin "$bin/bench_cuda_attention" --json "$out/$stamp-attention.json" "${q[@]}"
  fi
fi

if has_stage cases; then
  # The real-size cases, ranks as threads on this GPU (one shared copy of the weights, each rank its own stream and
  # gradients), each case its own report so that one that does not fit leaves the others' figures. CASES (a
  # space-separated list of case files) picks some; default every file in cases/gpu, smallest first.
  for case_file in ${CASES:-$root/cases/gpu/e2b.json $root/cases/gpu/31b.json $root/cases/gpu/e4b.json}; do
    name=$(basename "$case_file" .json)
    run_stage "case-$name" "$bin/cpharness" run "$case_file" --device cuda --cuda-attention "$attention" --timeout 1200 \
      --report "$out/$stamp-case-$name.json" --junit "$out/$stamp-case-$name.xml"
  done
fi

if [ ${#failed[@]} -gt 0 ]; then
  say "failed stages: ${failed[*]}"
  exit 1
fi
say "every stage passed (figures in $out)"
