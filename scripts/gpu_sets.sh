#!/usr/bin/env bash
# The measured GPU sets of results/, one named entry each (results/README.md says which claim each backs):
#   bash scripts/gpu_sets.sh NAME     run it on a host with two NVLinked GPUs; results under $OUT (default out/)
#   bash scripts/gpu_sets.sh --list   NAME|FOLDER|what, one line per entry
#   bash scripts/gpu_sets.sh --dry-run NAME|all   print the commands instead (tests/test_gpu_sets.py parses
#                                     every one, so the entries stay current)
# Needs mamba-ssm, causal-conv1d, nemo-automodel (offline: the wheels in .whl, scripts/gpu_setup.sh).
# Entries that take a version of cp_core beside the tree (`ab`) want it copied in first:
#   mkdir base && git archive COMMIT cp_core | tar -x -C base      (and mid/ for three versions)
cd "$(dirname "$0")/.." || exit 2
entries() {
  cat <<'LIST'
tests|(every set)|the GPU tests and NCCL parity at cp 2 (hidden, hidden@2, hidden@2s), machine facts
peers|h200x2-overlap-20261126|ours vs NeMo AutoModel (cp 2, L 128K, k 1/2) and mamba-ssm's Mamba2 (cp 1, L 64K)
peers-lengths|h100x2-peers-20261125|ours vs both peers, L 32K-256K; a length a peer may not survive in its own sweep
ab|h200x2-overlap-20261126|base/ (mid/) against the tree, cp 2, k 1/2, L 64K/128K, in rounds (ROUNDS, VERSIONS, SKIP_TESTS)
split-groups|h200x2-overlap-20261126|head chunks splitting a group: 2 groups at cp 2 (k 1/2/4), cp 8 projected
gaps|h200x2-overlap-20261126|one profiled iteration (cp 2, L 128K, k 2) and its compute-stream gaps; SSD on 16/8/4 heads
projection|h200x2-norm-slots-20261126|cp 1, cp 2 k 1/2/4 measured and in projection mode at 370 and 325 GB/s
exchange|h200x2-norm-slots-20261126|the exchange into rows against pack + all-to-all + row gather (CP_CORE_EXCHANGE)
transport|h100x2-transport-20261125|NCCL vs copy engines (CP_CORE_TRANSPORT), the stream's priority, NCCL_MAX_CTAS
state-passing|h100x2-state-passing-20261125|hidden vs state passing (both exchanges), fused and seed path, L 64K/128K
LIST
}
DRY=
case "${1:-}" in
  --list) entries; exit 0 ;;
  --dry-run) DRY=1; shift ;;
  "") echo "usage: bash scripts/gpu_sets.sh NAME | --list | --dry-run NAME|all" >&2; exit 2 ;;
esac
name=${1:?NAME or all}
if [ "$name" != all ] && ! entries | grep -q "^$name|"; then echo "no entry $name (--list)" >&2; exit 2; fi
if [ -z "$DRY" ]; then
  [ -d .whl ] && source scripts/gpu_setup.sh
  export PYTHONWARNINGS=ignore::UserWarning MAMBA_DETERMINISTIC=1
fi
mkdir -p "${OUT:=out}" && OUT=$(cd "$OUT" && pwd) && ROOT=$PWD

x() { if [ -n "$DRY" ]; then printf '%q ' "$@" && echo; else "$@"; fi; }  # run (or print) one command
# sw SCENARIO OUTDIR ARGS...: one sweep on 2 ranks; ENV="VAR=V ..." for it; IN=base|mid: that copy's cp_core (run
# from inside it: Python puts the working directory first on sys.path; meta.json's env.cp_core_path says which)
sw() {
  local s=$1 o=$2 dir=$ROOT${IN:+/$IN}; shift 2
  ([ -n "$DRY" ] || cd "$dir" || exit 2
   x env $ENV PYTHONPATH="$dir${PYTHONPATH:+:$PYTHONPATH}" torchrun --nproc-per-node 2 -m cpbench sweep \
     "$ROOT/scenarios/$s" --no-progress --out "$OUT/$o" "$@")
}
fake() {  # fake OUTDIR ARGS...: the same in projection mode, one process
  local o=$1; shift
  x python3 -m cpbench sweep scenarios/peers.toml --backend fake --no-progress --out "$OUT/$o" "$@"
}
report() { x python3 -m cpbench report "$OUT/$1" "${@:2}"; }
facts() {
  [ -n "$DRY" ] && return
  { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nvidia-smi topo -m
    python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.nccl.version())"
  } >"$OUT/machine.txt" 2>&1
}
OURS=(--set 'sweep.impl=["cp_core"]' --set 'sweep.packing=["none"]')
L64_128=(--set 'sweep.seq_len=[65536, 131072]')
CP1=(--set 'sweep.cp_size=[1]' --set 'sweep.overlap_chunks=[1]')
CP2=(--set 'sweep.cp_size=[2]')
DOCS8_64=(--set 'sweep.packing=[{docs = 8, density = 0.9}, {docs = 64, density = 0.9}]')

e_tests() {
  facts
  x python3 -m pytest -q -m gpu -p no:cacheprovider -p no:warnings
  x torchrun --nproc-per-node 2 tests/nccl_parity.py --cp 2 --strategies hidden hidden@2 hidden@2s
}
e_peers() {
  sw peers.toml peers-cp2 --set 'sweep.seq_len=[131072]' "${CP2[@]}" --set 'sweep.overlap_chunks=[1, 2]' \
    --set 'sweep.impl=["cp_core", "nemo"]' --set run.iters=3
  sw peers.toml peers-cp1 --set 'sweep.seq_len=[65536]' "${CP1[@]}" --set 'sweep.packing=["none"]' \
    --set 'sweep.impl=["cp_core", "mamba_ssm"]' --set run.iters=3
  report peers-cp2 --vs nemo --metrics layer_ms peak_mem_GiB
  report peers-cp1 --vs mamba_ssm --metrics layer_ms peak_mem_GiB
}
e_peers-lengths() {
  facts
  sw peers.toml peers-a --set 'sweep.seq_len=[32768, 65536]'
  sw peers.toml peers-b --set 'sweep.seq_len=[131072]' --set 'sweep.impl=["cp_core"]' \
    --set 'sweep.overlap_chunks=[1, 2]' --set run.iters=3
  sw peers.toml peers-c --set 'sweep.seq_len=[262144]' "${OURS[@]}" "${CP2[@]}" --set 'sweep.overlap_chunks=[1, 2]' \
    --set run.iters=3
  sw peers.toml peers-nemo --set 'sweep.seq_len=[131072, 262144]' --set 'sweep.impl=["nemo"]' "${CP2[@]}" \
    --set 'sweep.overlap_chunks=[1]' --set run.iters=3  # 256K: the run ends (a rank aborts)
  sw peers.toml peers-mamba --set 'sweep.seq_len=[131072]' --set 'sweep.impl=["mamba_ssm"]' "${CP1[@]}" \
    --set 'sweep.packing=["none"]' --set run.iters=3  # ends its process (illegal memory access)
}
e_ab() {
  local s=("${OURS[@]}" "${L64_128[@]}" --set run.iters=10 --set 'sweep.overlap_chunks=[1, 2]')
  for v in ${VERSIONS:-base new}; do
    [ -n "$DRY" ] || [ "$v" = new ] || [ -d "$v/cp_core" ] || { echo "ab: no $v/cp_core (the top of this file)" >&2
      return 2; }
  done
  [ -n "$SKIP_TESTS" ] || e_tests
  sw peers.toml r-cp1 "${s[@]}" "${CP1[@]}"
  for i in $(seq 1 "${ROUNDS:-2}"); do
    for v in ${VERSIONS:-base new}; do
      IN=${v/new/} sw peers.toml "ab-$i-$v" "${s[@]}" "${CP2[@]}"
      report "ab-$i-$v" --metrics layer_ms exposed_comm_ms peak_mem_GiB
    done
  done
  [ -n "$DRY" ] || python3 scripts/ab_summary.py "$OUT" >"$OUT/ab_summary.csv"
}
e_split-groups() {
  local s=("${OURS[@]}" --set run.iters=10)
  facts
  sw peers.toml g2-cp1 "${s[@]}" --set 'sweep.heads=[[128, 2]]' "${L64_128[@]}" "${CP1[@]}"
  sw peers.toml g2-cp2 "${s[@]}" --set 'sweep.heads=[[128, 2]]' "${L64_128[@]}" "${CP2[@]}" \
    --set 'sweep.overlap_chunks=[1, 2, 4]'
  fake cp8-projected "${s[@]}" --fake-busbw 370 --set 'sweep.seq_len=[131072, 524288]' --set 'sweep.cp_size=[8]' \
    --set 'sweep.overlap_chunks=[1, 2, 4]'
}
e_gaps() {
  facts
  sw peers.toml trace --profile torch "${OURS[@]}" --set 'sweep.seq_len=[131072]' "${CP2[@]}" \
    --set 'sweep.overlap_chunks=[2]' --set run.iters=1
  for r in 0 1; do x python3 -m cpbench trace "$OUT/trace/traces/case0000-rank$r.json" --min-gap-ms 0.3 --top 8; done \
    | tee "$OUT/trace_gaps.txt"
  [ -n "$DRY" ] || rm -rf "$OUT/trace/traces"
  for h in 16 8 4; do
    x python3 -m cpbench.kernel_bench --seq-len 131072 --cp 1 --shape "$h,64,1,128,256" --ssd mamba_ssm \
      --dtype bfloat16 --out "$OUT/ssd-h$h.csv"
  done
}
e_projection() {
  local s=("${OURS[@]}" "${L64_128[@]}" --set run.iters=10)
  facts
  sw peers.toml k-cp1 "${s[@]}" "${CP1[@]}"
  sw peers.toml k-measured "${s[@]}" "${CP2[@]}" --set 'sweep.overlap_chunks=[1, 2, 4]'
  for bw in 370 325; do
    fake "k-projected-$bw" "${s[@]}" --fake-busbw $bw "${CP2[@]}" --set 'sweep.overlap_chunks=[1, 2, 4]'
  done
}
gone() {  # gone VAR: a switch removed from cp_core (its code and this entry's runs are at 765733b)
  [ -n "$DRY" ] && return 0
  git grep -q "$1" -- cp_core && return 0
  echo "$name: $1 was removed from cp_core; run this entry in a checkout of 765733b" >&2
  exit 2
}
e_exchange() {  # CP_CORE_EXCHANGE is in the tree up to 765733b
  gone CP_CORE_EXCHANGE
  for v in gather direct; do
    ENV="CP_CORE_EXCHANGE=$v" sw peers.toml "exchange-$v" "${OURS[@]}" --set 'sweep.seq_len=[131072]' "${CP2[@]}" \
      --set 'sweep.overlap_chunks=[1, 2]' --set run.iters=10
  done
}
e_transport() {  # CP_CORE_TRANSPORT and CP_CORE_COMM_PRIORITY are in the tree up to 765733b
  gone CP_CORE_TRANSPORT
  local s=("${OURS[@]}" "${L64_128[@]}" --set 'sweep.cp_size=[1, 2]') k2=(--set 'sweep.overlap_chunks=[1, 2]')
  local k4=(--set 'sweep.overlap_chunks=[1, 2, 4]')
  facts
  x torchrun --nproc-per-node 2 scripts/exchange_micro.py --mib 680,1360 | tee "$OUT/transport_micro.csv"
  for t in nccl ce; do ENV="CP_CORE_TRANSPORT=$t" sw peers.toml "run1-$t" "${s[@]}" "${k2[@]}" --set run.iters=3; done
  for t in nccl auto; do ENV="CP_CORE_TRANSPORT=$t" sw peers.toml "run2-$t" "${s[@]}" "${k4[@]}" --set run.iters=3; done
  for r in 3 4; do
    for t in nccl auto; do ENV="CP_CORE_TRANSPORT=$t" sw peers.toml "run$r-$t" "${s[@]}" "${k4[@]}" --set run.iters=10; done
    ENV="CP_CORE_TRANSPORT=auto CP_CORE_COMM_PRIORITY=-1" sw peers.toml "run$r-auto-priority" "${s[@]}" "${CP2[@]}" \
      "${k4[@]}" --set run.iters=10
  done
  for c in 32 8 2; do
    ENV="NCCL_MAX_CTAS=$c" sw peers.toml "nccl-max-ctas-$c" "${OURS[@]}" --set 'sweep.seq_len=[131072]' "${CP2[@]}" \
      --set 'sweep.overlap_chunks=[1, 2]' --set run.iters=10
  done
}
e_state-passing() {
  local s=(--set run.iters=4)
  facts
  sw strategies2.toml L64K "${s[@]}" --set 'sweep.seq_len=[65536]' --set 'sweep.path=["fused", "seed"]' \
    --set 'sweep.packing=["none", {docs = 8, density = 0.9}, {docs = 64, density = 0.9}]'
  sw strategies2.toml L64K/rows "${s[@]}" --set 'sweep.seq_len=[65536]' "${DOCS8_64[@]}"
  sw strategies2.toml L128K "${s[@]}" "${DOCS8_64[@]}"
  report L128K --metrics layer_ms peak_mem_GiB
}

if [ "$name" = all ]; then
  entries | while IFS='|' read -r n _; do echo "## $n"; "e_$n"; done
else
  "e_$name"
fi
