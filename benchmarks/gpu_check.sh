#!/usr/bin/env bash
# The GPU check, in one call: on a GPU machine with torch but no network, no database packages and no
# Redis, install what benchmarks/gpu_fetch.sh put in build/gpu-carry, then run
#   1. tests/test_cuda.py (skipped, saying so, where pytest is missing);
#   2. benchmarks/gpu_sweep.py: the stacked sweep against one child at a time;
#   3. benchmarks/gpu_pack.py: packs on the paper's CIFAR-10 protocol, evaluations per hour by K;
#   4. benchmarks/optimizer_step.py on CUDA: PowerSign and Adam (eager, compiled) against Adam(fused=True);
#   5. a local search on CUDA end to end (`nos enqueue --device cuda --pack 2`, SQLite);
#   6. `nos worker --device cuda --pack 2` over a Redis of its own, with a search end to end.
# Prints a summary table at the end (and writes it, with every step's log, to $OUT if set).
# Made to finish within 8 minutes on one H100: each step has a time limit of its own, 470 s in all.
#
#   bash benchmarks/gpu_check.sh                      # on the GPU machine, build/gpu-carry carried along
#   GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh      # here: every step on the CPU, tiny, this venv
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CARRY=$ROOT/build/gpu-carry
WORK=$(mktemp -d /tmp/nos-gpu-check.XXXXXX)
LOGS=${OUT:-$WORK}
mkdir -p "$LOGS"
PORT=${GPU_CHECK_REDIS_PORT:-6391}
SUMMARY=()

if [[ -n "${GPU_CHECK_DRY:-}" ]]; then   # the CPU, tiny sizes, this checkout's venv: the plumbing, not the figures
  DEVICE=cpu
  PY=${PYTHON:-$ROOT/.venv/bin/python}
  PACK_FLAGS=(--device cpu --train-size 256 --val-size 64 --batch 32 --epochs 1 --packs 1,2 --max-pack 2)
  SWEEP_FLAGS=(--device cpu --train-size 256 --epochs 1 --rules sgd)
  STEP_FLAGS=(--device cpu --repeats 2 --no-compile)
else
  DEVICE=cuda
  VENV=$ROOT/build/gpu-venv
  python3 -m venv --system-site-packages "$VENV"
  PY=$VENV/bin/python
  "$PY" -m pip install --quiet --no-index --find-links "$CARRY/wheels" "$CARRY"/wheels/*.whl
  "$PY" -m pip install --quiet --no-deps --no-build-isolation -e .
  PACK_FLAGS=(--device cuda --seconds 140)
  SWEEP_FLAGS=(--device cuda --rules powersign)
  STEP_FLAGS=(--device cuda --repeats 30)
fi
export NOS_DB_URL=sqlite:///$WORK/check.db

# step NAME SECONDS COMMAND...: runs it with a time limit, logs it, records pass or fail in the summary.
step() {
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  echo "== $name" >&2
  timeout --kill-after=10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$LOGS/$name.log" >&2
  local verdict=ok
  [[ $rc -eq 124 ]] && verdict="timed out (${limit} s)"
  [[ $rc -ne 0 && $rc -ne 124 ]] && verdict="failed (exit $rc)"
  SUMMARY+=("$(printf '| %-14s | %-22s | %5d s |' "$name" "$verdict" $((SECONDS - start)))")
}

redis_up() {
  local dir=$CARRY/redis
  if [[ -n "${GPU_CHECK_DRY:-}" && ! -x $dir/usr/bin/redis-server ]]; then
    dir=""   # here: this machine's redis-server, if the carry folder was not made
  fi
  LD_LIBRARY_PATH=${dir:+$dir/usr/lib/x86_64-linux-gnu} "${dir:+$dir/usr/bin/}redis-server" \
    --port "$PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$WORK" --daemonize no \
    >"$LOGS/redis.log" 2>&1 &
  REDIS_PID=$!
  for _ in $(seq 50); do
    "$PY" -c "import redis, sys; redis.Redis(port=$PORT).ping()" 2>/dev/null && return 0
    sleep 0.2
  done
  echo "redis did not start: $(tail -n 3 "$LOGS/redis.log")" >&2
  return 1
}

nos() { "$PY" -m nos.cli.main "$@"; }

# A search through Celery: a worker with a pack of 2 on the run's queue, a Redis of the check's own.
celery_search() {
  local db=sqlite:///$WORK/celery.db broker=redis://127.0.0.1:$PORT/0 queue=cpu
  [[ $DEVICE == cuda ]] && queue=gpu
  nos db upgrade --db "$db" || return 1
  nos worker --queues $queue --device "$DEVICE" --pack 2 --concurrency 1 --db "$db" --broker "$broker" \
    >"$LOGS/celery-worker.log" 2>&1 &
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

if "$PY" -c "import pytest" 2>/dev/null; then
  step cuda-tests 80 "$PY" -m pytest -q --noconftest -p no:cacheprovider tests/test_cuda.py
else
  echo "pytest is not installed for $PY: tests/test_cuda.py skipped" >&2
  SUMMARY+=("| cuda-tests     | skipped: no pytest     |     0 s |")
fi
step gpu-sweep 60 "$PY" benchmarks/gpu_sweep.py "${SWEEP_FLAGS[@]}"
step gpu-pack 170 "$PY" benchmarks/gpu_pack.py "${PACK_FLAGS[@]}" --out "$LOGS/gpu-pack.md"
step optimizer-step 60 "$PY" benchmarks/optimizer_step.py "${STEP_FLAGS[@]}"
nos db upgrade >/dev/null
# shellcheck disable=SC2086
step local-search 45 "$PY" -m nos.cli.main enqueue --device "$DEVICE" --workers 1 $SEARCH --name local
if redis_up; then
  step celery-search 55 bash -c celery_search
  kill "$REDIS_PID" 2>/dev/null
else
  SUMMARY+=("| celery-search  | skipped: no redis      |     0 s |")
fi

{
  echo
  echo "GPU check: $("$PY" -c 'import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else "no cuda")')"
  echo "| step           | result                 | seconds |"
  echo "|----------------|------------------------|---------|"
  printf '%s\n' "${SUMMARY[@]}"
  echo
  [[ -f $LOGS/gpu-pack.md ]] && cat "$LOGS/gpu-pack.md"
  echo
  grep -E "evaluations per hour" "$LOGS/gpu-sweep.log" 2>/dev/null
  grep -E "^(optimizer|torch Adam|nos (adam|powersign))" "$LOGS/optimizer-step.log" 2>/dev/null
} | tee "$LOGS/summary.md"
