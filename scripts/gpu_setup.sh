# Sourced at the start of a command on a fresh GPU host without network: installs the wheels in .whl
# (mamba-ssm built without its CUDA extensions, causal-conv1d, nemo-automodel where present) into /tmp/site.
# Usage: source scripts/gpu_setup.sh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1
export OUT=${OUT:-out}
mkdir -p "$OUT"
