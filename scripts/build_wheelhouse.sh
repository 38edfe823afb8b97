#!/usr/bin/env bash
# Build a wheelhouse for an offline GPU host: the project, mamba-ssm (Triton SSD kernels, built
# without its CUDA extensions), for the host's Python version.
#
#   scripts/build_wheelhouse.sh [--python 3.12] [--out wheelhouse] [--causal-conv1d]
#
# Run it on a machine with network access and torch installed (any build: mamba-ssm's setup
# imports torch; no CUDA is needed for MAMBA_SKIP_CUDA_BUILD). --causal-conv1d also builds
# causal-conv1d from source, which needs nvcc and a CUDA torch matching the GPU host's: run that
# part on a build box like the GPU host. Then, on the GPU host (torch, triton, pandas, rich and
# matplotlib already there), the one install command:
#
#   pip install --no-index --no-deps --find-links wheelhouse cpbench mamba-ssm [causal-conv1d]
set -euo pipefail
py=3.12
out=wheelhouse
conv=0
while [ $# -gt 0 ]; do
  case "$1" in
    --python) py=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --causal-conv1d) conv=1; shift ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
out=$(cd "$out" && pwd)
tag=${py/./}
MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE python3 -m pip wheel -q --no-deps --no-build-isolation -w "$out" "mamba-ssm==2.3.2.post1"
if [ "$conv" = 1 ]; then
  CAUSAL_CONV1D_FORCE_BUILD=TRUE python3 -m pip wheel -q --no-deps --no-build-isolation -w "$out" "causal-conv1d>=1.4"
fi
python3 -m pip wheel -q --no-deps -w "$out" "$root"
echo "wheelhouse for cp$tag in $out:"
ls -1 "$out"
