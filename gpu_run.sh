#!/bin/bash
# one device call: gpu-check with its report, then the step profiles
set -x
python3 -m pip install -q --no-index --no-deps --target .site .whl/*.whl
export PYTHONPATH=$PWD/.site:$PWD PYTHONUNBUFFERED=1
for m in rich filelock pandas numpy sklearn mnist1d; do python3 -c "import $m" 2>/dev/null || echo "MISSING $m"; done
nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv
timeout ${CHECK_S:-330} python3 bench/gpu_check.py --report $OUT/GPU_CHECK.md ${CHECK_ARGS} 2>&1 | tee $OUT/check.log | grep -v Warning
timeout ${PROF_S:-150} python3 bench/gpu_profile.py --out $OUT/profile ${PROF_ARGS} 2>&1 | tee $OUT/profile.log | grep gpu_profile
exit 0
