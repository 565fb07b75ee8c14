#!/usr/bin/env bash
# The GPU checks of `kd loop`'s memory plan, on a bare GPU machine with this tree copied (under 8 minutes):
#   bash bench/gpu_check.sh
# 1. bench/gpu_check.py: a toy world, two epochs of `kd loop` on the GPU (vLLM engines where vLLM is
#    installed, else hf), the GPU memory of every stage -> gpu_check.json / .md;
# 2. the engine tests of tests/test_gpu.py (sleep and wake of hf and vLLM engines, placement); the
#    loop test there is the same loop as 1, so it is left out.
# Results go to $OUT when set, else bench/results/. kd goes on the path without pip (such a machine
# may reach no network); a package kd needs and the machine lacks (zstandard on the nvidia-h200 image)
# comes as a wheel in .whl/ (`pip download --no-deps zstandard` for its Python, beside this tree).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/results}
mkdir -p "$out" /tmp/kd-path/kd
for part in stages cli configs; do ln -sfn "$PWD/$part" "/tmp/kd-path/kd/$part"; done
export PYTHONPATH=/tmp/kd-path${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
python=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null && ! $python -c "import zstandard" 2>/dev/null; then
    $python -m pip install -q --no-index --no-deps --target /tmp/kd-site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/kd-site
fi
$python -c "import kd.stages.loop" || { echo "kd does not import here: bring what is missing as wheels in .whl/"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv
timeout 300 $python bench/gpu_check.py 2>&1 | tee "$out/gpu_check.log"
check=${PIPESTATUS[0]}
timeout 180 $python -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py -k "not loop" 2>&1 | tee "$out/gpu_tests.log"
tests=${PIPESTATUS[0]}
echo "gpu_check.py exit $check, tests/test_gpu.py exit $tests"
exit $((check || tests))
