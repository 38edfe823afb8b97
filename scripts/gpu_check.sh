#!/usr/bin/env bash
# First look on a 2-GPU host: machine facts, GPU tests, NCCL parity at cp 2, the peers at L 32K.
source scripts/gpu_setup.sh
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nvidia-smi topo -m;
  python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.nccl.version())"; } > "$OUT/machine.txt" 2>&1
MAMBA_DETERMINISTIC=1 timeout 240 python3 -m pytest -q -m gpu -x -p no:cacheprovider \
  tests/test_peers_gpu.py tests/test_mixer_gpu.py tests/test_kernels_gpu.py 2>&1 | tail -25 | tee "$OUT/gpu_tests.txt"
MAMBA_DETERMINISTIC=1 timeout 150 torchrun --nproc-per-node 2 tests/nccl_parity.py --cp 2 2>&1 \
  | tee "$OUT/nccl_parity.txt" | grep -E "FAIL|passed"
timeout 200 torchrun --nproc-per-node 2 -m cpbench sweep scenarios/peers.toml --out "$OUT/peers32k" --no-progress \
  --set 'sweep.seq_len=[32768]' 2>&1 | tail -8
python3 - <<'PY'
import os, pandas as pd
df = pd.read_csv(os.path.join(os.environ["OUT"], "peers32k", "results.csv"))
ok = df[df.status != "skipped"]
cols = [c for c in ["cp_size", "packing", "impl", "overlap_chunks", "status", "layer_ms", "peak_mem_GiB", "comm_ms",
        "exposed_comm_ms", "overlap_pct", "warmup_s", "conv_ssd_backend", "norm_backend", "error"] if c in ok]
print(ok[cols].to_string(max_colwidth=60))
PY
