#!/usr/bin/env bash
# One GPU session, as one command: the GPU-only tests, then the benchmark suite.
#   OUT=DIR DEADLINE=S [CASES=a,b] bash tools/gpu_session.sh
# Writes DIR/{machine.txt,gpu_tests.log,suite.log,bench_gpu.jsonl,bench_gpu.md}. Wheels in .whl/
# (packages the GPU image lacks: ml_collections, grain, array_record, portpicker) are installed
# to /tmp/site first. JAX takes half the GPU's memory, so PyTorch in the same process has the rest.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.5
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; nproc; uptime
  python3 -m pip list 2>/dev/null | grep -i -E "^(jax|jaxlib|jax-cuda|flax|optax|orbax|numpy|torch|transformers|triton) "; } > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  JAX_PLATFORMS=cuda,cpu timeout "${TEST_TIMEOUT:-180}" python3 -m pytest -q -p no:cacheprovider -n 0 tests/gpu -rs \
    > "$OUT/gpu_tests.log" 2>&1
  echo "gpu tests exit $?"; tail -25 "$OUT/gpu_tests.log"
fi
python3 -m medfm_jax.bench --suite=gpu --out="$OUT" --deadline_s="${DEADLINE:-300}" ${CASES:+--cases=$CASES} ${SMOKE:+--smoke} \
  > "$OUT/suite.log" 2>&1
echo "suite exit $?"; grep -v -E "^(W|I)[0-9]{4} " "$OUT/suite.log" | cut -c1-400 | tail -30
cat "$OUT/bench_gpu.md" 2>/dev/null
