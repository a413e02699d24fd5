#!/usr/bin/env bash
# compute-sanitizer sweep of the CUDA kernels: memcheck, racecheck, initcheck and
# synccheck, each on `bench/smoke.py --quick` (the fused prefill, every stage op and the
# SparseSkeleton kernels over tails, GQA 1/2/4/8, D 64/128, fp16/bf16), run in parallel.
# Usage: bash bench/sanitize.sh OUTDIR  ->  OUTDIR/sanitize_<tool>.log, summary on stdout.
set -uo pipefail
out=${1:-/tmp/out}
mkdir -p "$out"
pids=()
for tool in memcheck racecheck initcheck synccheck; do
  extra=()
  [[ $tool == memcheck ]] && extra=(--leak-check no)
  # cuBLAS's own trsm kernel (torch.linalg.solve_ex in the skeleton glue) reports barrier
  # divergence under synccheck: print every finding, so the summary below can count ours.
  [[ $tool == synccheck ]] && extra=(--print-limit 100000)
  timeout "${SANITIZE_TIMEOUT:-400}" compute-sanitizer --tool "$tool" "${extra[@]}" \
    python3 bench/smoke.py --quick > "$out/sanitize_$tool.log" 2>&1 &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
for tool in memcheck racecheck initcheck synccheck; do
  summary=$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$out/sanitize_$tool.log" | tail -1)
  cases=$(grep -c "^n=\|^skeleton n=" "$out/sanitize_$tool.log")
  echo "$tool: ${summary:-no summary (timed out or crashed)}; smoke cases run: $cases"
  # Findings by kernel (the frame after each report's first line).
  grep -E "^=========     at " "$out/sanitize_$tool.log" | sed -E 's/^=========     at ([^(<]*).*/\1/' \
    | sort | uniq -c | sed "s/^/  $tool finding in: /"
done
