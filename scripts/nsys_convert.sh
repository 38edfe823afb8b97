#!/usr/bin/env bash
# On the CPU machine, after scripts/nsys_session.sh: the captures made into reports, their nsys stats tables,
# `cpbench nsys-import` of each, the agreement with the same run's CUDA-event region times and torch.profiler's
# kernel count (scripts/nsys_check.py), and a results set holding all of it but the reports.
#
#   bash scripts/nsys_convert.sh FILES_DIR results/h200-nsys-YYYYMMDD [NSYS]
#
# FILES_DIR: what the session left under $OUT (cpbench.N.qdstrm, probe.qdstrm, session.tgz, summary.txt).
# NSYS: the nsys of the same version with its host part (default: bash ../shared/tools/nsys_host.sh, which
# fetches it once); its importer turns each .qdstrm into a .nsys-rep. Prints the agreement table; exit 1
# when a region or the kernel count disagrees (the set is written either way).
set -uo pipefail
cd "$(dirname "$0")/.."
SRC=${1:?FILES_DIR}
SET=${2:?results/SET}
HOST=${3:-../shared/tools/nsys_host.sh}
export CPBENCH_NSYS="bash $HOST nsys"
W=$(mktemp -d /tmp/nsys-convert.XXXXXX)
mkdir -p "$SET"
tar xzf "$SRC/session.tgz" -C "$W"
cp "$SRC"/*.qdstrm "$W/"
for q in "$W"/*.qdstrm; do bash "$HOST" import "$q" >/dev/null || { echo "import failed: $q" >&2; exit 2; }; done
stats() { bash "$HOST" nsys stats --report "$1" --format csv --output - --force-export=true "$2"; }
# the run (its results, the CUDA-event region times), the torch.profiler counts, the plain run, the costs
cp "$W/nsys-run/results.csv" "$W/nsys-run/meta.json" "$W/nsys-run/torch_kernels.csv" "$SET/"
mkdir -p "$SET/plain" "$SET/torch"
cp "$W/plain-run/results.csv" "$W/plain-run/meta.json" "$SET/plain/"
cp "$W/torch-run/results.csv" "$W/torch-run/meta.json" "$SET/torch/"
cp "$W"/nvtx_cost*.csv "$W/session.txt" "$W/nsys_command.txt" "$W/probe_env.txt" "$W/probe.py" "$SET/" 2>/dev/null
n=0
for rep in $(ls "$W"/cpbench*.nsys-rep | sort -t. -k2 -n); do
  n=$((n + 1))
  for r in nvtx_gpu_proj_sum cuda_gpu_kern_sum nvtx_pushpop_sum; do stats "$r" "$rep" >"$SET/$r.$n.csv"; done
  python3 -m cpbench nsys-import "$SET/nvtx_gpu_proj_sum.$n.csv" --csv "$SET/nsys_import.$n.csv"
done
for r in nvtx_pushpop_sum nvtx_gpu_proj_sum; do stats "$r" "$W/probe.nsys-rep" >"$SET/probe_$r.csv"; done
echo "NVTX ranges the probe's report holds (probe_nvtx_pushpop_sum.csv):"
grep -o 'probe:[^,"]*' "$SET/probe_nvtx_pushpop_sum.csv" | sort -u | sed 's/^/  /'
python3 scripts/nsys_check.py "$SET" --plain "$SET/plain" | tee "$SET/agreement.txt"
rc=${PIPESTATUS[0]}
{
  echo "# Nsight Systems session on one H200 (made by scripts/nsys_session.sh; converted by scripts/nsys_convert.sh)"
  echo
  echo "Machine and versions (session.txt):"
  sed 's/^/    /' "$SET/session.txt"
  echo
  echo "The profiled command, printed by \`cpbench sweep ... --profile nsys\` and run as printed (nsys_command.txt):"
  echo
  sed 's/^/    /' "$SET/nsys_command.txt"
  echo
  echo "Files: results.csv / meta.json (the profiled run, with its CUDA-event region times), nsys_import.N.csv"
  echo "(\`cpbench nsys-import\` of capture N), nvtx_gpu_proj_sum.N.csv, cuda_gpu_kern_sum.N.csv,"
  echo "nvtx_pushpop_sum.N.csv (\`nsys stats\` of capture N), torch_kernels.csv (torch.profiler, same cases and"
  echo "iterations), plain/ (the same cases without a profiler), torch/, agreement.txt (scripts/nsys_check.py),"
  echo "nvtx_cost.csv / nvtx_cost_nsys.csv (scripts/nvtx_cost.py without a profiler / under nsys), probe_*"
  echo "(which NVTX forms this nsys records). The reports themselves are not kept."
} >"$SET/README.md"
rm -rf "$W"
echo "set written: $SET (edit README.md: what it shows)"
exit "$rc"
