#!/bin/sh
# edge-agent-cuda: starts the CUDA build of the agent, or says why it cannot.
#
# The CUDA build links the NVIDIA libraries dynamically (candle does): when
# one is missing, the system's loader stops it before it can say anything
# useful. This launcher asks the loader first (ldd) and names what is missing.
# Installed as `edge-agent-cuda`, with the binary beside it as
# `edge-agent-cuda.bin` (or where EDGE_AGENT_CUDA_BIN points).
#
# With every library present it runs the agent, which then picks the GPU
# itself and serves on the CPU (saying why in its log and /readyz) when the
# driver has no usable GPU.
set -u
here=$(dirname "$0")
bin=${EDGE_AGENT_CUDA_BIN:-$here/edge-agent-cuda.bin}
if [ ! -x "$bin" ]; then
    echo "edge-agent-cuda: the CUDA build is not installed at $bin" >&2
    echo "edge-agent-cuda: run the CPU build instead: edge-agent $*" >&2
    exit 69 # EX_UNAVAILABLE
fi
missing=$(ldd "$bin" 2>/dev/null | awk '/=> not found/ { print $1 }')
if [ -n "$missing" ]; then
    for lib in $missing; do
        case $lib in
        libcuda.so.*) what="the NVIDIA driver's library (install the driver)" ;;
        libcudart.so.*) what="the CUDA 13 runtime (install it)" ;;
        libcublas.so.* | libcublasLt.so.*) what="cuBLAS for CUDA 13 (install it)" ;;
        libcurand.so.*) what="cuRAND for CUDA 13 (install it)" ;;
        libnvrtc.so.*) what="NVRTC for CUDA 13 (install it)" ;;
        *) what="a library the CUDA build needs" ;;
        esac
        echo "edge-agent-cuda: $lib is missing: $what" >&2
    done
    echo "edge-agent-cuda: the CUDA build cannot start on this machine;" \
        "run the CPU build instead: edge-agent $*" >&2
    exit 69 # EX_UNAVAILABLE
fi
# candle's kernels are PTX, compiled by the driver at load (seconds); the
# driver's cache keeps the result for the next start, if it fits: its default
# size is 256 MiB, this makes it 1 GiB (an operator's own setting wins).
CUDA_CACHE_MAXSIZE=${CUDA_CACHE_MAXSIZE:-1073741824}
export CUDA_CACHE_MAXSIZE
exec "$bin" "$@"
