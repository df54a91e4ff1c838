#!/usr/bin/env bash
# Fetch what benchmarks/gpu_check.sh needs on a GPU machine that has torch but no network:
#   build/gpu-carry/wheels/  the database, queue and build packages nos needs, for that machine's Python
#   build/gpu-carry/redis/   Debian's redis-server and its libraries, unpacked (dpkg -x), never installed
# Run it here (with network), then carry build/gpu-carry with the working tree (a few MB; the
# device tool's `carry`). GPU_PYTHON (default 3.12) is the GPU machine's Python version.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${GPU_PYTHON:-3.12}
OUT=${GPU_CARRY:-build/gpu-carry}
PIP=${PIP:-.venv/bin/pip}
rm -rf "$OUT" && mkdir -p "$OUT/wheels" "$OUT/debs" "$OUT/redis"

# Pure-Python or manylinux wheels for the GPU machine's Python, pinned as this checkout pins them.
"$PIP" download --quiet --disable-pip-version-check --only-binary=:all: --python-version "$PY" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -c constraints.txt -d "$OUT/wheels" \
  sqlalchemy alembic 'celery[redis]' redis 'setuptools>=68' wheel   # setuptools: pyproject.toml's build floor

# Redis from Debian, unpacked: gpu_check.sh runs it from this folder with its libraries beside it,
# all but the C library and libstdc++, which any machine that runs torch has.
chmod a+rwx "$OUT/debs"   # apt fetches as its own user
(cd "$OUT/debs" && apt-get download redis-server redis-tools liblzf1 libjemalloc2 libatomic1 libssl3 \
  libsystemd0 libcap2 libgcrypt20 libgpg-error0 liblzma5 libzstd1 liblz4-1 >/dev/null)
for deb in "$OUT"/debs/*.deb; do dpkg -x "$deb" "$OUT/redis"; done
rm -rf "$OUT/debs" "$OUT"/redis/{etc,usr/share,usr/lib/x86_64-linux-gnu/{engines-3,ossl-modules}} \
  "$OUT"/redis/usr/bin/redis-{benchmark,check-aof}   # what travels is size-limited
# redis-server is a link to redis-check-rdb (one binary, its role read from its name): make it the file.
mv -f "$OUT/redis/usr/bin/redis-check-rdb" "$OUT/redis/usr/bin/redis-server"

du -sh "$OUT" "$OUT"/wheels "$OUT"/redis
ls "$OUT/wheels"
