#!/usr/bin/env bash
# The training-step checks on one GPU (issue 27), each stage one command under 10 minutes:
#   bash scripts/training_gpu.sh tests       # autocast bf16/fp16 on CUDA, the compiled op's fake, compiled == eager
#   bash scripts/training_gpu.sh memory      # checkpointed vs plain activation memory, Nemotron-H layer
#   bash scripts/training_gpu.sh compile     # torch.compile vs eager at the Nemotron-H shape
# Results under $OUT (tests.txt, checkpoint_memory.*, compile_bench.*), a summary on stdout.
source scripts/gpu_setup.sh
export MAMBA_DETERMINISTIC=1
case "${1:-tests}" in
  tests)
    timeout 540 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_training_gpu.py 2>&1 | tail -15 \
      | tee "$OUT/tests.txt" ;;
  memory)
    timeout 540 python3 scripts/checkpoint_memory.py --layers 4 --seq 8192 --cp 1 2 ;;
  compile)
    timeout 560 python3 scripts/compile_bench.py --seq 16384 --iters 20 ;;
  *) echo "usage: $0 tests|memory|compile" >&2; exit 2 ;;
esac
