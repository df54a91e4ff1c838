#!/usr/bin/env bash
# The GPU check, in one call: on a GPU machine with torch but no network, no database packages and no
# Redis, install what benchmarks/gpu_fetch.sh put in build/gpu-carry, then run
#   1. tests/test_cuda.py (skipped, saying so, where pytest is missing);
#   2. benchmarks/gpu_sweep.py: the stacked sweep against one child at a time;
#   3. benchmarks/gpu_pack.py: packs on the paper's CIFAR-10 protocol, evaluations per hour by K;
#   4. benchmarks/optimizer_step.py on CUDA: PowerSign and Adam (eager, compiled) against Adam(fused=True);
#   5. a local search on CUDA end to end (`nos enqueue --device cuda --pack 2`, SQLite);
#   6. `nos worker --device cuda --pack 2` over a Redis of its own, with a search end to end;
#   then where a pack's time goes:
#   7. benchmarks/pack_host.py: a pack's host time per training step, its K optimizers' part;
#   8. benchmarks/pack_host.py --whole: the host's time for whole packs (the device next to idle);
#   9. benchmarks/gpu_pack.py --profile 32: the host's and the device's time under torch.profiler (a short pack);
#   10. benchmarks/gpu_pack.py --concurrent 32: packs in one process, then in two at once on the card;
#   11. benchmarks/gpu_pack.py --cudnn-compare 32: a pack under cuDNN's other settings, NHWC and without TF32
#      (speed, rewards).
# Prints a summary table at the end (and writes it, with every step's log, to $OUT if set).
#
# Time: a device call may run 600 s, and the session's 15 minutes of device time leave no room for a second
# call, so the command aims at about 530 s: the install (~30 s), then GPU_CHECK_SECONDS (490) in which steps
# start (none with under 15 s left, none past the end), then the summary (~5 s); a step killed at the end adds
# at most --kill-after's 10 s. Each step has a limit of its own, 1.3-2x its estimate, so that a stuck step
# cannot cost the rest.
# Estimates on an H100, from the H200 calls in benchmarks/gpu-runs/ (the H100's memory is slower: packs x1.25):
#   cuda-tests      ~45 s (limit  70)  29 s for 16 tests on the H200, 25 s for 4 compiled ones; 28 now, 7 compile
#   gpu-sweep       ~30 s (limit  45)  27 s
#   gpu-pack       ~145 s (limit 195)  110 s; K=1, 8, 32 in full, the largest K on a part. --seconds 180 is a
#                                      ceiling: K=32 runs in full if K=8's time x4 fits in what is left of it,
#                                      true on a card up to 1.5x slower than the H200 (K=32 took 2.6x K=8 there)
#   optimizer-step  ~50 s (limit  75)  81-105 s with four compiled rows (12-25 s each to compile); two now
#   local-search    ~25 s (limit  40)  24 s
#   celery-search   ~20 s (limit  40)  17 s
#   pack-host       ~20 s (limit  30)  not run yet: 4 rows of ~450 steps of a few ms, and the start-up
#   pack-whole      ~25 s (limit  40)  not run yet: 6 packs of 1-3 s (0.6 and 1.4 s on the 2-core CPU)
#   gpu-profile     ~30 s (limit  50)  not run yet: a pack on 8 batches, its trace's parse
#   pack-pair       ~50 s (limit  70)  not run yet: 3 packs on a tenth of the images (~8 s each) and the pair
#   cudnn-modes     ~60 s (limit  80)  not run yet: 5 timed packs on a tenth, each after a short untimed one
# That is ~315 s for the steps the check exists for and ~185 s for the rest: ~500 s against 490, so the last
# step is cut short on such a card, and more on a slower one. Hence the order of the rest: the cheap pack-host
# and pack-whole first, then the profile and the pair, whose figures come at their end; cudnn-modes last, as it
# prints each row as it measures it and so loses only its last ones (no TF32, then the free one).
#
#   bash benchmarks/gpu_check.sh                      # on the GPU machine, build/gpu-carry carried along
#   GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh      # here: every step on the CPU, tiny, this venv
#   GPU_CHECK_STEPS="cuda-tests gpu-pack" bash benchmarks/gpu_check.sh   # only those steps (docs/benchmarks.md)
set -uo pipefail
# A step killed at its limit keeps what it printed: Python writes into the tee's pipe in blocks otherwise.
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
ROOT=$PWD
CARRY=${GPU_CARRY:-$ROOT/build/gpu-carry}
WORK=$(mktemp -d /tmp/nos-gpu-check.XXXXXX)
LOGS=${OUT:-$WORK}
mkdir -p "$LOGS"
STEPS=$LOGS/steps.log   # every step's whole log, one after another: few files travel back from a GPU machine
PORT=${GPU_CHECK_REDIS_PORT:-6391}
SUMMARY=()
table_head() {
  echo "| step           | result                 | seconds |"
  echo "|----------------|------------------------|---------|"
}

# install: a venv beside the machine's own packages (torch above all), the carried wheels in it, nos editable.
install() {
  local base=${GPU_CHECK_PYTHON:-python3}
  VENV=$ROOT/build/gpu-venv
  rm -rf "$VENV"
  # --without-pip: the base's ensurepip may be missing; the base's own pip installs into the venv below.
  "$base" -m venv --system-site-packages --without-pip "$VENV" || return 1
  PY=$VENV/bin/python
  # python3 may itself be a venv (it is on the GPU machines): a nested venv's --system-site-packages
  # reaches the interpreter's installation, not that venv, so name the base's own folders in a .pth file.
  "$base" -c 'import site; print("\n".join(site.getsitepackages()))' \
    >"$("$PY" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/gpu_check_base.pth" || return 1
  "$PY" -c "import torch, pip" || return 1
  # By name, not by file: what the machine already has at a fitting version stays as it is.
  "$PY" -m pip install --quiet --disable-pip-version-check --no-index --find-links "$CARRY/wheels" \
    sqlalchemy alembic 'celery[redis]' redis 'setuptools>=68' wheel || return 1
  "$PY" -m pip install --quiet --disable-pip-version-check --no-index --no-deps --no-build-isolation -e . \
    || return 1
  "$PY" -c "import nos.cli.main, nos.store, celery, torch; print('nos', nos.__version__, 'torch', torch.__version__)"
}

if [[ -n "${GPU_CHECK_DRY:-}" ]]; then   # the CPU, tiny sizes: the plumbing, not the figures
  DEVICE=cpu
  PACK_FLAGS=(--device cpu --train-size 256 --val-size 64 --batch 32 --epochs 1 --packs 1,2 --max-pack 2)
  PROFILE_K=2
  SWEEP_FLAGS=(--device cpu --train-size 256 --epochs 1 --rules sgd)
  STEP_FLAGS=(--device cpu --repeats 2 --no-compile)
  HOST_FLAGS=(--device cpu --packs 2 --repeats 20)
  WHOLE_FLAGS=(--device cpu --packs 2)
else
  DEVICE=cuda
  PACK_FLAGS=(--device cuda --seconds 180)
  PROFILE_K=32
  SWEEP_FLAGS=(--device cuda --rules powersign)
  # The rows the check asks for: the per-tensor and CUDA-graph ones were timed on the H200 (gpu-runs/).
  STEP_FLAGS=(--device cuda --repeats 30 --compiled flat,adam-flat)
  HOST_FLAGS=(--device cuda --packs 8,32 --repeats 100)
  WHOLE_FLAGS=(--device cuda --packs 8,32)
fi
# A rerun may narrow the tests (GPU_CHECK_TESTS="-k compiled") or change the packs (GPU_PACK_FLAGS="...").
read -ra TEST_FLAGS <<<"${GPU_CHECK_TESTS:-}"
[[ -n "${GPU_PACK_FLAGS:-}" ]] && read -ra PACK_FLAGS <<<"$GPU_PACK_FLAGS"
if [[ -n "${GPU_CHECK_DRY:-}" && -z "${GPU_CHECK_PYTHON:-}" ]]; then
  PY=${PYTHON:-$ROOT/.venv/bin/python}   # the dry run's quick form: this checkout's venv as it is
else
  {
    echo "== machine"
    uname -a; nvidia-smi -L 2>&1; df -h /tmp | tail -n 1
    echo "== install"
  } >>"$STEPS" 2>&1
  began=$SECONDS
  if ! install >>"$STEPS" 2>&1; then
    echo "install failed:" >&2
    tail -n 30 "$STEPS" >&2
    {   # the usual summary's shape, so that a failed call reads like any other
      echo
      echo "GPU check: the install failed, no step ran (its output is in steps.log)"
      table_head
      printf '| %-14s | %-22s | %5d s |\n' install failed $((SECONDS - began))
    } | tee "$LOGS/summary.md"
    exit 1
  fi
fi
export NOS_DB_URL=sqlite:///$WORK/check.db

# GPU_CHECK_STEPS="gpu-pack optimizer-step" runs only those steps (a rerun on scarce GPU time).
wanted() { [[ -z "${GPU_CHECK_STEPS:-}" || " $GPU_CHECK_STEPS " == *" $1 "* ]]; }

# The whole check ends within GPU_CHECK_SECONDS (from here): a step gets at most the time left, and none
# starts with less than 15 s left, so that the summary is printed before the caller's own time limit.
DEADLINE=$((SECONDS + ${GPU_CHECK_SECONDS:-490}))

# step NAME SECONDS COMMAND...: runs it with a time limit, logs it, records pass or fail in the summary.
step() {
  local name=$1 limit=$2
  shift 2
  wanted "$name" || return 0
  local left=$((DEADLINE - SECONDS))
  if ((left < 15)); then
    SUMMARY+=("$(printf '| %-14s | %-22s | %5d s |' "$name" "skipped: out of time" 0)")
    return 0
  fi
  ((limit > left)) && limit=$left
  local start=$SECONDS
  echo "== $name" >&2
  echo "== $name" >>"$STEPS"
  # Into steps.log as it goes: a call cut short still brings back what the step had printed.
  timeout --kill-after=10 "$limit" "$@" > >(tee "$WORK/$name.log" >>"$STEPS") 2>&1
  local rc=$?
  sleep 0.2   # the tee's last lines
  echo "== $name: exit $rc" >>"$STEPS"
  tail -n 25 "$WORK/$name.log" >&2
  local verdict=ok took=$((SECONDS - start))
  # 124: timeout's TERM ended it; 137: its KILL did, 10 s later (a KILL before the limit is another's, e.g. memory).
  if [[ $rc -eq 124 || ($rc -eq 137 && $took -ge $limit) ]]; then
    verdict="timed out (${limit} s)"
  elif [[ $rc -ne 0 ]]; then
    verdict="failed (exit $rc)"
  fi
  SUMMARY+=("$(printf '| %-14s | %-22s | %5d s |' "$name" "$verdict" "$took")")
}

redis_up() {
  local dir=$CARRY/redis
  if [[ -n "${GPU_CHECK_DRY:-}" && ! -x $dir/usr/bin/redis-server ]]; then
    dir=""   # here: this machine's redis-server, if the carry folder was not made
  fi
  LD_LIBRARY_PATH=${dir:+$dir/usr/lib/x86_64-linux-gnu:$dir/lib/x86_64-linux-gnu} "${dir:+$dir/usr/bin/}redis-server" \
    --port "$PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$WORK" --daemonize no \
    >"$WORK/redis.log" 2>&1 &
  REDIS_PID=$!
  for _ in $(seq 50); do
    "$PY" -c "import redis, sys; redis.Redis(port=$PORT).ping()" 2>/dev/null && return 0
    sleep 0.2
  done
  echo "redis did not start: $(tail -n 3 "$WORK/redis.log")" >&2
  return 1
}

nos() { "$PY" -m nos.cli.main "$@"; }

# A search through Celery: a worker with a pack of 2 on the run's queue, a Redis of the check's own.
celery_search() {
  local db=sqlite:///$WORK/celery.db broker=redis://127.0.0.1:$PORT/0 queue=cpu
  [[ $DEVICE == cuda ]] && queue=gpu
  nos db upgrade --db "$db" || return 1
  # exec: $! is the worker itself, not a subshell around it, so that the TERM below reaches it.
  (exec "$PY" -m nos.cli.main worker --queues $queue --device "$DEVICE" --pack 2 --concurrency 1 --db "$db" \
    --broker "$broker" >"$WORK/celery-worker.log" 2>&1) &
  local worker=$!
  # shellcheck disable=SC2086  # SEARCH is words without spaces
  nos enqueue --db "$db" --broker "$broker" --device "$DEVICE" $SEARCH --name celery
  local rc=$?
  kill -TERM "$worker" 2>/dev/null
  wait "$worker"
  nos status --db "$db" && [[ $rc -eq 0 ]]
}
export -f nos celery_search
export PY DEVICE WORK PORT LOGS
export SEARCH="--task digits --train-size 300 --searcher random --budget 4 --update-every 2 --pack 2"

if ! wanted cuda-tests; then
  :
elif "$PY" -c "import pytest" 2>/dev/null; then
  step cuda-tests 70 "$PY" -m pytest -q -rs --durations=5 --noconftest -p no:cacheprovider tests/test_cuda.py \
    ${TEST_FLAGS[@]+"${TEST_FLAGS[@]}"}
else
  echo "pytest is not installed for $PY: tests/test_cuda.py skipped" >&2
  SUMMARY+=("| cuda-tests     | skipped: no pytest     |     0 s |")
fi
step gpu-sweep 45 "$PY" benchmarks/gpu_sweep.py "${SWEEP_FLAGS[@]}"
step gpu-pack 195 "$PY" benchmarks/gpu_pack.py "${PACK_FLAGS[@]}" --out "$LOGS/gpu-pack.md"
step optimizer-step 75 "$PY" benchmarks/optimizer_step.py "${STEP_FLAGS[@]}"
nos db upgrade >/dev/null
# shellcheck disable=SC2086
step local-search 40 "$PY" -m nos.cli.main enqueue --device "$DEVICE" --workers 1 $SEARCH --name local
if ! wanted celery-search; then
  :
elif redis_up; then
  step celery-search 40 bash -c celery_search
  kill "$REDIS_PID" 2>/dev/null
  { echo "== celery worker"; cat "$WORK/celery-worker.log"; echo "== redis"; cat "$WORK/redis.log"; } >>"$STEPS" 2>&1
else
  SUMMARY+=("| celery-search  | skipped: no redis      |     0 s |")
fi
# Where a pack's time goes: last, so that a check short of time loses these rather than the above, and
# among them cudnn-modes last of all (see the top).
step pack-host 30 "$PY" benchmarks/pack_host.py "${HOST_FLAGS[@]}"
step pack-whole 40 "$PY" benchmarks/pack_host.py --whole "${WHOLE_FLAGS[@]}"
step gpu-profile 50 "$PY" benchmarks/gpu_pack.py "${PACK_FLAGS[@]}" --profile "$PROFILE_K"
step pack-pair 70 "$PY" benchmarks/gpu_pack.py "${PACK_FLAGS[@]}" --concurrent "$PROFILE_K"
step cudnn-modes 80 "$PY" benchmarks/gpu_pack.py "${PACK_FLAGS[@]}" --cudnn-compare "$PROFILE_K"

{
  echo
  echo "GPU check: $("$PY" -c 'import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else "no cuda")')"
  table_head
  printf '%s\n' "${SUMMARY[@]}"
  echo
  [[ -f $LOGS/gpu-pack.md ]] && cat "$LOGS/gpu-pack.md"
  echo
  grep -E "evaluations per hour" "$WORK/gpu-sweep.log" 2>/dev/null
  grep -E "^(optimizer|torch Adam|nos )|failed:" "$WORK/optimizer-step.log" 2>/dev/null
  grep -E "^(pack host|\|)" "$WORK/pack-host.log" 2>/dev/null
  grep -E "^(whole packs|\|)" "$WORK/pack-whole.log" 2>/dev/null
  grep -E "^profile of" "$WORK/gpu-profile.log" 2>/dev/null
  grep -E "^(packs of K|\|)" "$WORK/pack-pair.log" 2>/dev/null
  grep -E "^(cuDNN settings|\|)" "$WORK/cudnn-modes.log" 2>/dev/null
} | tee "$LOGS/summary.md"
