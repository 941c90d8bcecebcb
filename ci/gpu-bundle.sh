#!/usr/bin/env bash
# Packs what ci/gpu-check.sh needs on the GPU machine into one folder (default build-gpu-bundle/, git-ignored):
# the GPU build's binaries (stripped) and the few Debian runtime libraries the GPU image lacks (HDF5, libaec/sz,
# OpenMPI, CLI11 is header-only). libtorch, cuBLAS, cuDNN, NCCL and cudart are NOT packed: the GPU machine's own
# torch 2.11.0+cu130 provides them (same version, same ABI as the setup venv this was linked against).
#
#   ci/gpu-bundle.sh [BUILD_DIR] [BUNDLE_DIR]     BUILD_DIR: a -DCPHARNESS_CUDA=ON build (default build/)
#
# What travels is one xz tarball, BUNDLE_DIR/bundle.tar.xz (about 14 MB), beside the working tree: 64 MiB together at
# most, which the whole tree with the transformers goldens exceeds (ci/gpu-travel.sh says by how much and parks them).
# ci/gpu-check.sh unpacks it. It prints the tarball's size.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build="${1:-$root/build}"
out_dir="${2:-$root/build-gpu-bundle}"
bundle=$(mktemp -d)
trap 'rm -rf "$bundle"' EXIT
venv="${CPHARNESS_VENV:-$HOME/.local/share/cpharness/venv}"
mkdir -p "$bundle/bin" "$bundle/lib"

# Binaries: name -> path inside the build tree. A missing one is an error (the bundle must be complete).
binaries=(harness/cpharness harness/cpharness-core harness/gpu_tests kernels/cuda/cuda_attention_tests bench/bench_cuda_attention)
optional=(bench/bench_cp_step)
for b in "${binaries[@]}"; do
  [ -x "$build/$b" ] || { echo "gpu-bundle: $build/$b is missing (build with -DCPHARNESS_CUDA=ON first)" >&2; exit 1; }
  cp "$build/$b" "$bundle/bin/"
done
for b in "${optional[@]}"; do
  [ -x "$build/$b" ] && cp "$build/$b" "$bundle/bin/" || true
done
strip --strip-unneeded "$bundle"/bin/* 2>/dev/null || true

# Runtime libraries resolved outside the torch wheel and the CUDA toolkit: those the GPU image does not have.
torch_lib=$("$venv/bin/python" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
for b in "$bundle"/bin/*; do
  LD_LIBRARY_PATH="$torch_lib:/usr/local/cuda/lib64" ldd "$b" | awk '/=> \//{print $3}'
done | sort -u | while read -r lib; do
  case "$lib" in
    "$torch_lib"/*|/usr/local/cuda/*) continue ;;                  # from the GPU machine's torch / nvidia wheels
    */libc.so*|*/libm.so*|*/libdl.so*|*/librt.so*|*/libpthread.so*|*/ld-linux*|*/libgcc_s.so*|*/libstdc++.so*) continue ;;
    */libz.so*|*/libcrypto.so*|*/libssl.so*) continue ;;          # present on every image
  esac
  cp -L "$lib" "$bundle/lib/"
done
# OpenMPI loads its components at run time (not in ldd); the bundle runs single-process there (--comm local,
# nccl at world size 1), so only the libraries are packed.
cat > "$bundle/README" <<EOF
cpharness GPU bundle, built $(date -u +%Y-%m-%dT%H:%MZ) from $(git -C "$root" rev-parse --short=12 HEAD) against
torch $("$venv/bin/python" -c 'import torch; print(torch.__version__)'). Run through ci/gpu-check.sh.
EOF
rm -rf "$out_dir"
mkdir -p "$out_dir"
tar -C "$bundle" -cf - . | xz -T2 -6 > "$out_dir/bundle.tar.xz"
du -sh "$out_dir/bundle.tar.xz"
"$root/ci/gpu-travel.sh" size || true
