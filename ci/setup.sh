#!/usr/bin/env bash
# Installs every dependency of cpharness on a fresh Debian bookworm machine.
# Idempotent: when everything is present it prints one line and returns in seconds.
#   Debian: compilers, CMake, HDF5, fmt, nlohmann-json, GoogleTest, CLI11, OpenMPI, python3-h5py/jsonschema (tests),
#           python3-matplotlib (reports/render_html.py) and chromium (the headless-browser test of the page).
#   PyPI:   torch==2.11.0 into a virtual environment outside the source tree ($CPHARNESS_VENV).
set -euo pipefail
start=$(date +%s)
here=$(cd "$(dirname "$0")" && pwd)
venv="${CPHARNESS_VENV:-$HOME/.local/share/cpharness/venv}"
torch_version="2.11.0"
# libfmt-dev is kept for tools outside libtorch; targets that include libtorch use its bundled fmt headers
# header-only (see CMakeLists.txt).
debian_packages=(g++ cmake make libhdf5-dev nlohmann-json3-dev libfmt-dev libgtest-dev libcli11-dev
                 libopenmpi-dev openmpi-bin python3 python3-venv python3-h5py python3-jsonschema
                 python3-matplotlib chromium)
# A lighter install than `pip install torch` (measured: 1.7 GB instead of ~5 GB, about a minute on this
# network): the wheel's libraries (libtorch_cpu, c10, and libtorch_cuda / c10_cuda in the GPU build) find the CUDA
# runtime, cuBLAS, cuDNN and NCCL in the toolkit at /usr/local/cuda. `import torch` additionally needs the three
# runtime wheels below; the other CUDA wheels (triton, ...) only matter on a GPU, where the machine's own PyTorch
# is used.
torch_python_deps=(filelock typing-extensions "setuptools<82" sympy networkx jinja2 fsspec numpy)
torch_cuda_runtime=(nvidia-cusparselt-cu13==0.8.0 nvidia-nvshmem-cu13==3.4.5 nvidia-cufile==1.20.0.107)

missing=()
for p in "${debian_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing from Debian: ${missing[*]}"
  sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

have_torch=""
if [ -x "$venv/bin/python" ]; then
  have_torch=$("$venv/bin/python" -c 'import torch; print(torch.__version__)' 2>/dev/null || true)
fi
if [ "${have_torch%%+*}" != "$torch_version" ]; then
  echo "setup: installing torch==$torch_version into $venv"
  # The Debian python3 has venv; a pyenv or other interpreter on PATH works as well.
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  # ci/pip-quiet.sh: pip without its complaints about the CUDA wheels left out on purpose (above).
  "$here/pip-quiet.sh" "$venv/bin/pip" install -q --disable-pip-version-check --no-deps "torch==$torch_version"
  "$here/pip-quiet.sh" "$venv/bin/pip" install -q --disable-pip-version-check --no-deps "${torch_cuda_runtime[@]}"
  "$here/pip-quiet.sh" "$venv/bin/pip" install -q --disable-pip-version-check "${torch_python_deps[@]}"
  "$venv/bin/python" -c 'import torch; assert torch.__version__.split("+")[0] == "'"$torch_version"'"'
fi
echo "setup: ok in $(( $(date +%s) - start ))s (venv $venv, torch $("$venv/bin/python" -c 'import torch; print(torch.__version__)'))"
