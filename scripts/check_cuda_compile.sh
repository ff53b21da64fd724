#!/usr/bin/env bash
# Compile every csrc/cuda/*.cu with nvcc (-c, no link) for sm_80 and sm_90,
# against the installed torch's headers, to catch CUDA build errors on a
# machine without a GPU (or without a CUDA build of torch). Fails on the
# first error. Object files go to a temporary directory that is removed.
#
#   scripts/check_cuda_compile.sh            # all files
#   scripts/check_cuda_compile.sh route.cu   # some of them (names in csrc/cuda)
#
# Environment: NVCC (default: nvcc on PATH, else /usr/local/cuda/bin/nvcc),
# PYTHON (default: python), SOME_CUDA_ARCHS (default: "80 90"),
# NVCC_EXTRA (more flags, e.g. "-Werror all-warnings"),
# SOME_NVCC_CPP_EXTENSION_DEFINES=1 (also cpp_extension's __CUDA_NO_HALF*__ defines).
#
# The flags are those of this project's build (CMake with torch's config):
# --expt-relaxed-constexpr and --expt-extended-lambda (what torch's CMake
# config adds to CMAKE_CUDA_FLAGS), C++17, and the C++11 ABI setting torch
# was built with; no __CUDA_NO_HALF*__ defines (those are cpp_extension's).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
if [[ -z "${NVCC:-}" ]]; then
  if command -v nvcc >/dev/null 2>&1; then NVCC=nvcc; else NVCC=/usr/local/cuda/bin/nvcc; fi
fi
archs="${SOME_CUDA_ARCHS:-80 90}"

# Run python outside the repository so that `import torch` cannot pick up
# anything from the working tree.
read -r torch_inc torch_api_inc abi < <(cd / && "$PYTHON" -c '
import torch, torch.utils.cpp_extension as c
inc = c.include_paths()
print(inc[0], inc[1], int(torch._C._GLIBCXX_USE_CXX11_ABI))')

gencode=()
for a in $archs; do gencode+=("-gencode=arch=compute_${a},code=sm_${a}"); done

flags=(
  -std=c++17 -O3 -c
  "${gencode[@]}"
  --expt-relaxed-constexpr --expt-extended-lambda
  "-D_GLIBCXX_USE_CXX11_ABI=${abi}"
  -DTORCH_EXTENSION_NAME=_C
  -Xcompiler=-fPIC
  -I "$root/csrc" -isystem "$torch_inc" -isystem "$torch_api_inc"
)
# A CPU-only torch ships the c10/cuda headers but not their generated
# c10/cuda/impl/cuda_cmake_macros.h (it only defines C10_CUDA_BUILD_SHARED_LIBS,
# which matters for Windows exports); skip it there.
if [[ ! -f "$torch_inc/c10/cuda/impl/cuda_cmake_macros.h" ]]; then
  flags+=(-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE)
fi
# The real build (CMake with torch's config) adds no __CUDA_NO_HALF*__ defines;
# torch.utils.cpp_extension does: SOME_NVCC_CPP_EXTENSION_DEFINES=1 checks that way too.
if [[ "${SOME_NVCC_CPP_EXTENSION_DEFINES:-0}" == 1 ]]; then
  flags+=(-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
          -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__)
fi
# shellcheck disable=SC2206
if [[ -n "${NVCC_EXTRA:-}" ]]; then flags+=(${NVCC_EXTRA}); fi

if [[ $# -gt 0 ]]; then
  files=()
  for f in "$@"; do files+=("$root/csrc/cuda/$(basename "$f")"); done
else
  shopt -s nullglob
  files=("$root"/csrc/cuda/*.cu)
fi
if [[ ${#files[@]} -eq 0 ]]; then
  echo "check_cuda_compile: no csrc/cuda/*.cu files" >&2
  exit 1
fi

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
"$NVCC" --version | tail -n 1
echo "archs: $archs; torch headers: $torch_inc"
status=0
for f in "${files[@]}"; do
  name="$(basename "$f" .cu)"
  start=$SECONDS
  if "$NVCC" "${flags[@]}" "$f" -o "$out/$name.o"; then
    echo "ok    $name.cu ($((SECONDS - start)) s, $(stat -c %s "$out/$name.o") bytes)"
  else
    echo "FAIL  $name.cu" >&2
    status=1
  fi
done
exit $status
