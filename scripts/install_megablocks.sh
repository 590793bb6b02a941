#!/usr/bin/env bash
# Install MegaBlocks' kernels for `policy.moe_backend: megablocks` on your own CUDA machine.
#
#   bash scripts/install_megablocks.sh            # builds for the visible GPU's architecture
#   TORCH_CUDA_ARCH_LIST="9.0" bash scripts/...   # or for the architectures you name
#
# Needs: an installed CUDA build of torch, CUDA's nvcc matching it, a C++ compiler, triton (ships
# with CUDA torch wheels). Builds stanford-stk 0.7.1, grouped_gemm 0.3.0 and MegaBlocks 0.10.0 from
# their PyPI source archives against the torch you already have (a few minutes).
#
# Why --no-deps: MegaBlocks 0.10.0 pins torch==2.7.0 in its metadata, so letting pip resolve would
# replace your torch (and CUDA build) with 2.7.0; the kernels build and run fine against newer torch.
# Why --no-build-isolation: the extensions compile against *this* environment's torch headers.
set -euo pipefail
PY=${PYTHON:-python3}

$PY - <<'PY'
import sys, torch
if not torch.cuda.is_available() or torch.version.cuda is None:
    sys.exit("install_megablocks.sh: needs a CUDA build of torch and a visible GPU "
             f"(torch {torch.__version__}, cuda {torch.version.cuda})")
PY
command -v nvcc >/dev/null || { echo "install_megablocks.sh: nvcc not found (install the CUDA toolkit matching torch)"; exit 1; }

if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")
  export TORCH_CUDA_ARCH_LIST
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
cuda_major=$($PY -c "import torch; print(torch.version.cuda.split('.')[0])")
echo "torch $($PY -c 'import torch; print(torch.__version__)'), CUDA $cuda_major, arch $TORCH_CUDA_ARCH_LIST"

pipi() { $PY -m pip install --no-deps --no-build-isolation --no-binary "grouped_gemm,megablocks" "$@"; }

pipi "stanford-stk==0.7.1" "grouped_gemm==0.3.0"

if [ "$cuda_major" -ge 13 ]; then
  # CUDA 13's CUB dropped the `debug_synchronous` argument that MegaBlocks 0.10.0 still passes to
  # cub::DeviceScan; drop it from the call sites before building.
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  $PY -m pip download --no-deps --no-binary :all: -d "$work" "megablocks==0.10.0"
  tar xzf "$work"/megablocks-0.10.0.tar.gz -C "$work"
  perl -0pi -e 's/stream,\s*debug_synchronous\)\)/stream))/g' "$work"/megablocks-0.10.0/csrc/cumsum.h
  pipi "$work"/megablocks-0.10.0
else
  pipi "megablocks==0.10.0"
fi

$PY - <<'PY'
try:
    from r1lightning.moe import megablocks_status
except ImportError:  # the project itself is not installed here: check the kernels directly
    import grouped_gemm.backend, megablocks.ops  # noqa: F401
    print("megablocks kernels import")
else:
    ok, reason = megablocks_status()
    print("megablocks backend:", "available" if ok else "UNAVAILABLE: " + reason)
    raise SystemExit(0 if ok else 1)
PY
