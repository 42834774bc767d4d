#!/usr/bin/env bash
# Every GPU check of jaxlab in one run, each step under its own time limit, so that a short
# session on a GPU machine yields all the results it can:
#   1. the GPU-marked tests (compiled Pallas and cuDNN attention against the fp32 reference);
#   2. benchmarks/lm.py --mfu-only   (MFU of the ~125M attention LM, L=2048, bf16);
#   3. benchmarks/attention.py        (attention kernels side by side);
#   4. benchmarks/scans.py            (scan and linear-attention methods side by side).
#
#   bash benchmarks/gpu_checks.sh [RESULTS_DIR]      (default: benchmarks/results)
#
# Works offline on a machine whose Python already has a CUDA build of jax, flax, optax, chex and
# orbax-checkpoint: jaxlab is installed without its dependencies. The step limits (seconds) can be
# changed through GPU_CHECK_LIMITS="tests lm attention scans" (default "150 240 150 120").
# Exit status: the number of steps that failed or ran out of time.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results}
mkdir -p "$out"
read -r t_tests t_lm t_attention t_scans <<<"${GPU_CHECK_LIMITS:-150 240 150 120}"
export PYTHONUNBUFFERED=1

python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
python3 - <<'EOF' || exit 1
import jax
print("jax", jax.__version__, "devices:", jax.devices())
assert jax.default_backend() == "gpu", "no GPU visible to JAX"
EOF

failed=0
step() {  # step NAME LIMIT COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit} s): $*"
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$out/gpu_checks-$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - start)) s"
  [[ $rc -eq 0 ]] || failed=$((failed + 1))
}

step tests "$t_tests" python3 -m pytest -q -m gpu -p no:cacheprovider tests/kernels
step lm "$t_lm" python3 benchmarks/lm.py --mfu-only --out "$out"
step attention "$t_attention" python3 benchmarks/attention.py --out "$out"
step scans "$t_scans" python3 benchmarks/scans.py --out "$out"
echo "gpu_checks: $failed step(s) failed; results in $out"
exit "$failed"
