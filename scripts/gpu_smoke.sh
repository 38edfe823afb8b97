#!/usr/bin/env bash
# Every one-GPU command of README.md and scenarios/README.md, at small sizes, on one GPU: cp 1 sweeps with
# and without torchrun, projection mode (--backend fake) with and without torchrun, the peers at cp 1 and
# their report, the benches, the profilers' entry points, and the guard's estimate against the peaks of
# two L 64K projection sweeps; then the GPU tests.
#
#   bash scripts/gpu_smoke.sh [DIR]     run them; results and logs under DIR (default $OUT, else out/smoke)
#   bash scripts/gpu_smoke.sh --dry-run on a CPU: each cpbench command with --dry-run (it parses and lists
#                                       its cases); the others are listed, not run
#   bash scripts/gpu_smoke.sh --list    the commands, LABEL|COMMAND per line (tests/test_gpu_smoke.py
#                                       parses every one, so the list stays current)
#
# One line per command: ok / FAIL / skip, seconds, label; the last line counts each; exit 1 when one failed
# (a skip is no failure). The whole run stays under BUDGET_S (default 560 s: a 10-minute command); a command
# that would start past it is skipped and said so. SKIP_TESTS=1 leaves the GPU tests out; SMOKE_LIST=FILE
# runs the LABEL|COMMAND lines of FILE instead of the list below. Under $OUT: summary.txt and smoke.tgz (logs and results).
# Needs mamba-ssm, causal-conv1d and nvtx: the wheels in .whl on an offline host (scripts/gpu_setup.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=run
case "${1:-}" in
  --dry-run) MODE=dry; shift ;;
  --list) MODE=list; shift ;;
esac
D=${1:-${OUT:+$OUT/smoke}}
if [ -z "$D" ]; then
  if [ "$MODE" = run ]; then D=out/smoke; else D=$(mktemp -d /tmp/gpu-smoke.XXXXXX); fi
fi
SMALL="--set 'sweep.seq_len=[8192]' --set run.warmup=1 --set run.iters=3 --no-progress"
M64="--set 'sweep.seq_len=[65536]' --set run.warmup=1 --set run.iters=2 --no-progress"

commands() {
  if [ -n "${SMOKE_LIST:-}" ]; then cat "$SMOKE_LIST"; return; fi
  cat <<'LIST'
cp 1 sweep, one process|python3 -m cpbench sweep long_context --set 'sweep.cp_size=[1]' $SMALL --out $D/cp1
cp 1 sweep, torchrun 1 rank|torchrun --nproc-per-node 1 -m cpbench sweep long_context --set 'sweep.cp_size=[1]' $SMALL --out $D/cp1-torchrun
projection cp 1-8 (fake)|python3 -m cpbench sweep long_context --backend fake --fake-busbw 370 $SMALL --out $D/fake
projection, torchrun 1 rank|torchrun --nproc-per-node 1 -m cpbench sweep long_context --backend fake --set 'sweep.cp_size=[2]' $SMALL --out $D/fake-torchrun
peers at cp 1|python3 -m cpbench sweep peers --set 'sweep.cp_size=[1]' --set 'sweep.overlap_chunks=[1]' $SMALL --out $D/peers
peers at cp 1, torchrun 1 rank|torchrun --nproc-per-node 1 -m cpbench sweep peers --set 'sweep.cp_size=[1]' --set 'sweep.overlap_chunks=[1]' --set 'sweep.packing=["none"]' $SMALL --out $D/peers-torchrun
report --vs nemo|python3 -m cpbench report $D/peers --vs nemo
packing at cp 1|python3 -m cpbench sweep packing --set 'sweep.cp_size=[1]' --set 'sweep.path=["fused"]' $SMALL --out $D/packing
node scenario at cp 1, torchrun 1 rank|torchrun --nproc-per-node 1 -m cpbench sweep h100_node --set 'sweep.cp_size=[1]' --set 'sweep.packing=["none", {docs = 8, density = 0.9}]' --set 'sweep.path=["fused"]' $SMALL --out $D/node
strategies (fake)|python3 -m cpbench sweep strategies --backend fake $SMALL --out $D/strategies
multi-node projection (8x8 topology)|python3 -m cpbench sweep multi_node --set 'sweep.cp_size=[16]' $SMALL --out $D/multi-node
heads, dry run at 8 ranks|python3 -m cpbench sweep heads --dry-run --nproc 8
smoke scenario (CPU, 2 gloo ranks)|python3 -m cpbench sweep smoke --no-progress --out $D/smoke
kernel_bench|python3 -m cpbench.kernel_bench --seq-len 8192 --cp 1,2 --warmup 1 --iters 3 --out $D/kernels.csv
layout_bench|python3 -m cpbench.layout_bench --seq-len 8192 --cp 2,8 --docs 0,8 --warmup 1 --iters 3 --out $D/layout.csv
--profile nsys prints its command|python3 -m cpbench sweep long_context --backend fake --set 'sweep.cp_size=[2]' $SMALL --profile nsys --out $D/nsys-printed
--profile torch|python3 -m cpbench sweep long_context --backend fake --set 'sweep.cp_size=[2]' --set 'sweep.pass=["fwd+bwd"]' $SMALL --profile torch --out $D/torch
cpbench trace|python3 -m cpbench trace $D/torch/traces/case0000-rank0.json --top 5
memory: projection at L 64K|python3 -m cpbench sweep long_context --backend fake $M64 --out $D/memory-hidden
memory: state passing and 64 documents at L 64K|python3 -m cpbench sweep strategies --backend fake --set 'sweep.cp_size=[2]' --set 'sweep.packing=["none", {docs = 64, density = 0.9}]' $M64 --out $D/memory-strategies
guard estimate against the peaks|python3 scripts/guard_check.py $D/memory-hidden $D/memory-strategies $D/peers $D/node
GPU tests|python3 -m pytest -q -m gpu -x -p no:cacheprovider
LIST
}

expand() {  # $SMALL, $M64 and $D of a line replaced, everything else (its quotes) kept for the shell
  local s=${1//\$SMALL/$SMALL}
  s=${s//\$M64/$M64}
  printf '%s\n' "${s//\$D/$D}"
}

if [ "$MODE" = list ]; then
  commands | while IFS='|' read -r label cmd; do printf '%s|%s\n' "$label" "$(expand "$cmd")"; done
  exit 0
fi

if [ "$MODE" = run ]; then
  [ -d .whl ] && source scripts/gpu_setup.sh
  export MAMBA_DETERMINISTIC=1 PYTHONUNBUFFERED=1  # one autotune configuration per kernel: short first calls
fi
mkdir -p "$D/logs"
SUMMARY="$D/summary.txt"
: >"$SUMMARY"
BUDGET_S=${BUDGET_S:-560}
T0=$SECONDS
fails=0
oks=0
skips=0
listed=0
i=0
say() { printf '%s\n' "$*" | tee -a "$SUMMARY"; }
if [ "$MODE" = run ]; then
  say "$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -1); $(python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' 2>&1 | tail -1)"
fi
while IFS='|' read -r label cmd; do
  i=$((i + 1))
  line=$(expand "$cmd")
  log=$(printf '%s/logs/%02d.log' "$D" "$i")
  if [ "$MODE" = dry ]; then
    case "$line" in
      *"-m cpbench sweep"*|*"cpbench.kernel_bench"*|*"cpbench.layout_bench"*)
        case "$line" in *--dry-run*) ;; *) line="$line --dry-run" ;; esac ;;
      *) say "$(printf '%-5s %6s  %s' list - "$label: $line")"; listed=$((listed + 1)); continue ;;
    esac
  elif [ "$label" = "GPU tests" ] && [ "${SKIP_TESTS:-0}" = 1 ]; then
    say "$(printf '%-5s %6s  %s' skip - "$label (SKIP_TESTS=1)")"; skips=$((skips + 1)); continue
  fi
  left=$((BUDGET_S - (SECONDS - T0)))
  if [ "$left" -lt 20 ]; then
    say "$(printf '%-5s %6s  %s' skip - "$label (no time left in ${BUDGET_S} s)")"; skips=$((skips + 1)); continue
  fi
  limit=$((left < 300 ? left : 300))
  t=$SECONDS
  printf '$ %s\n' "$line" >"$log"
  timeout "$limit" bash -c "$line" >>"$log" 2>&1
  rc=$?
  status=ok
  if [ "$rc" -ne 0 ]; then status=FAIL; fails=$((fails + 1)); else oks=$((oks + 1)); fi
  [ "$rc" -eq 124 ] && label="$label (timed out after $limit s)"
  say "$(printf '%-5s %5ds  %s' "$status" $((SECONDS - t)) "$label")"
  [ "$status" = FAIL ] && tail -5 "$log" | sed 's/^/        /' | tee -a "$SUMMARY"
done < <(commands)
say "$i command(s): $oks ok, $fails failed, $skips skipped$([ "$listed" -gt 0 ] && echo ", $listed listed"), $((SECONDS - T0)) s; logs: $D/logs"
if [ "$MODE" = run ] && [ -n "${OUT:-}" ]; then
  find "$D" -name .cpbench.lock -delete
  tar czf "$OUT/smoke.tgz" --exclude='*/traces/*' -C "$(dirname "$D")" "$(basename "$D")" && cp "$SUMMARY" "$OUT/summary.txt"
  rm -rf "$D"  # what comes back is the tarball and the summary
fi
[ "$fails" -eq 0 ]
