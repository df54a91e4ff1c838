#!/usr/bin/env bash
# Fetch what benchmarks/gpu_check.sh needs on a GPU machine that has torch but no network:
#   build/gpu-carry/wheels/  the database, queue and build packages nos needs, for that machine's Python
#   build/gpu-carry/redis/   Debian's redis-server and its libraries, unpacked (dpkg -x), never installed
# Run it here (with network), then carry build/gpu-carry with the working tree (a few MB; the
# device tool's `carry`). GPU_PYTHON (default 3.12) is the GPU machine's Python version.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${GPU_PYTHON:-3.12}
OUT=build/gpu-carry
PIP=${PIP:-.venv/bin/pip}
rm -rf "$OUT" && mkdir -p "$OUT/wheels" "$OUT/debs" "$OUT/redis"

# Pure-Python or manylinux wheels for the GPU machine's Python, pinned as this checkout pins them.
"$PIP" download --quiet --disable-pip-version-check --only-binary=:all: --python-version "$PY" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -c constraints.txt -d "$OUT/wheels" \
  sqlalchemy alembic 'celery[redis]' redis setuptools wheel

# Redis from Debian, unpacked: gpu_check.sh runs it from this folder with its libraries beside it.
chmod a+rwx "$OUT/debs"   # apt fetches as its own user
(cd "$OUT/debs" && apt-get download redis-server redis-tools liblzf1 libjemalloc2 >/dev/null)
for deb in "$OUT"/debs/*.deb; do dpkg -x "$deb" "$OUT/redis"; done
rm -rf "$OUT/debs"

du -sh "$OUT" "$OUT"/wheels "$OUT"/redis
ls "$OUT/wheels"
