#!/usr/bin/env bash
# The GPU check (issues 11 and 23), for the lent device machine: one H100 or
# H200 (sm_90), 16 cores, no network, at most 600 s a call, 15 minutes in all.
# It cannot look green when it failed: every step's exit status is recorded,
# a failed GPU / build / import step stops the script, a later step's failure
# does not stop the steps after it, and the exit status is 1 when any step
# failed, ran out of time or did not start (143 when the script is stopped by a
# signal, 2 for a bad argument). The steps, each with its own
# time limit, all under one deadline (GPU_CHECK_DEADLINE_S, default 420 s;
# a step gets min(its limit, the time left), and one that cannot start in
# time counts as failed):
#
#   gpu           torch sees one sm_90 GPU; versions, nvcc, compute-sanitizer      60 s
#   build         SOME_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 (PyTorch's CMake ignores    300 s
#                 CMAKE_CUDA_ARCHITECTURES) pip install --no-index
#                 --no-build-isolation --no-deps -e . (build/ is kept on a
#                 warm machine: a second call rebuilds incrementally)
#   import        some.build_info()["cuda"] is true (after a failed build       60 s
#                 `import some` finds the source tree without _C and every CUDA
#                 test would skip), and cuobjdump finds sm_90 code in _C
#   selftest      some selftest --device cuda --dtype float32 bfloat16: on a     150 s
#                 pass it records this build as verified on this GPU, and only
#                 then does backend `auto` serve the native kernels (later steps
#                 rely on it); the record must be there afterwards
#   ops_tests     tests/test_ops.py -k 'cuda or a4_shape' (both backends)        150 s
#                 -k cuda, both backends, no -x; fails unless tests passed, and
#                 if any was skipped (a skipped CUDA test here did not run)
#   gemm_kernels  scripts/gpu_smoke.py --gemm-check (SOME_CUDA_GEMM really        120 s
#                 switches aten::_grouped_mm on and off), then the experts /
#                 bf16 CUDA tests again with SOME_CUDA_GEMM=kernels
#   memcheck      compute-sanitizer --tool memcheck --error-exitcode 1 on        120 s
#                 scripts/gpu_smoke.py, PYTORCH_NO_CUDA_MEMORY_CACHING=1
#   initcheck     compute-sanitizer --tool initcheck, the same                   120 s
#                 (both skipped with a note if compute-sanitizer is missing)
#   bench_a4      benchmarks/bench_ops.py at A4's shape (T = batch x seq_len)      90 s
#                 in the dtype A4 trains in on the device (bfloat16)
#   train_a4      20 optimizer steps of A4 on the synthetic corpus, run dir     180 s
#                 under $GPU_CHECK_WORK; fails unless the ops backend was native
#   model_tests   tests/test_layer.py test_model.py test_procedural.py          150 s
#                 -m "not slow" -k "not cpu": their cuda cases (the `device`
#                 fixture) and the device-free ones
#
# What comes back under $OUT (the device returns at most 8 files of 16 MiB):
# summary.txt (first line RESULT: OK / FAILED ... / INCOMPLETE, one line per
# step) and gpu_check_logs.tar.gz (every step's log, capped at 2 MiB each, the
# JUnit XML files, the benchmark's JSON, the training run's small files),
# both rewritten after every step, so a call cut off still brings them back.
#
# On the device machine (the device tool's `run`, timeout_s about 480):
#   bash scripts/gpu_check.sh                          # everything
#   bash scripts/gpu_check.sh rerun                    # only what failed / did not finish last time
#   GPU_CHECK_ONLY=bench_a4,train_a4 bash scripts/gpu_check.sh   # these (gpu and import always run;
#                                                      # no build unless named: the installed one)
#   bash scripts/gpu_check.sh plan                     # print each step's command; run nothing
# `rerun` reads the state file build/gpu_check/state.tsv in the repository copy:
# ignored files there survive between calls only while the machine stays warm
# (30 s after a call); a fresh machine has none, and then everything runs, as it
# does when the sources changed since (the state holds a fingerprint of some/,
# csrc/, tests/, scripts/, benchmarks/, CMakeLists.txt and pyproject.toml) or
# when the gpu, build or import step did not pass. A self-test that passed is
# run again if its verification record is gone.
#
# Here, on the CPU (no build: the installed one; device cpu; tiny sizes; the
# sanitizer steps run the smoke script plainly or skip with a note):
#   SOME_GPU_CHECK_DRY=1 bash scripts/gpu_check.sh
#   SOME_GPU_CHECK_DRY=1 SOME_GPU_CHECK_FAIL=build bash scripts/gpu_check.sh   # a step forced to fail (tests)
#
# Variables: OUT (default build/gpu_check/out), PYTHON (python3),
# GPU_CHECK_DEADLINE_S (420), GPU_CHECK_STATE_DIR (build/gpu_check: state file
# and SOME_CACHE_DIR, where the self-test's verification record lives),
# GPU_CHECK_WORK (/tmp/some_gpu_check: logs and the training run, outside $OUT),
# SOME_GPU_CHECK_FAIL (comma-separated steps whose command is replaced by a
# failure).
# shellcheck disable=SC2016,SC2329  # step commands are single-quoted on purpose; post_* run by name
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

# the sanitizers last: the slowest steps, and the likeliest to flag library kernels
STEPS=(gpu build import selftest ops_tests bench_a4 train_a4 gemm_kernels model_tests memcheck initcheck)
FATAL=" gpu build import "
declare -A LIMIT=([gpu]=60 [build]=300 [import]=60 [selftest]=150 [ops_tests]=150 [gemm_kernels]=120
                  [memcheck]=120 [initcheck]=120 [bench_a4]=90 [train_a4]=180 [model_tests]=150)

MODE=${1:-all}
case "$MODE" in
  all | rerun | plan) ;;
  -h | --help) sed -n '2,/^# shellcheck/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  *) echo "usage: bash scripts/gpu_check.sh [all|rerun|plan]  (see the header of this file)" >&2; exit 2 ;;
esac
export PY=${PYTHON:-python3}
export DRY=${SOME_GPU_CHECK_DRY:-0}
FORCED=",${SOME_GPU_CHECK_FAIL:-},"
ONLY=${GPU_CHECK_ONLY:-}
DEADLINE_S=${GPU_CHECK_DEADLINE_S:-420}
RESERVE_S=10  # kept for the final summary and archive
MIN_STEP_S=5  # a step with less time left than this is not started
STATE_DIR=${GPU_CHECK_STATE_DIR:-$ROOT/build/gpu_check}
export WORK=${GPU_CHECK_WORK:-${TMPDIR:-/tmp}/some_gpu_check}
OUT=${OUT:-$STATE_DIR/out}
export LOGS=$WORK/logs
STATE=$STATE_DIR/state.tsv
SUMMARY=$OUT/summary.txt
ARCHIVE=$OUT/gpu_check_logs.tar.gz
export SOME_CACHE_DIR=$STATE_DIR/cache  # the self-test's verification record: kept with the state
export PYTHONUNBUFFERED=1
if [ "$DRY" = 1 ]; then export DEV=cpu; else export DEV=cuda; fi

FORCED_LIST=${SOME_GPU_CHECK_FAIL:-}
for name in ${ONLY//,/ } ${FORCED_LIST//,/ }; do
  [[ " ${STEPS[*]} " == *" $name "* ]] || { echo "gpu_check: unknown step '$name' (steps: ${STEPS[*]})" >&2; exit 2; }
done

# ------------------------------------------------------------ the commands
# Each is a bash script run as `timeout LIMIT bash -c CMD` in the repository
# root, output to $LOGS/NAME.log. Exit 0 passes, 99 is a skip (its reason: the
# last line starting with "SKIP:"), anything else fails; a post_NAME function
# (below) may turn a pass into a failure and writes the step's note.
declare -A CMD
CMD[gpu]=$(cat <<'EOF'
set -euo pipefail
"$PY" - <<'PYEOF'
import os
import torch
line = f"torch {torch.__version__}, CUDA {torch.version.cuda}, {os.cpu_count()} cores"
if os.environ["DRY"] == "1":
    print(f"gpu_check: dry run on the CPU; {line}")
else:
    assert torch.cuda.is_available(), f"torch {torch.__version__} sees no CUDA device"
    name, cap = torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0)
    print(f"gpu_check: {name} (sm_{cap[0]}{cap[1]}), {torch.cuda.device_count()} GPU(s); {line}")
    assert cap == (9, 0), f"this check builds for sm_90 only (TORCH_CUDA_ARCH_LIST=9.0); the GPU is sm_{cap[0]}{cap[1]}"
PYEOF
nvidia-smi -L 2>&1 || echo "(no nvidia-smi)"
nvcc --version 2>&1 | tail -n 2 || echo "(no nvcc on PATH)"
echo "compute-sanitizer: $(command -v compute-sanitizer || echo 'not on PATH')"
EOF
)
if [ "$DRY" = 1 ]; then
  CMD[build]='echo "dry run: no build; the installed build is used"'
else
  CMD[build]=$(cat <<'EOF'
set -euo pipefail
# PyTorch's CMake setup (Caffe2/public/cuda.cmake) sets CMAKE_CUDA_ARCHITECTURES OFF
# and takes the -gencode flags from TORCH_CUDA_ARCH_LIST (unset: the build machine's GPU).
export SOME_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=$(nproc) CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
"$PY" -m pip install --no-index --no-build-isolation --no-deps -v -e .
EOF
)
fi
CMD[import]=$(cat <<'EOF'
set -euo pipefail
so=$("$PY" - <<'PYEOF'
import os
import sys
import some
from some.ops import native
info = some.build_info()
print(f"build_info {info}", file=sys.stderr)
print(f"some from {os.path.dirname(some.__file__)}", file=sys.stderr)
if os.environ["DRY"] == "1":
    assert info["native"], f"the compiled extension is not loaded ({info.get('reason')}): the CPU build is missing"
else:
    assert info["cuda"], f"not a CUDA build of some (the build failed, or _C is a CPU build): {info}"
print(native.extension_module().__file__)
PYEOF
)
echo "extension: $so"
if [ "$DRY" = 1 ]; then
  echo "arch: (dry run: CPU build)"
elif command -v cuobjdump >/dev/null; then
  archs=$({ cuobjdump --list-elf "$so" 2>&1 || true; } | grep -o 'sm_[0-9]*[a-z]*' | sort -u | tr '\n' ' ' || true)
  echo "arch: ${archs:-none}"
  [[ " $archs " == *" sm_90 "* ]] || { echo "no sm_90 code in $so (TORCH_CUDA_ARCH_LIST not honoured?)" >&2; exit 1; }
else
  echo "arch: (cuobjdump not on PATH: not checked)"
fi
EOF
)
if [ "$DRY" = 1 ]; then SELFTEST_ARGS="--quick"; else SELFTEST_ARGS=""; fi
CMD[selftest]=$(cat <<EOF
set -euo pipefail
"\$PY" -m some selftest --device "\$DEV" --dtype float32 bfloat16 $SELFTEST_ARGS
EOF
)
[ "$DRY" = 1 ] || CMD[selftest]+=$(cat <<'EOF'

"$PY" -c 'import sys; from some.ops import verification as v
ok = v.is_verified("cuda"); print("cuda_verified", ok, v.record_path())
sys.exit(0 if ok else "the self-test passed but left no verification record: auto would serve the torch backend")'
EOF
)

# pytest: the device-parametrized op suite; the dry run picks a few CPU tests of it
OPS_FILES='tests/test_ops.py'
PYTEST='"$PY" -m pytest -q -rfEs -p no:cacheprovider'
if [ "$DRY" = 1 ]; then
  OPS_K="cpu and (route_opcheck or keystore_opcheck)"
  GEMM_K="cpu and experts_opcheck"
  MODEL_SEL='-k "parameter_counts or published_test_vectors"'
else
  OPS_K="cuda or a4_shape"  # (the A4-shape test is CUDA-only: no "cuda" in its id)
  GEMM_K="(cuda and (experts or bf16 or bfloat16 or bit_identical)) or a4_shape"
  MODEL_SEL='-m "not slow" -k "not cpu"'
fi
CMD[ops_tests]="set -euo pipefail
$PYTEST $OPS_FILES -k \"$OPS_K\" --junitxml \"\$LOGS/ops_tests.xml\""
CMD[gemm_kernels]=$(cat <<EOF
set -uo pipefail
# the switch in csrc/cuda/grouped_mm.cuh (grouped_mm_path): kernels | grouped_mm | auto
if ! grep -q 'getenv("SOME_CUDA_GEMM")' csrc/cuda/grouped_mm.cuh || ! grep -q '"kernels"' csrc/cuda/grouped_mm.cuh; then
  echo "csrc/cuda/grouped_mm.cuh reads no SOME_CUDA_GEMM=kernels switch: the hand-written GEMM path cannot be forced" >&2
  exit 3
fi
rc=0
"\$PY" scripts/gpu_smoke.py --device "\$DEV" --gemm-check || rc=\$?
r=0
SOME_CUDA_GEMM=kernels $PYTEST $OPS_FILES -k "$GEMM_K" --junitxml "\$LOGS/gemm_kernels.xml" || r=\$?
exit \$(( rc ? rc : r ))
EOF
)
if [ "$DRY" = 1 ]; then
  CMD[memcheck]=$(cat <<'EOF'
set -euo pipefail
echo "NOTE: dry run: no compute-sanitizer; the smoke script ran plainly on the CPU"
"$PY" scripts/gpu_smoke.py --device cpu
EOF
)
  CMD[initcheck]='echo "SKIP: dry run: no compute-sanitizer on the CPU"; exit 99'
else
  for tool in memcheck initcheck; do
    CMD[$tool]=$(cat <<EOF
set -euo pipefail
san=\$(command -v compute-sanitizer || ls "\${CUDA_HOME:-/usr/local/cuda}"/bin/compute-sanitizer 2>/dev/null || true)
[ -n "\$san" ] || { echo "SKIP: compute-sanitizer is not on PATH (nor in \\\$CUDA_HOME/bin)"; exit 99; }
# no caching allocator: every tensor its own cudaMalloc, so an overrun is outside any allocation
PYTORCH_NO_CUDA_MEMORY_CACHING=1 "\$san" --tool $tool --error-exitcode 1 --print-limit 50 \\
  "\$PY" scripts/gpu_smoke.py --device cuda
EOF
)
  done
fi
if [ "$DRY" = 1 ]; then BENCH_EXTRA="--repeat 1 --skip-naive"; else BENCH_EXTRA="--repeat 5"; fi
CMD[bench_a4]=$(cat <<EOF
set -euo pipefail
# A4's shape and the dtype it trains in on this device, read from the preset
eval "\$("\$PY" -c 'import os; from some.runs import get_preset
c = get_preset("A4").for_device(os.environ["DEV"])
shape = (c.batch_size * c.seq_len, c.d_model, c.d_ffn, c.num_experts, c.top_k)
if os.environ["DRY"] == "1":
    shape = (64, 16, 32, 8, 2)  # tiny on the CPU
print("T=%d D=%d H=%d N=%d K=%d" % shape, "DTYPE=" + c.expert_dtype)')"
echo "A4: T=\$T d=\$D h=\$H N=\$N k=\$K dtype=\$DTYPE"
"\$PY" benchmarks/bench_ops.py --device "\$DEV" --dtype "\$DTYPE" --T "\$T" --d "\$D" --h "\$H" --N "\$N" --k "\$K" \\
  --storage both $BENCH_EXTRA --json "\$LOGS/bench_a4.json"
EOF
)
if [ "$DRY" = 1 ]; then
  export TRAIN_STEPS=2
  TRAIN_ARGS="--preset tiny --set data_source=synthetic ood_source=none epochs=1 train_subset_size=32 val_subset_size=8"
else
  export TRAIN_STEPS=20
  # 640 documents of the synthetic corpus, one a sample, A4's batch of 32: 20 optimizer steps
  TRAIN_ARGS="--preset A4 --set data_source=synthetic ood_source=none epochs=1 train_subset_size=640"
  TRAIN_ARGS+=" val_subset_size=64 checkpoint_every=0"
fi
CMD[train_a4]=$(cat <<EOF
set -euo pipefail
rm -rf "\$WORK/run_a4"
"\$PY" -m some train $TRAIN_ARGS --device "\$DEV" --out "\$WORK/run_a4" --no-plots --no-progress
mkdir -p "\$LOGS/train_a4"
cp "\$WORK/run_a4"/{metrics.jsonl,run.json,config.yaml} "\$LOGS/train_a4/"
"\$PY" - "\$WORK/run_a4" <<'PYEOF'
import json, math, os, sys
run = sys.argv[1]
m = [json.loads(line) for line in open(f"{run}/metrics.jsonl")]
backend = json.load(open(f"{run}/run.json")).get("ops_backend")
last = m[-1]
print(f"SUMMARY: {last['step']} steps, {last['timing']['train_tokens_per_s']:,.0f} tokens/s, "
      f"train loss {last['train_loss']:.3f}, val PPL {last['val_perplexity']:.2f}, ops backend {backend}")
problems = []
if last["step"] != int(os.environ["TRAIN_STEPS"]):
    problems.append(f"{last['step']} steps instead of {os.environ['TRAIN_STEPS']}")
if not math.isfinite(last["train_loss"]):
    problems.append("a non-finite loss")
if os.environ["DEV"] == "cuda" and backend != "native":
    problems.append(f"ops backend {backend}: 'auto' did not serve the native kernels (not verified by the self-test?)")
sys.exit("train_a4: " + "; ".join(problems) if problems else 0)
PYEOF
EOF
)
CMD[model_tests]="set -euo pipefail
$PYTEST tests/test_layer.py tests/test_model.py tests/test_procedural.py $MODEL_SEL --junitxml \"\$LOGS/model_tests.xml\""

if [ "$MODE" = plan ]; then  # each step's command, its syntax checked; nothing runs
  rc=0
  for name in "${STEPS[@]}"; do
    printf '# ---- %s (limit %ss%s)\n%s\n' "$name" "${LIMIT[$name]}" \
      "$([[ "$FATAL" == *" $name "* ]] && echo ', stops the check when it fails')" "${CMD[$name]}"
    bash -n -c "${CMD[$name]}" || { echo "# ^ syntax error in the $name step" >&2; rc=1; }
  done
  exit $rc
fi

mkdir -p "$OUT" "$STATE_DIR" "$WORK"
rm -rf "$LOGS"
mkdir -p "$LOGS"

# ------------------------------------------------------ post-step checks
NOTE=""
junit_note() {  # junit_note XML [noskip]: "P passed, F failed, E errors, S skipped"; fails unless
  # some test passed, and with noskip if any was skipped (a skipped CUDA test on the GPU machine did not run)
  [ -f "$1" ] || { NOTE="no JUnit report (pytest did not finish)"; return 1; }
  NOTE=$("$PY" - "$1" "${2:-}" <<'EOF'
import sys
import xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
line = f"{passed} passed, {n['failures']} failed, {n['errors']} errors, {n['skipped']} skipped"
if passed == 0:
    line += "; no test passed"
if sys.argv[2] == "noskip" and n["skipped"]:
    line += " (CUDA tests must not skip here: the reasons are in the log, pytest -rs)"
print(line)
sys.exit(0 if passed > 0 and not (sys.argv[2] == "noskip" and n["skipped"]) else 1)
EOF
) || { NOTE=${NOTE:-unreadable JUnit report}; return 1; }
}
if [ "$DRY" = 1 ]; then NOSKIP=""; else NOSKIP=noskip; fi
post_gpu() { NOTE=$(grep -m1 '^gpu_check: ' "$1" | cut -c12-) || true; }
post_build() {
  NOTE=$(grep -m1 -o 'Added CUDA NVCC flags for: .*' "$1" | sed 's/Added CUDA NVCC flags for: /nvcc: /') || true
  [ "$DRY" != 1 ] || NOTE="dry run: the installed build"
}
post_import() { NOTE=$(grep -m1 '^arch: ' "$1") || true; }
post_selftest() {
  NOTE=$(grep -m1 'checks passed' "$1") || true
  ! grep -q '^cuda_verified True' "$1" || NOTE+="; verified (auto serves the native kernels)"
}
post_ops_tests() { junit_note "$LOGS/ops_tests.xml" "$NOSKIP"; }
post_gemm_kernels() {
  local rc=0
  junit_note "$LOGS/gemm_kernels.xml" "$NOSKIP" || rc=1
  local seen
  seen=$(grep -o 'SOME_CUDA_GEMM=[a-z_]* *aten::_grouped_mm ran: [A-Za-z]*' "$1" | sed 's/ *aten::_grouped_mm ran: /:/' |
         tr '\n' ' ') || true
  [ -z "$seen" ] || NOTE+="; _grouped_mm ran with ${seen% }"
  return "$rc"
}
post_memcheck() { NOTE=$(grep -m1 -o 'ERROR SUMMARY: .*' "$1" || grep -m1 '^NOTE: ' "$1" | cut -c7-) || true; }
post_initcheck() { post_memcheck "$1"; }
post_bench_a4() {
  [ -f "$LOGS/bench_a4.json" ] || { NOTE="no bench_a4.json"; return 1; }
  NOTE=$("$PY" - "$LOGS/bench_a4.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
s, sh = r["seconds"], r["shape"]
parts = [f"T={sh['T']} {sh['dtype']}"] + [f"{k} {1e3 * v:.2f} ms" for k, v in s.items() if k.startswith("experts")]
ratio = r["ratios"].get("native speed-up over the torch backend (experts)")
print(", ".join(parts) + (f", native/torch speed-up {ratio:.2f}" if ratio else ""))
EOF
  ) || { NOTE="unreadable bench_a4.json"; return 1; }
}
post_train_a4() { NOTE=$(grep -m1 '^SUMMARY: ' "$1" | cut -c10-) || true; }
post_model_tests() {
  junit_note "$LOGS/model_tests.xml" || return 1
  NOTE+=" (the cuda cases of the layer, model and procedural tests)"
}

# ------------------------------------------------------ state and summary
declare -A STATUS=() RC=() PREV=()
SOURCES=""
write_state() {  # the outcome of every step, this call's over the earlier ones
  local tmp=$STATE.tmp name
  printf 'sources\t%s\n' "$SOURCES" >"$tmp"
  for name in "${STEPS[@]}"; do
    if [ -n "${STATUS[$name]:-}" ]; then
      printf '%s\t%s\t%s\n' "$name" "${STATUS[$name]}" "${RC[$name]}" >>"$tmp"
    elif [ -n "${PREV[$name]:-}" ]; then
      printf '%s\t%s\t%s\n' "$name" "${PREV[$name]}" "-" >>"$tmp"
    fi
  done
  mv "$tmp" "$STATE"
}
cap_log() {  # cap_log FILE: at most 2 MiB (its first and last MiB)
  local f=$1 max=$((2 * 1024 * 1024))
  [ -f "$f" ] && [ "$(stat -c %s "$f")" -gt "$max" ] || return 0
  { head -c $((max / 2)) "$f"; printf '\n\n[... %s bytes cut by gpu_check.sh ...]\n\n' "$(stat -c %s "$f")"
    tail -c $((max / 2)) "$f"; } >"$f.cut"
  mv "$f.cut" "$f"
}
archive() {  # one tar.gz of $LOGS, under the device's 16 MiB per file
  tar -czf "$ARCHIVE.tmp" -C "$WORK" logs 2>/dev/null || true
  if [ -f "$ARCHIVE.tmp" ] && [ "$(stat -c %s "$ARCHIVE.tmp")" -gt $((15 * 1024 * 1024)) ]; then
    find "$LOGS" -type f -size +256k -exec sh -c 'tail -c 262144 "$1" >"$1.t" && mv "$1.t" "$1"' _ {} \;
    tar -czf "$ARCHIVE.tmp" -C "$WORK" logs 2>/dev/null || true
  fi
  [ ! -f "$ARCHIVE.tmp" ] || mv "$ARCHIVE.tmp" "$ARCHIVE"
}
say() { echo "$*" | tee -a "$SUMMARY"; }
record() {  # record NAME STATUS RC SECONDS LIMIT NOTE
  STATUS[$1]=$2 RC[$1]=$3
  say "$(printf '%-8s %-13s rc=%-4s %4ss/%-4s %s' "$2" "$1" "$3" "$4" "$5" "$6")"
  write_state
  archive
}

forced() { [[ "$FORCED" == *",$1,"* ]]; }
STEP_PID="" STEP_T0=0 CURRENT=""
run_step() {  # run_step NAME
  local name=$1 log=$LOGS/$1.log limit=${LIMIT[$1]} cmd=${CMD[$1]} left rc=0 t0 status
  left=$((DEADLINE_S - SECONDS - RESERVE_S))
  ((limit <= left)) || limit=$left
  if ((limit < MIN_STEP_S)); then
    record "$name" TIMEOUT - 0 - "not started: the ${DEADLINE_S}s deadline (rerun to run it)"
    return 0
  fi
  if forced "$name"; then cmd="echo \"forced failure (SOME_GPU_CHECK_FAIL=$name)\" >&2; exit 1"; fi
  printf '# gpu_check step %s, limit %ss, started %s\n%s\n# ---- output\n' "$name" "$limit" "$(date -u +%T)" \
    "$cmd" >"$log"
  t0=$SECONDS STEP_T0=$SECONDS CURRENT=$name
  timeout -k 10 "$limit" bash -c "$cmd" >>"$log" 2>&1 </dev/null &
  STEP_PID=$!
  wait "$STEP_PID" || rc=$?
  STEP_PID=""
  NOTE=""
  case $rc in
    0) status=PASS ;;
    99) status=SKIP ;;
    124 | 137) status=TIMEOUT ;;
    *) status=FAIL ;;
  esac
  if forced "$name"; then
    NOTE="forced failure (SOME_GPU_CHECK_FAIL)"
  elif [ "$status" = SKIP ]; then
    NOTE=$(grep '^SKIP: ' "$log" | tail -n 1 | cut -c7-) || true
  elif declare -F "post_$name" >/dev/null; then
    if ! "post_$name" "$log" && [ "$status" = PASS ]; then status=FAIL rc=post; fi
  fi
  if [ "$status" = FAIL ] && [ -z "$NOTE" ]; then  # the error's last line says most
    NOTE=$(grep -v '^[[:space:]]*$' "$log" | tail -n 1 | cut -c1-160) || true
  fi
  [ "$status" != TIMEOUT ] || NOTE="timed out after ${limit}s${NOTE:+; $NOTE}"
  cap_log "$log"
  record "$name" "$status" "$rc" "$((SECONDS - t0))" "$limit" "$NOTE"
  if [ "$status" = FAIL ] || [ "$status" = TIMEOUT ]; then
    echo "---- last lines of $name.log:"
    tail -n 30 "$log" | sed 's/^/    /'
  fi
}

FINISHED=0
finish() {  # the RESULT line (first and last line of summary.txt), state, archive; the exit status
  local rc=$1 failed="" notrun="" name
  trap - EXIT TERM INT
  for name in "${STEPS[@]}"; do
    case "${STATUS[$name]:-}" in
      FAIL | TIMEOUT) failed+=" $name" ;;
      NOTRUN) notrun+=" $name" ;;
    esac
  done
  if [ -n "$failed$notrun" ] && [ "$rc" = 0 ]; then rc=1; fi
  local result="RESULT: OK (every step run passed or was skipped with a note)"
  [ "$rc" = 0 ] || result="RESULT: FAILED:${failed:- the script itself}${notrun:+; not run:$notrun} (exit $rc)"
  say "$result; ${SECONDS}s"
  { echo "$result"; tail -n +2 "$SUMMARY"; } >"$SUMMARY.tmp" && mv "$SUMMARY.tmp" "$SUMMARY"
  write_state
  archive
  FINISHED=1
  exit "$rc"
}
on_signal() {
  if [ -n "$STEP_PID" ]; then  # the step in flight: stopped, and recorded as failed
    kill -TERM "$STEP_PID" 2>/dev/null || true
    wait "$STEP_PID" 2>/dev/null || true
    record "$CURRENT" FAIL 143 "$((SECONDS - STEP_T0))" - "interrupted by a signal"
  fi
  say "gpu_check: stopped by a signal"
  finish 143
}
on_exit() {  # an error of the script itself (set -e): never a silent pass
  local rc=$?
  [ "$FINISHED" = 1 ] && return
  say "gpu_check: the script stopped on an error of its own (exit $rc)"
  finish $((rc ? rc : 1))
}
trap on_exit EXIT
trap on_signal TERM INT
echo "RESULT: INCOMPLETE (the script has not finished: it ran, or was cut off, during the last step below)" \
  >"$SUMMARY"


# ------------------------------------------------------ which steps run
# The state file holds each step's last outcome for one version of the sources (a
# fingerprint of their files): passes of other sources are void, so they are not kept.
SOURCES=$({ find some csrc tests scripts benchmarks -type f -not -path '*/__pycache__/*' -not -name '*.so' \
              -not -name '*.pyc' -print0 2>/dev/null | sort -z | xargs -0 sha256sum || true
            sha256sum CMakeLists.txt pyproject.toml 2>/dev/null || true; } | sha256sum | cut -c1-16)
STATE_NOTE=""
if [ -f "$STATE" ]; then
  if [ "$(head -n 1 "$STATE")" = "sources	$SOURCES" ]; then
    while IFS=$'\t' read -r name status _; do [ -z "$name" ] || PREV[$name]=$status; done < <(tail -n +2 "$STATE")
  else
    STATE_NOTE="the state file is of other sources: its outcomes are void"
  fi
fi
selected() { [[ " $SELECTED " == *" $1 "* ]]; }
SELECTED=""
SELECT_NOTE=""
if [ -n "$ONLY" ]; then
  SELECTED="gpu import ${ONLY//,/ }"
  SELECT_NOTE="only: ${ONLY}"
elif [ "$MODE" = rerun ]; then
  if [ ${#PREV[@]} = 0 ]; then
    SELECTED="${STEPS[*]}"
    SELECT_NOTE="rerun: ${STATE_NOTE:-no state file ($STATE)}: everything runs"
  else
    for name in "${STEPS[@]}"; do
      case "${PREV[$name]:-NOTRUN}" in PASS | SKIP) ;; *) SELECTED+=" $name" ;; esac
    done
    if [[ " $SELECTED " == *" build "* || " $SELECTED " == *" import "* || " $SELECTED " == *" gpu "* ]]; then
      SELECTED="${STEPS[*]}"
      SELECT_NOTE="rerun: the build did not pass last time: everything runs"
    else
      SELECTED="gpu import$SELECTED"
      SELECT_NOTE="rerun of what did not pass last time:${SELECTED#gpu import}"
    fi
  fi
else
  SELECTED="${STEPS[*]}"
fi
# rerun, single steps: the self-test's verification record must still hold
if [ "$DRY" != 1 ] && ! selected selftest && { [ -n "$ONLY" ] || [ "$MODE" = rerun ]; }; then
  CHECK_VERIFIED=1
else
  CHECK_VERIFIED=0
fi

# --------------------------------------------------------------------- run
say "gpu_check $(date -u +%FT%TZ) on ${HOSTNAME:-?}, $(nproc) cores; mode $MODE, dry=$DRY, device $DEV, deadline ${DEADLINE_S}s"
if commit=$(git rev-parse --short HEAD 2>/dev/null); then
  say "git $commit$(git diff --quiet HEAD 2>/dev/null || echo ' + uncommitted changes')"
fi
say "sources $SOURCES"
[ -z "$SELECT_NOTE" ] || say "$SELECT_NOTE"
[ -z "$STATE_NOTE" ] || [ "$MODE" = rerun ] || say "$STATE_NOTE"
if [ -n "$ONLY" ] && ! selected build && [ -n "$STATE_NOTE" ]; then
  say "WARNING: no build step, and the last recorded build is of other sources: the installed build may be stale"
fi
[ -z "${SOME_GPU_CHECK_FAIL:-}" ] || say "forced to fail: ${SOME_GPU_CHECK_FAIL}"
say "status   step          rc     time/limit note"
for name in "${STEPS[@]}"; do
  if ! selected "$name"; then
    case "${PREV[$name]:-}" in PASS | SKIP) say "$(printf '%-8s %-13s %s' kept "$name" "(${PREV[$name]} in an earlier call)")" ;; esac
    continue
  fi
  run_step "$name"
  if [[ "$FATAL" == *" $name "* ]] && [ "${STATUS[$name]}" != PASS ]; then
    for rest in "${STEPS[@]}"; do
      if selected "$rest" && [ -z "${STATUS[$rest]:-}" ]; then
        record "$rest" NOTRUN - 0 - "not run: the $name step failed"
      fi
    done
    finish 1
  fi
  if [ "$name" = import ] && [ "$CHECK_VERIFIED" = 1 ]; then
    if ! "$PY" -c 'import sys; from some.ops import verification as v; sys.exit(0 if v.is_verified("cuda") else 1)' \
        >/dev/null 2>&1; then
      SELECTED+=" selftest"
      say "the verification record of this build is gone: the self-test runs again"
    fi
  fi
done
finish 0
