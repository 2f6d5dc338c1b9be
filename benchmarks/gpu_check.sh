#!/usr/bin/env bash
# Every check that needs a GPU, in one call (a lent GPU machine's time is short; see
# benchmarks/RESULTS.md, "GPU"): the CUDA tests, the ResNet-50 step ratio eager and as CUDA
# graphs, and where the time of a step goes. Needs python3 with torch (CUDA), pytest and numpy;
# installs nothing (the package is put on PYTHONPATH as pip would lay it out). Logs and JSON go
# to $OUT (or /tmp/gpu_check).
#
#     bash benchmarks/gpu_check.sh
set -u
root=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-/tmp/gpu_check}
py=${PYTHON:-python3}
mkdir -p "$out"
site=$(mktemp -d)
cp -r "$root/pomfx" "$site/pomfx" && cp -r "$root/passes" "$site/pomfx/passes"
export PYTHONPATH="$site" PYTHONUNBUFFERED=1
cd "$root"

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  $py -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$out/machine.txt"

run() {  # run LOG SECONDS CMD...: the command's output into $out/LOG, its tail here
    local log=$1 limit=$2
    shift 2
    echo "== $*"
    timeout "$limit" "$@" >"$out/$log" 2>&1
    echo "   exit $?"
    tail -n 12 "$out/$log"
}

run test_cuda.log 240 $py -m pytest -q -m cuda -p no:cacheprovider \
    tests/test_fgsgd.py tests/test_parametrization.py tests/test_amp.py tests/test_compile.py \
    tests/test_distributed.py
run step_eager.log 180 $py benchmarks/step_ratio.py --device cuda --variants plain,pomfx \
    --rounds 20 --no-memory --json "$out/step_eager.json"
run step_graph.log 150 $py benchmarks/step_ratio.py --device cuda --variants plain,pomfx \
    --rounds 20 --no-memory --graph --json "$out/step_graph.json"
run profile.log 120 $py benchmarks/profile_step.py --device cuda --rounds 10 --top 25
