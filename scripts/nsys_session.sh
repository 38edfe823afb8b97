#!/usr/bin/env bash
# One Nsight Systems session on one GPU, and what the CPU machine needs to check it (scripts/nsys_convert.sh):
#   1. `cpbench sweep --profile nsys` prints its command, which is then run as printed: the projection mode
#      (fake backend) at cp 2, L 32K, fwd+bwd, 1 and 2 head chunks, 2 warm-up + 3 measured iterations:
#      one capture per case (cpbench.N.qdstrm; this nsys cannot make a report here);
#   2. the same cases under torch.profiler (--profile torch): the kernels of the same iterations, counted;
#   3. the same cases without a profiler (CUDA-event region times nsys does not perturb);
#   4. what NVTX ranges cost per layer, without a profiler and under nsys (scripts/nvtx_cost.py);
#   5. a probe of which NVTX forms this nsys records (the nvtx package's domain ranges vs torch.cuda.nvtx)
#      and of what nsys sets in the profiled process.
# Needs in .whl: the wheels (mamba-ssm, causal-conv1d, nvtx) and nsys-2023.4.4-target.tar.xz.
# Under $OUT: cpbench.1.qdstrm, cpbench.2.qdstrm, probe.qdstrm, session.tgz, summary.txt (each < 16 MiB).
# About 4 minutes on one H200 (most of it Triton's first compilations). TESTS=1 adds the GPU tests.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu_setup.sh
export MAMBA_DETERMINISTIC=1
mkdir -p /tmp/nsys && tar xJf .whl/nsys-2023.4.4-target.tar.xz -C /tmp/nsys && export PATH=/tmp/nsys/target-linux-x64:$PATH
W=/tmp/nsys-session
rm -rf "$W" && mkdir -p "$W"
S="$W/summary.txt"
say() { printf '%s\n' "$*" | tee -a "$S"; }
CASE=(long_context --backend fake --no-progress --set 'sweep.cp_size=[2]' --set 'sweep.seq_len=[32768]'
      --set 'sweep.pass=["fwd+bwd"]' --set 'sweep.overlap_chunks=[1, 2]' --set run.warmup=2 --set run.iters=3)
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  nsys --version
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} >"$W/session.txt" 2>&1
cat "$W/session.txt" | tee -a "$S"

# 1. the printed command, run as printed
t=$SECONDS
cmd=$(python3 -m cpbench sweep "${CASE[@]}" --profile nsys --out "$W/nsys-run" 2>>"$W/nsys-run.log")
say "printed (exit $?): $cmd"
printf '%s\n' "$cmd" >"$W/nsys_command.txt"
timeout 300 bash -c "$cmd" >>"$W/nsys-run.log" 2>&1
say "profiled sweep: exit $? in $((SECONDS - t)) s; $(ls "$W"/nsys-run/*.qdstrm 2>/dev/null | wc -l) capture(s): $(du -h "$W"/nsys-run/*.qdstrm 2>/dev/null | tr '\n\t' '; ')"
tail -4 "$W/nsys-run.log" | tee -a "$S"

# 2. torch.profiler: the kernels of the same measured iterations, per case
t=$SECONDS
timeout 200 python3 -m cpbench sweep "${CASE[@]}" --profile torch --out "$W/torch-run" >"$W/torch-run.log" 2>&1
say "torch.profiler sweep: exit $? in $((SECONDS - t)) s"
python3 - "$W" <<'PY' 2>&1 | tee -a "$S"
import csv, sys
from collections import Counter
from pathlib import Path
from cpbench import trace
w = Path(sys.argv[1])
rows = []
for p in sorted((w / "torch-run" / "traces").glob("case*-rank0.json")):
    case = int(p.name[4:8])
    kernels, windows = trace.read(p)
    counts = Counter(k.name for k in kernels if k.kind != "memory")
    rows += [dict(case=case, name=n, count=c, iterations=len(windows)) for n, c in counts.items()]
    print(f"torch.profiler case {case}: {sum(counts.values()) / max(len(windows), 1):g} kernels per iteration ({len(windows)} iterations)")
with open(w / "nsys-run" / "torch_kernels.csv", "w", newline="") as f:
    wr = csv.DictWriter(f, fieldnames=["case", "name", "count", "iterations"])
    wr.writeheader()
    wr.writerows(rows)
PY

# 3. no profiler
t=$SECONDS
timeout 200 python3 -m cpbench sweep "${CASE[@]}" --out "$W/plain-run" >"$W/plain-run.log" 2>&1
say "plain sweep: exit $? in $((SECONDS - t)) s"
python3 -m cpbench report "$W/plain-run" --metrics layer_ms layer_fwd_ms layer_bwd_ms ssm_ms a2a_pre_ms 2>&1 | tail -6 | tee -a "$S"

# 4. NVTX per layer: without a profiler, and recorded by nsys (that capture is not kept)
t=$SECONDS
timeout 150 python3 scripts/nvtx_cost.py --out "$W/nvtx_cost.csv" >"$W/nvtx_cost.log" 2>&1
say "nvtx cost, no profiler: exit $? in $((SECONDS - t)) s"
tail -8 "$W/nvtx_cost.log" | tee -a "$S"
t=$SECONDS
timeout 150 nsys profile -s none --cpuctxsw=none -t cuda,nvtx --force-overwrite=true -o "$W/nvtxcost" \
  python3 scripts/nvtx_cost.py --iters 20 --out "$W/nvtx_cost_nsys.csv" >"$W/nvtx_cost_nsys.log" 2>&1
say "nvtx cost under nsys: exit $? in $((SECONDS - t)) s"
grep -A8 "^# " "$W/nvtx_cost_nsys.log" | tee -a "$S"
rm -f "$W"/nvtxcost.*

# 5. which NVTX forms reach this nsys, and what it sets in the profiled process
cat >"$W/probe.py" <<'PY'
import os, sys
import nvtx, torch
a = torch.randn(4096, 4096, device="cuda")
torch.cuda.synchronize()
torch.cuda.profiler.start()
for i in range(3):
    with nvtx.annotate("probe:nvtx-package-domain", domain="cpbench"):
        a @ a
    with nvtx.annotate("probe:nvtx-package-default"):
        a @ a
    torch.cuda.nvtx.range_push("probe:torch.cuda.nvtx")
    a @ a
    torch.cuda.nvtx.range_pop()
torch.cuda.synchronize()
torch.cuda.profiler.stop()
keys = ("CPBENCH_UNDER_NSYS", "NSYS_PROFILING_SESSION_ID", "NVTX_INJECTION64_PATH")
with open(sys.argv[1], "w") as f:
    f.write("".join(f"{k}={'set' if os.environ.get(k) else 'unset'}\n" for k in keys))
PY
timeout 120 nsys profile -s none --cpuctxsw=none -t cuda,nvtx -c cudaProfilerApi --capture-range-end=stop \
  --force-overwrite=true --env-var=CPBENCH_UNDER_NSYS=1 -o "$W/probe" python3 "$W/probe.py" "$W/probe_env.txt" \
  >"$W/probe.log" 2>&1
say "probe: exit $?; in the profiled process: $(tr '\n' ' ' <"$W/probe_env.txt" 2>/dev/null)"

if [ "${TESTS:-0}" = 1 ]; then
  t=$SECONDS
  timeout 240 python3 -m pytest -q -m gpu -x -p no:cacheprovider 2>&1 | tail -4 | tee -a "$S"
  say "GPU tests: $((SECONDS - t)) s"
fi

# what comes back: the captures, one tarball, the summary
for q in "$W"/nsys-run/*.qdstrm "$W"/probe.qdstrm; do
  [ -f "$q" ] || continue
  if [ "$(stat -c %s "$q")" -gt $((16 * 1024 * 1024)) ]; then say "too large to bring back: $q"; else cp "$q" "$OUT/"; fi
done
find "$W" -name .cpbench.lock -delete
rm -rf "$W"/torch-run/traces
(cd "$W" && tar czf "$OUT/session.tgz" --exclude='*.qdstrm' session.txt nsys_command.txt ./*.log ./*.csv probe_env.txt \
  probe.py nsys-run torch-run plain-run)
cp "$S" "$OUT/summary.txt"
ls -la "$OUT"
