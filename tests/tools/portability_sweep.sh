#!/usr/bin/env bash
# The whole test suite under every thread count (OMP_NUM_THREADS 1, 2) and every vector instruction
# set this CPU can run (ATEN_CPU_CAPABILITY default, avx2, and avx512 where the CPU has it): torch
# then runs the kernels of another CPU generation, so one machine shows what CI on another would
# see. Not part of `make test` (it runs the suite 4-6 times). Usage: make test-portability
# (or tests/tools/portability_sweep.sh [PYTHON] [extra pytest arguments]).
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${1:-.venv/bin/python}
shift || true
caps="default avx2"
grep -qw avx512f /proc/cpuinfo 2>/dev/null && caps="$caps avx512"
cpu=$(grep -m1 "model name" /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//')
logs=$(mktemp -d)
results=()
status=0
for cap in $caps; do
  for threads in 1 2; do
    echo "=== ATEN_CPU_CAPABILITY=$cap OMP_NUM_THREADS=$threads" >&2
    start=$(date +%s)
    log="$logs/$cap-$threads.log"
    ATEN_CPU_CAPABILITY=$cap OMP_NUM_THREADS=$threads "$PY" -m pytest tests -p no:cacheprovider "$@" >"$log" 2>&1
    rc=$?
    tail -3 "$log" >&2
    line=$(grep -E "[0-9]+ (passed|failed)" "$log" | tail -1)
    [ "$rc" -ne 0 ] && status=1
    results+=("$(printf '| %-8s | %7s | %4s | %5ss | %s |' "$cap" "$threads" "$rc" "$(( $(date +%s) - start ))" "$line")")
  done
done
echo
echo "CPU: ${cpu:-unknown}; torch $("$PY" -c 'import torch; print(torch.__version__)')"
echo "| ATEN_CPU_CAPABILITY | threads | exit | time | pytest |"
echo "|---|---|---|---|---|"
printf '%s\n' "${results[@]}"
echo "full logs: $logs"
exit $status
