#!/usr/bin/env bash
# The GPU check of issue 11, for a bare device machine (one H200, sm_90; the
# `device` tool): build for sm_90 only, run the CUDA op tests and the layer /
# model tests, the ops self-test, the ops benchmark at A4's and B3's shapes,
# ~100 training steps of A4 on the synthetic corpus, and one B3 step, each
# with a time limit so the whole stays under ~8 minutes. Everything it prints
# also goes to $OUT (default ./gpu_check_out): build.log, tests.log,
# selftest.log, bench_a4.json/.log, bench_b3.json/.log, train_a4.log,
# b3_step.log, summary.txt.
#
#   OUT=/tmp/out bash scripts/gpu_check.sh            # on the device machine
#   SOME_GPU_CHECK_DRY=1 bash scripts/gpu_check.sh    # here: the same steps on the CPU, tiny sizes
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
DRY="${SOME_GPU_CHECK_DRY:-0}"
summary="$OUT/summary.txt"
: >"$summary"
note() { echo "$*" | tee -a "$summary"; }
step() {  # step NAME LIMIT_S LOG CMD...: run with a time limit, log, record the outcome
  local name=$1 limit=$2 log=$3; shift 3
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$log" 2>&1
  local rc=$?
  note "$(printf '%-10s rc=%-3s %4ss  %s' "$name" "$rc" "$((SECONDS - t0))" "$log")"
  tail -n 25 "$OUT/$log"
  return 0
}

nproc_all=$(nproc)
note "gpu_check $(date -u +%FT%TZ) on $(hostname); $nproc_all cores; dry=$DRY"
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")' | tee -a "$summary"

# 1. build: sm_90 only, all cores (no registry there: no build isolation, no dependencies)
if [ "$DRY" = "1" ]; then
  note "build      (dry run: the installed build is used)"
  DEV=cpu
else
  export SOME_CUDA=1 CMAKE_CUDA_ARCHITECTURES=90 MAX_JOBS="$nproc_all" CMAKE_BUILD_PARALLEL_LEVEL="$nproc_all"
  step build 330 build.log "$PY" -m pip install --no-build-isolation --no-deps -v \
    -C cmake.define.CMAKE_CUDA_ARCHITECTURES=90 -e .
  DEV=cuda
fi
"$PY" -c 'import some; print("some build", some.build_info())' 2>&1 | tee -a "$summary"

# 2. tests: the CUDA op tests, the layer and model tests (what runs on the GPU there)
step tests 150 tests.log "$PY" -m pytest -q -x -p no:cacheprovider tests/test_ops_cuda.py tests/test_layer.py \
  tests/test_model.py tests/test_procedural.py -m "not slow"

# 3. the ops self-test (both backends against float64)
step selftest 60 selftest.log "$PY" -m some selftest --device "$DEV"

# 4. ops benchmark at A4's shape (T = 24576 tokens of a 32 x 768 batch) and B3's (N = 512), bf16
if [ "$DRY" = "1" ]; then T=512; R=1; else T=24576; R=5; fi
step bench_a4 90 bench_a4.log "$PY" benchmarks/bench_ops.py --device "$DEV" --dtype bfloat16 --T "$T" --N 64 \
  --repeat "$R" --storage both --json "$OUT/bench_a4.json"
step bench_b3 90 bench_b3.log "$PY" benchmarks/bench_ops.py --device "$DEV" --dtype bfloat16 --T "$T" --N 512 \
  --repeat "$R" --skip-naive --json "$OUT/bench_b3.json"

# 5. A4 training throughput: ~100 steps on the synthetic corpus (no corpus on the machine)
if [ "$DRY" = "1" ]; then
  A4=(--preset tiny --set data_source=synthetic ood_source=none epochs=1 train_subset_size=64 val_subset_size=16)
else
  A4=(--preset A4 --set data_source=synthetic ood_source=none epochs=1 train_subset_size=3200 val_subset_size=64
      checkpoint_every=0)
fi
step train_a4 150 train_a4.log "$PY" -m some train "${A4[@]}" --device "$DEV" --out "$OUT/run_a4" --no-plots \
  --no-progress
"$PY" - "$OUT/run_a4" <<'EOF' | tee -a "$summary"
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
m = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()] if (run / "metrics.jsonl").is_file() else []
if m:
    t = m[-1]["timing"]
    print(f"train_a4: {m[-1]['step']} steps, {t['train_tokens_per_s']:,.0f} tokens/s, val PPL {m[-1]['val_perplexity']:.2f}")
EOF

# 6. B3 (N = 512): build procedural and materialized, one step each, peak memory
if [ "$DRY" = "1" ]; then B3=(--set batch_size=1 seq_len=64 n_layers=2 --steps 1); else B3=(--set batch_size=32 --steps 1); fi
step b3_step 120 b3_step.log "$PY" benchmarks/b3_procedural_step.py --device "$DEV" "${B3[@]}"
note "done in ${SECONDS}s"
