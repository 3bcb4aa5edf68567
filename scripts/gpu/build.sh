#!/usr/bin/env bash
# Builds `ferrotune` with `--features cuda,nccl` on a machine without a GPU (and without a system
# CUDA toolkit): the CUDA compiler and libraries come from PyPI wheels, NCCL from the
# `nvidia-nccl-cu13` wheel (the one PyTorch installs), `libcuda.so` (only linked against; the GPU
# machine's driver provides the real one) from Debian's non-free `libcuda1`.
#
# FERROTUNE_GPU_FEATURES picks the features (default `cuda,nccl`; `cuda` alone builds a binary
# that does not need libnccl). FERROTUNE_GPU_CARGO=check (or clippy) only checks (no binary).
#
# Output: target/gpu/ferrotune (stripped) and target/gpu-carry/ferrotune.xz, the copy to carry to
# the GPU machine (`carry: ["target/gpu-carry"]`), where scripts/gpu/check.sh and
# scripts/gpu/nccl_check.sh unpack and run it. The binary links libnccl.so.2 dynamically (candle's
# cudarc links, it does not dlopen): on the GPU machine PyTorch's nvidia/nccl/lib must be on
# LD_LIBRARY_PATH, which both check scripts arrange.
#
# Pins: CUDA 13.0 to match the GPU machine's driver. nvvm is pinned because the newest one emits a
# PTX version the 13.0 ptxas rejects.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
ENV=${FERROTUNE_GPU_ENV:-$ROOT/target/gpu-env}
mkdir -p "$ENV" target/gpu

if [ ! -x "$ENV/venv/bin/python" ]; then
  python3 -m venv "$ENV/venv"
fi
if [ ! -f "$ENV/venv/.cuda-13.0-ok" ]; then
  "$ENV/venv/bin/pip" install -q \
    "nvidia-cuda-nvcc==13.0.88" "nvidia-nvvm==13.0.88" "nvidia-cuda-runtime==13.0.*" \
    "nvidia-cuda-crt==13.0.*" "nvidia-cuda-cccl==13.0.*" "nvidia-cuda-nvrtc==13.0.*" \
    "nvidia-cublas==13.0.*" "nvidia-curand" "nvidia-nccl-cu13"
  touch "$ENV/venv/.cuda-13.0-ok"
fi
CU=$(echo "$ENV"/venv/lib/python3*/site-packages/nvidia/cu13)
[ -d "$CU" ] || { echo "build.sh: no nvidia/cu13 folder in $ENV/venv" >&2; exit 1; }
NCCL_LIB=$(echo "$ENV"/venv/lib/python3*/site-packages/nvidia/nccl/lib)

# The wheels ship versioned sonames only; the linker wants the plain names.
for dir in "$CU/lib" "$NCCL_LIB"; do
  [ -d "$dir" ] || continue
  for so in "$dir"/*.so.*; do
    base=${so%%.so.*}.so
    [ -e "$base" ] || ln -s "$(basename "$so")" "$base"
  done
done

# libcuda.so from Debian's libcuda1 (non-free), unpacked, never installed.
if [ ! -e "$ENV/libcuda/libcuda.so" ]; then
  mkdir -p "$ENV/apt/lists/partial" "$ENV/deb"
  printf 'deb http://deb.debian.org/debian bookworm main contrib non-free\n' >"$ENV/apt/sources.list"
  apt_opts=(-o "Dir::Etc::SourceList=$ENV/apt/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
            -o "Dir::State::Lists=$ENV/apt/lists" -o "Debug::NoLocking=1")
  apt-get "${apt_opts[@]}" update -qq
  (cd "$ENV/deb" && apt-get "${apt_opts[@]}" download libcuda1)
  dpkg -x "$ENV"/deb/libcuda1_*.deb "$ENV/deb/x"
  mkdir -p "$ENV/libcuda"
  lib=$(find "$ENV/deb/x" -name 'libcuda.so.1' | head -1)
  cp -L "$lib" "$ENV/libcuda/libcuda.so.1"
  ln -sf libcuda.so.1 "$ENV/libcuda/libcuda.so"
fi

export CUDA_ROOT=$CU CUDA_PATH=$CU
export PATH="$CU/bin:$PATH"
export CUDA_COMPUTE_CAP=90 CUDARC_CUDA_VERSION=13000
export RUSTFLAGS="${RUSTFLAGS:-} -L $CU/lib -L $ENV/libcuda -L $NCCL_LIB"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target/cuda}
FEATURES=${FERROTUNE_GPU_FEATURES:-cuda,nccl}
case ",$FEATURES," in
  *,nccl,*)
    # cudarc emits `-l nccl`; the wheel's libnccl.so.2 got its plain-name link above.
    [ -e "$NCCL_LIB/libnccl.so" ] || {
      echo "build.sh: no libnccl.so in $NCCL_LIB (pip install nvidia-nccl-cu13 into $ENV/venv)" >&2
      exit 1
    } ;;
esac

if [ "${FERROTUNE_GPU_CARGO:-build}" != build ]; then
  cargo "$FERROTUNE_GPU_CARGO" --release -p ferrotune-cli --features "$FEATURES"
  exit $?
fi
cargo build --release -p ferrotune-cli --features "$FEATURES"
cp "$CARGO_TARGET_DIR/release/ferrotune" target/gpu/ferrotune
strip target/gpu/ferrotune
# The device tool carries at most 64 MiB in all; the binary (CUDA kernels inside) is ~66 MB.
mkdir -p target/gpu-carry
xz -T0 -6 -c target/gpu/ferrotune >target/gpu-carry/ferrotune.xz
ls -la target/gpu target/gpu-carry
