# Sourced (from the repository root) by the GPU-machine scripts check.sh and nccl_check.sh:
# sets PY and BIN, unpacking the carried binary when only the xz copy came along (the device
# tool carries at most 64 MiB: build.sh leaves an xz copy of about 10 MB), and puts the CUDA and
# NCCL runtime libraries of the machine's PyTorch install (site-packages/nvidia/{cu13,nccl,…}/lib:
# cublas, cublasLt, cudart, curand, libnccl.so.2) on LD_LIBRARY_PATH.
BIN=${FERROTUNE_BIN:-target/gpu/ferrotune}
PY=${PYTHON:-python3}
if [ ! -x "$BIN" ] && [ -f target/gpu-carry/ferrotune.xz ]; then
  BIN=/tmp/ferrotune-cuda
  $PY -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
    target/gpu-carry/ferrotune.xz $BIN && chmod +x $BIN
fi
NV=$($PY -c 'import nvidia, os; print(os.path.dirname(list(nvidia.__path__)[0]))' 2>/dev/null)/nvidia
LIBS=$(find "$NV" -maxdepth 3 -type d -name lib 2>/dev/null | tr '\n' ':')
export LD_LIBRARY_PATH="${LIBS}/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
