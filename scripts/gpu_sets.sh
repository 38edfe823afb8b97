#!/usr/bin/env bash
# The 2-GPU measurement sets (NCCL, two NVLinked H100s), in two stages that each fit a 10-minute command:
#   bash scripts/gpu_sets.sh 1   GPU tests, NCCL parity at cp 2, ours vs the peers at L 32K and 64K
#   bash scripts/gpu_sets.sh 2   strategies at cp 2, L 128K (fused/seed, hidden/state passing, BSHD/8/64 docs)
#   bash scripts/gpu_sets.sh 3   ours at L 128K (cp 1/2) and 256K (cp 2), NeMo at cp 2 L 128K, the peers at
#                                cp 1 L 128K (each in its own run: a peer that overflows int32 indexing ends
#                                its process); projection mode at cp 2 and 8 with 1/2/4 head chunks
#   bash scripts/gpu_sets.sh 5-9, 15, 19: measured runtime switches since removed (the pack-pass exchange, the
#                                copy-engine transport, the communication stream's priority); run them at commit 765733b
#   bash scripts/gpu_sets.sh 10  GPU tests, NCCL parity, ours beside NeMo AutoModel (cp 2, L 128K, BSHD and 64
#                                documents) and mamba-ssm's Mamba2 (cp 1, L 128K)
#   bash scripts/gpu_sets.sh 11  state passing (both exchanges) beside the hidden strategy at cp 2, L 128K, 8/64 docs
#   bash scripts/gpu_sets.sh 14  a change against the code before it (base/cp_core), cp 2, L 64K/128K, k 2,
#                                NCCL parity, one profiled iteration and its compute-stream gaps
#   bash scripts/gpu_sets.sh 16  the peers only: ours vs NeMo AutoModel (cp 2, L 128K) and mamba-ssm (cp 1, L 64K)
#   bash scripts/gpu_sets.sh 17  a change against base/cp_core, k 1/2, L 64K/128K, with GPU tests, NCCL parity and cp 1;
#                                (SKIP_TESTS=1: without them; ROUNDS=N: N rounds); 18: ROUNDS (default 2) more rounds
#   bash scripts/gpu_sets.sh 20  cp 2 with k 1/2/4 measured and in projection mode (the model checked), cp 1
#   bash scripts/gpu_sets.sh 21  three versions (base/, mid/, the tree) interleaved, cp 2, k 1/2, with GPU tests,
#                                NCCL parity (also chunks splitting a group) and cp 1
#   bash scripts/gpu_sets.sh 22  chunks splitting a group: 2 groups at cp 2 (k 1/2/4) measured, cp 8 projected
#   bash scripts/gpu_sets.sh 23  one profiled iteration (cp 2, L 128K, k 2) and its compute-stream gaps; SSD on 16/8/4 heads
#   bash scripts/gpu_sets.sh 4   the GPU tests against mamba-ssm and of NaN isolation, NCCL parity of the
#                                chunked layer, ours (k 1/2) beside NeMo at cp 2, L 128K in one sweep
# Results under $OUT (default out/). Needs mamba-ssm, causal-conv1d, nvtx, nemo-automodel (scripts/gpu_setup.sh).
source scripts/gpu_setup.sh
stage=${1:?stage 1 or 2}
sweep() { torchrun --nproc-per-node 2 -m cpbench sweep "$@" --no-progress 2>&1 | grep -vE "UserWarning|warnings.warn"; }
# ab NAME VAR "V1 V2" SETS...: the same sweep once per value of the environment variable VAR, one tarball
ab() {
  local name=$1 var=$2 values=$3; shift 3
  for v in $values; do
    env "$var=$v" timeout 200 bash -c "$(declare -f sweep); sweep scenarios/peers.toml \
      --out $OUT/$name-$v --set 'sweep.impl=[\"cp_core\"]' --set 'sweep.overlap_chunks=[1, 2]' \
      --set run.iters=3 $*" | tail -1
    python3 -m cpbench report "$OUT/$name-$v" --metrics layer_ms layer_nocomm_ms exposed_comm_ms 2>&1 | tail -12
  done
  (cd "$OUT" && rm -f "$name"-*/.cpbench.lock && tar czf "$name.tgz" "$name"-* && rm -rf "$name"-*/)
}
machine_facts() {
  { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nvidia-smi topo -m;
    python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.nccl.version())"; } > "$OUT/machine.txt" 2>&1
}
# peers L1: ours beside NeMo AutoModel (cp 2, L 128K, BSHD and 64 documents, k 1/2) and beside mamba-ssm's
# Mamba2 (cp 1, L L1), the ratios printed, one tarball
peers() {
  timeout 200 bash -c "$(declare -f sweep); sweep scenarios/peers.toml --out $OUT/peers-cp2 --set 'sweep.seq_len=[131072]' \
    --set 'sweep.cp_size=[2]' --set 'sweep.overlap_chunks=[1, 2]' --set 'sweep.impl=[\"cp_core\", \"nemo\"]' \
    --set run.iters=3" | tail -1
  timeout 100 bash -c "$(declare -f sweep); sweep scenarios/peers.toml --out $OUT/peers-cp1 --set 'sweep.seq_len=[$1]' \
    --set 'sweep.cp_size=[1]' --set 'sweep.packing=[\"none\"]' --set 'sweep.overlap_chunks=[1]' \
    --set 'sweep.impl=[\"cp_core\", \"mamba_ssm\"]' --set run.iters=3" | tail -1
  python3 -m cpbench report "$OUT/peers-cp2" --vs nemo --metrics layer_ms peak_mem_GiB 2>&1 | tail -9
  python3 -m cpbench report "$OUT/peers-cp1" --vs mamba_ssm --metrics layer_ms peak_mem_GiB 2>&1 | tail -6
  (cd "$OUT" && rm -f peers-*/.cpbench.lock && tar czf peers.tgz peers-cp2 peers-cp1 && rm -rf peers-cp2 peers-cp1)
}
# run_in base|mid|new "SWEEP ARGS" TIMEOUT: a sweep of base/cp_core or mid/cp_core (run from inside it: python puts the working
# directory first on sys.path, so PYTHONPATH alone would import the tree's cp_core) or of the tree; meta.json's
# env.cp_core_path says which was measured
run_in() {
  local dir=$PWD; [ "$1" = new ] || dir=$PWD/$1
  (cd "$dir" && PYTHONPATH=/tmp/site:$dir:$OLDPWD timeout "$3" bash -c "$(declare -f sweep); $2")
}
if [ "$stage" = 1 ]; then
  machine_facts
  MAMBA_DETERMINISTIC=1 timeout 170 python3 -m pytest -q -m gpu -p no:cacheprovider \
    tests/test_peers_gpu.py tests/test_mixer_gpu.py 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
  MAMBA_DETERMINISTIC=1 timeout 120 torchrun --nproc-per-node 2 tests/nccl_parity.py --cp 2 --strategies hidden hidden@2 \
    2>&1 | tee "$OUT/nccl_parity.txt" | grep -E "FAIL|passed"
  timeout 280 bash -c "$(declare -f sweep); sweep scenarios/peers.toml --out $OUT/peers-a --set 'sweep.seq_len=[32768, 65536]'" | tail -4
elif [ "$stage" = 4 ]; then
  MAMBA_DETERMINISTIC=1 timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_mamba_ssm_gpu.py \
    tests/test_kernels_gpu.py tests/test_mixer_gpu.py 2>&1 | tail -12 | tee "$OUT/gpu_tests.txt"
  MAMBA_DETERMINISTIC=1 timeout 60 torchrun --nproc-per-node 2 tests/nccl_parity.py --cp 2 --strategies hidden@2 \
    2>&1 | tee "$OUT/nccl_parity.txt" | grep -E "FAIL|passed"
  timeout 80 bash -c "$(declare -f sweep); sweep scenarios/peers.toml --out $OUT/peers128 --set 'sweep.seq_len=[131072]' \
    --set 'sweep.cp_size=[2]' --set 'sweep.packing=[\"none\"]' --set 'sweep.overlap_chunks=[1, 2]' \
    --set 'sweep.impl=[\"cp_core\", \"nemo\"]' --set run.iters=3" | tail -2
  python3 -m cpbench report "$OUT/peers128" --vs nemo --metrics layer_ms peak_mem_GiB exposed_comm_ms 2>&1 | tail -12
elif [ "$stage" = 5 ] || [ "$stage" = 6 ]; then
  # measured the pack-pass exchange (CP_CORE_EXCHANGE), a runtime switch removed: neutral or slower than the default (results/README.md)
  echo "stage $stage measured the pack-pass exchange (CP_CORE_EXCHANGE), since removed; run it at commit 765733b" >&2; exit 2
elif [ "$stage" = 7 ]; then
  # measured the copy-engine transport (CP_CORE_TRANSPORT), a runtime switch removed: neutral or slower than the default (results/README.md)
  echo "stage $stage measured the copy-engine transport (CP_CORE_TRANSPORT), since removed; run it at commit 765733b" >&2; exit 2
elif [ "$stage" = 8 ] || [ "$stage" = 9 ]; then
  # measured the copy-engine transport (CP_CORE_TRANSPORT), a runtime switch removed: neutral or slower than the default (results/README.md)
  echo "stage $stage measured the copy-engine transport (CP_CORE_TRANSPORT), since removed; run it at commit 765733b" >&2; exit 2
elif [ "$stage" = 10 ]; then
  # the GPU tests, NCCL parity (default transport), ours beside NeMo AutoModel (cp 2) and mamba-ssm (cp 1)
  machine_facts
  MAMBA_DETERMINISTIC=1 timeout 150 python3 -m pytest -q -p no:cacheprovider -p no:warnings tests/test_mamba_ssm_gpu.py \
    tests/test_mixer_gpu.py 2>&1 | tail -4 | tee "$OUT/gpu_tests.txt"
  MAMBA_DETERMINISTIC=1 timeout 70 torchrun --nproc-per-node 2 tests/nccl_parity.py --cp 2 --strategies hidden@2 \
    2>&1 | tee "$OUT/nccl_parity.txt" | grep -E "FAIL|passed"
  peers 131072
elif [ "$stage" = 11 ]; then
  # state passing at L 128K with 8 and 64 documents beside the hidden strategy (fused)
  timeout 300 bash -c "$(declare -f sweep); sweep scenarios/strategies2.toml --out $OUT/strategies128 \
    --set 'sweep.path=[\"fused\"]' --set 'sweep.packing=[{docs = 8, density = 0.9}, {docs = 64, density = 0.9}]'" | tail -3
  python3 -m cpbench report "$OUT/strategies128" --metrics layer_ms peak_mem_GiB 2>&1 | tail -12
  # mamba-ssm's Mamba2 at cp 1 beside ours: L 64K in one sweep, L 128K on its own (a peer that fails there
  # ends its process)
  timeout 90 bash -c "$(declare -f sweep); sweep scenarios/peers.toml --out $OUT/peers-cp1-64k --set 'sweep.seq_len=[65536]' \
    --set 'sweep.cp_size=[1]' --set 'sweep.packing=[\"none\"]' --set 'sweep.overlap_chunks=[1]' \
    --set 'sweep.impl=[\"cp_core\", \"mamba_ssm\"]' --set run.iters=3" | tail -1
  timeout 60 bash -c "$(declare -f sweep); sweep scenarios/peers.toml --out $OUT/peers-cp1-128k --set 'sweep.seq_len=[131072]' \
    --set 'sweep.cp_size=[1]' --set 'sweep.packing=[\"none\"]' --set 'sweep.overlap_chunks=[1]' \
    --set 'sweep.impl=[\"mamba_ssm\"]' --set run.iters=3" 2>&1 | tail -3
  python3 -m cpbench report "$OUT/peers-cp1-64k" --vs mamba_ssm --metrics layer_ms peak_mem_GiB 2>&1 | grep -A4 ratio
  (cd "$OUT" && rm -f */.cpbench.lock && tar czf sets11.tgz strategies128 peers-cp1-64k peers-cp1-128k && rm -rf strategies128 peers-cp1-*)
elif [ "$stage" = 14 ]; then
  # a change measured against the code before it, on one warm machine: base/cp_core (a copy of cp_core at
  # an earlier commit: mkdir base && git archive COMMIT cp_core | tar -x -C base) against the working tree,
  # cp 2, L 64K/128K, BSHD, k 2 (the change: also k 1, and cp 1), 10 iterations; then one profiled
  # iteration of the change at L 128K, k 2, and where each rank's compute stream waits
  machine_facts
  MAMBA_DETERMINISTIC=1 timeout 150 python3 -m pytest -q -p no:cacheprovider -p no:warnings tests/test_mamba_ssm_gpu.py \
    tests/test_mixer_gpu.py 2>&1 | tail -3 | tee "$OUT/gpu_tests.txt"
  MAMBA_DETERMINISTIC=1 timeout 150 torchrun --nproc-per-node 2 tests/nccl_parity.py --cp 2 --strategies hidden hidden@2 \
    2>&1 | tee "$OUT/nccl_parity.txt" | grep -E "FAIL|passed|Error"
  sets="--set 'sweep.impl=[\"cp_core\"]' --set 'sweep.seq_len=[65536, 131072]' --set 'sweep.packing=[\"none\"]' \
    --set run.iters=10"
  out=$(cd "$OUT" && pwd)
  for v in base new; do
    case $v in
      base) extra="--set 'sweep.cp_size=[2]' --set 'sweep.overlap_chunks=[2]'" ;;
      new) extra="--set 'sweep.cp_size=[1, 2]' --set 'sweep.overlap_chunks=[1, 2]'" ;;
    esac
    run_in $v "sweep $PWD/scenarios/peers.toml --out $out/ab-$v $sets $extra" 200 | tail -1
    python3 -m cpbench report "$OUT/ab-$v" --metrics layer_ms exposed_comm_ms comm_ms comm_wait_ms busbw_pct \
      peak_mem_GiB 2>&1 | tail -7
  done
  [ -n "$NO_TRACE" ] || timeout 100 bash -c "$(declare -f sweep); sweep scenarios/peers.toml --out $OUT/ab-trace --profile torch \
    --set 'sweep.impl=[\"cp_core\"]' --set 'sweep.seq_len=[131072]' --set 'sweep.packing=[\"none\"]' \
    --set 'sweep.cp_size=[2]' --set 'sweep.overlap_chunks=[2]' --set run.iters=1" | tail -1
  for t in $(ls "$OUT"/ab-trace/traces/*.json 2>/dev/null); do echo "== $t"; python3 -m cpbench trace "$t" --min-gap-ms 0.3 --top 8 | tail -14; done
  rm -rf "$OUT"/ab-trace/traces
  (cd "$OUT" && rm -f ab-*/.cpbench.lock && tar czf ab.tgz ab-* && rm -rf ab-*/)
elif [ "$stage" = 15 ]; then
  # measured the communication stream's priority (CP_CORE_COMM_PRIORITY), a runtime switch removed: neutral or slower than the default (results/README.md)
  echo "stage $stage measured the communication stream's priority (CP_CORE_COMM_PRIORITY), since removed; run it at commit 765733b" >&2; exit 2
elif [ "$stage" = 17 ] || [ "$stage" = 18 ]; then
  # a change against the code before it (base/cp_core, as stage 14), both k 1 and 2 on both sides, L 64K/128K,
  # BSHD, 10 iterations, in interleaved rounds (base, new; 17: the GPU tests and NCCL parity unless SKIP_TESTS is
  # set, cp 1, ROUNDS rounds, default 1; 18: ROUNDS more rounds, default 2, on the same warm machine)
  sets="--set 'sweep.impl=[\"cp_core\"]' --set 'sweep.seq_len=[65536, 131072]' --set 'sweep.packing=[\"none\"]' \
    --set run.iters=10 --set 'sweep.overlap_chunks=[1, 2]'"
  rounds=${ROUNDS:-1}
  if [ "$stage" = 17 ]; then
    machine_facts
    [ -n "$SKIP_TESTS" ] || MAMBA_DETERMINISTIC=1 timeout 200 python3 -m pytest -q -p no:cacheprovider -p no:warnings tests/test_mamba_ssm_gpu.py \
      tests/test_mixer_gpu.py tests/test_kernels_gpu.py::test_norm_on_slots_triton_bit_identical_to_one_call 2>&1 \
      | tail -3 | tee "$OUT/gpu_tests.txt"
    [ -n "$SKIP_TESTS" ] || MAMBA_DETERMINISTIC=1 timeout 150 torchrun --nproc-per-node 2 tests/nccl_parity.py --cp 2 --strategies hidden hidden@2 \
      2>&1 | tee "$OUT/nccl_parity.txt" | grep -E "FAIL|passed|Error"
    run_in new "sweep scenarios/peers.toml --out $OUT/r-cp1 $sets --set 'sweep.cp_size=[1]' \
      --set 'sweep.overlap_chunks=[1]'" 100 | tail -1
    python3 -m cpbench report "$OUT/r-cp1" --metrics layer_ms peak_mem_GiB 2>&1 | tail -4
  else
    rounds=${ROUNDS:-2}
  fi
  out=$(cd "$OUT" && pwd)
  for i in $(seq 1 "$rounds"); do
    for v in base new; do
      d="$out/r$stage-$i-$v"
      run_in "$v" "sweep $PWD/scenarios/peers.toml --out $d $sets --set 'sweep.cp_size=[2]'" 140 | tail -1
      echo "round $i $v"; python3 -m cpbench report "$d" --metrics layer_ms layer_nocomm_ms exposed_comm_ms layout_ms \
        peak_mem_GiB 2>&1 | tail -8
    done
  done
  (cd "$OUT" && rm -f r*/.cpbench.lock && tar czf "ab$stage.tgz" r*/ && rm -rf r*/)
elif [ "$stage" = 21 ]; then
  # three versions interleaved (base/cp_core, mid/cp_core, the tree), cp 2, k 1/2, L 64K/128K, BSHD, 10 iterations,
  # ROUNDS rounds (default 2); before them the GPU tests of the layer, NCCL parity (hidden, hidden@2, hidden@2s:
  # chunks splitting a group) and cp 1
  sets="--set 'sweep.impl=[\"cp_core\"]' --set 'sweep.seq_len=[65536, 131072]' --set 'sweep.packing=[\"none\"]' \
    --set run.iters=10 --set 'sweep.overlap_chunks=[1, 2]'"
  machine_facts
  MAMBA_DETERMINISTIC=1 timeout 200 python3 -m pytest -q -p no:cacheprovider -p no:warnings tests/test_mixer_gpu.py \
    tests/test_kernels_gpu.py::test_norm_on_slots_triton_bit_identical_to_one_call 2>&1 | tail -3 | tee "$OUT/gpu_tests.txt"
  MAMBA_DETERMINISTIC=1 timeout 150 torchrun --nproc-per-node 2 tests/nccl_parity.py --cp 2 --strategies hidden hidden@2 \
    hidden@2s 2>&1 | tee "$OUT/nccl_parity.txt" | grep -E "FAIL|passed|Error"
  run_in new "sweep scenarios/peers.toml --out $OUT/r-cp1 $sets --set 'sweep.cp_size=[1]' --set 'sweep.overlap_chunks=[1]'" 100 | tail -1
  python3 -m cpbench report "$OUT/r-cp1" --metrics layer_ms peak_mem_GiB 2>&1 | tail -4
  out=$(cd "$OUT" && pwd)
  for i in $(seq 1 "${ROUNDS:-2}"); do
    for v in base mid new; do
      d="$out/r$stage-$i-$v"
      run_in "$v" "sweep $PWD/scenarios/peers.toml --out $d $sets --set 'sweep.cp_size=[2]'" 140 | tail -1
      echo "round $i $v"; python3 -m cpbench report "$d" --metrics layer_ms exposed_comm_ms peak_mem_GiB 2>&1 | tail -7
    done
  done
  (cd "$OUT" && rm -f r*/.cpbench.lock && tar czf "ab$stage.tgz" r*/ && rm -rf r*/)
elif [ "$stage" = 22 ]; then
  # head chunks that split a group (the tree's code): 2 groups at cp 2 (one per rank), k 1/2/4, L 64K/128K, BSHD,
  # measured (and cp 1); then the Nemotron-H shape in projection mode at cp 8 (one group per rank), k 1/2/4,
  # L 128K/512K, communication modeled at 370 GB/s busbw
  machine_facts
  sets="--set 'sweep.impl=[\"cp_core\"]' --set 'sweep.packing=[\"none\"]' --set run.iters=10"
  timeout 100 bash -c "$(declare -f sweep); sweep scenarios/peers.toml --out $OUT/g2-cp1 $sets --set 'sweep.heads=[[128, 2]]' \
    --set 'sweep.seq_len=[65536, 131072]' --set 'sweep.cp_size=[1]' --set 'sweep.overlap_chunks=[1]'" | tail -1
  timeout 200 bash -c "$(declare -f sweep); sweep scenarios/peers.toml --out $OUT/g2-cp2 $sets --set 'sweep.heads=[[128, 2]]' \
    --set 'sweep.seq_len=[65536, 131072]' --set 'sweep.cp_size=[2]' --set 'sweep.overlap_chunks=[1, 2, 4]'" | tail -1
  python3 -m cpbench report "$OUT/g2-cp2" --metrics layer_ms exposed_comm_ms peak_mem_GiB 2>&1 | tail -9
  timeout 150 bash -c "python3 -m cpbench sweep scenarios/peers.toml --backend fake --fake-busbw 370 --no-progress \
    --out $OUT/cp8-projected $sets --set 'sweep.seq_len=[131072, 524288]' --set 'sweep.cp_size=[8]' \
    --set 'sweep.overlap_chunks=[1, 2, 4]'" 2>&1 | tail -1
  python3 -m cpbench report "$OUT/cp8-projected" --metrics layer_ms exposed_comm_ms 2>&1 | tail -9
  (cd "$OUT" && rm -f g2-*/.cpbench.lock cp8-*/.cpbench.lock && tar czf g2.tgz g2-* cp8-* && rm -rf g2-*/ cp8-*/)
elif [ "$stage" = 23 ]; then
  # where the final code's compute stream still waits (one profiled iteration, cp 2, L 128K, k 2, both ranks),
  # and mamba-ssm's SSD on 16 / 8 / 4 heads of one group at L 128K (a rank's work at cp 8 split into k chunks)
  machine_facts
  timeout 150 bash -c "$(declare -f sweep); sweep scenarios/peers.toml --out $OUT/trace --profile torch \
    --set 'sweep.impl=[\"cp_core\"]' --set 'sweep.seq_len=[131072]' --set 'sweep.packing=[\"none\"]' \
    --set 'sweep.cp_size=[2]' --set 'sweep.overlap_chunks=[2]' --set run.iters=1" | tail -1
  for t in "$OUT"/trace/traces/*.json; do echo "== $t"; python3 -m cpbench trace "$t" --min-gap-ms 0.3 --top 8 | tail -16; done \
    | tee "$OUT/trace_gaps.txt"
  rm -rf "$OUT"/trace/traces
  for h in 16 8 4; do
    MAMBA_DETERMINISTIC=1 timeout 100 python3 -m cpbench.kernel_bench --seq-len 131072 --cp 1 --shape "$h,64,1,128,256" \
      --ssd mamba_ssm --dtype bfloat16 --out "$OUT/ssd-h$h.csv" 2>&1 | tail -6
  done
  (cd "$OUT" && rm -f trace/.cpbench.lock && tar czf trace.tgz trace ssd-h*.csv && rm -rf trace ssd-h*.csv)
elif [ "$stage" = 19 ]; then
  # measured the pack-pass exchange (CP_CORE_EXCHANGE), a runtime switch removed: neutral or slower than the default (results/README.md)
  echo "stage $stage measured the pack-pass exchange (CP_CORE_EXCHANGE), since removed; run it at commit 765733b" >&2; exit 2
elif [ "$stage" = 20 ]; then
  # the tree's code: cp 1, and cp 2 with k 1/2/4 (L 64K/128K, BSHD, 10 iterations) measured over NCCL, then
  # the same cp 2 cases in projection mode (one process, communication modeled at 370 and 325 GB/s busbw)
  machine_facts
  sets="--set 'sweep.impl=[\"cp_core\"]' --set 'sweep.seq_len=[65536, 131072]' --set 'sweep.packing=[\"none\"]' \
    --set run.iters=10"
  timeout 100 bash -c "$(declare -f sweep); sweep scenarios/peers.toml --out $OUT/k-cp1 $sets --set 'sweep.cp_size=[1]' \
    --set 'sweep.overlap_chunks=[1]'" | tail -1
  timeout 200 bash -c "$(declare -f sweep); sweep scenarios/peers.toml --out $OUT/k-measured $sets --set 'sweep.cp_size=[2]' \
    --set 'sweep.overlap_chunks=[1, 2, 4]'" | tail -1
  python3 -m cpbench report "$OUT/k-measured" --metrics layer_ms exposed_comm_ms 2>&1 | tail -9
  for bw in 370 325; do
    timeout 100 bash -c "python3 -m cpbench sweep scenarios/peers.toml --backend fake --fake-busbw $bw --no-progress \
      --out $OUT/k-projected-$bw $sets --set 'sweep.cp_size=[2]' --set 'sweep.overlap_chunks=[1, 2, 4]'" 2>&1 | tail -1
    python3 -m cpbench report "$OUT/k-projected-$bw" --metrics layer_ms exposed_comm_ms 2>&1 | tail -9
  done
  (cd "$OUT" && rm -f k-*/.cpbench.lock && tar czf k.tgz k-* && rm -rf k-*/)
elif [ "$stage" = 16 ]; then
  # the peers only (no tests): ours beside NeMo AutoModel at cp 2, L 128K (BSHD, 64 documents), and beside
  # mamba-ssm's Mamba2 at cp 1, L 64K
  peers 65536
elif [ "$stage" = 2 ]; then
  timeout 150 bash -c "$(declare -f sweep); sweep scenarios/strategies2.toml --out $OUT/strategies" | tail -4
else
  MAMBA_DETERMINISTIC=1 timeout 100 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_peers_gpu.py 2>&1 \
    | tail -4 | tee "$OUT/gpu_tests_peers.txt"
  timeout 170 bash -c "$(declare -f sweep); sweep scenarios/peers.toml --out $OUT/peers-b --set 'sweep.seq_len=[131072]' \
    --set 'sweep.impl=[\"cp_core\"]' --set 'sweep.overlap_chunks=[1, 2]' --set run.iters=3" > "$OUT/peers-b.log" 2>&1
  timeout 80 bash -c "$(declare -f sweep); sweep scenarios/peers.toml --out $OUT/peers-c --set 'sweep.seq_len=[262144]' \
    --set 'sweep.cp_size=[2]' --set 'sweep.packing=[\"none\"]' --set 'sweep.impl=[\"cp_core\"]' \
    --set 'sweep.overlap_chunks=[2]' --set run.iters=3" > "$OUT/peers-c.log" 2>&1
  timeout 90 bash -c "$(declare -f sweep); sweep scenarios/peers.toml --out $OUT/peers-d --set 'sweep.seq_len=[131072]' \
    --set 'sweep.impl=[\"nemo\"]' --set 'sweep.cp_size=[2]' --set 'sweep.overlap_chunks=[1]' --set run.iters=3" > "$OUT/peers-d.log" 2>&1
  timeout 50 bash -c "$(declare -f sweep); sweep scenarios/peers.toml --out $OUT/peers-e --set 'sweep.seq_len=[131072]' \
    --set 'sweep.impl=[\"mamba_ssm\"]' --set 'sweep.cp_size=[1]' --set 'sweep.packing=[\"none\"]' \
    --set 'sweep.overlap_chunks=[1]' --set run.iters=3" > "$OUT/peers-e.log" 2>&1
  timeout 100 python3 -m cpbench sweep scenarios/peers.toml --backend fake --out "$OUT/projected" --no-progress \
    --set 'sweep.seq_len=[131072]' --set 'sweep.cp_size=[2, 8]' --set 'sweep.packing=[\"none\"]' \
    --set 'sweep.impl=[\"cp_core\"]' --set run.iters=3 > "$OUT/projected.log" 2>&1
  for f in "$OUT"/*.log; do echo "== $f"; grep -E "ok,|Error|error" "$f" | tail -3; done
fi
