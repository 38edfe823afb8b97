#!/usr/bin/env bash
# Multi-GPU runs on one host with N GPUs (NCCL, one rank per GPU), results under ${OUT:-out}/:
#   1. mixer parity CP=N vs CP=1 over NCCL (tests/nccl_parity.py: cp 2/4/8 <= N, BSHD and THD,
#      both layouts, hidden and state passing, fp32 and bf16);
#   2. the node sweep (scenarios/h100_node.toml) restricted to what fits a short run: cp 1..N,
#      L 128K, BSHD and 64 documents, fused vs seed, hidden vs state passing; measured all-to-all
#      busbw beside the microbenchmark at the same size.
# Usage: bash scripts/multi_gpu.sh N   (mamba-ssm, causal-conv1d and nvtx installed; NVLink multicast off)
set -euo pipefail
N=${1:?number of GPUs}
OUT=${OUT:-out}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
cps=$(python3 -c "print(', '.join(str(c) for c in (1, 2, 4, 8) if c <= $N))")
MAMBA_DETERMINISTIC=1 torchrun --nproc-per-node "$N" tests/nccl_parity.py 2>&1 | tee "$OUT/nccl_parity.txt" | grep -E "FAIL|passed"
torchrun --nproc-per-node "$N" -m cpbench sweep scenarios/h100_node.toml --no-progress --out "$OUT/h100_node" \
  --set "sweep.cp_size=[$cps]" --set "sweep.seq_len=[131072]" \
  --set 'sweep.packing=["none", {docs = 64, density = 0.9}]' --set run.iters=8 --set run.warmup=2 \
  2>&1 | tee "$OUT/h100_node.log" | tail -5
