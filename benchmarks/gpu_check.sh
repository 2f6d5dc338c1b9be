#!/usr/bin/env bash
# Every check that needs a GPU, in one call (a lent GPU machine's time is short; see
# benchmarks/RESULTS.md, "GPU"): the ResNet-50 step ratio eager and as CUDA graphs, the CUDA
# tests, and where the time of a step goes. Needs python3 with torch (CUDA), pytest and numpy;
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

run() {  # run LOG SECONDS CMD...: the command's output into $out/LOG, its tail here; its status
    local log=$1 limit=$2 rc
    shift 2
    echo "== $*"
    timeout "$limit" "$@" >"$out/$log" 2>&1
    rc=$?
    echo "   exit $rc"
    tail -n 12 "$out/$log"
    return $rc
}

# the bar first (a lent machine's call may end at 600 s): the limits below sum to 590 s at most.
# Should the Triton path fail there (its kernels ran only under Triton's interpreter before), the
# ratio is taken again on the torch ops (POMFX_TRITON=0), and the graphs with them.
if ! run step_eager.log 140 $py benchmarks/step_ratio.py --device cuda --variants plain,pomfx \
    --rounds 20 --no-memory --json "$out/step_eager.json"; then
    export POMFX_TRITON=0
    run step_eager_torch_ops.log 110 $py benchmarks/step_ratio.py --device cuda --variants plain,pomfx \
        --rounds 20 --no-memory --json "$out/step_eager_torch_ops.json"
fi
run step_graph.log 110 $py benchmarks/step_ratio.py --device cuda --variants plain,pomfx \
    --rounds 20 --no-memory --graph --json "$out/step_graph.json"
unset POMFX_TRITON  # the tests choose the path themselves
run test_cuda.log 170 $py -m pytest -q -m cuda -p no:cacheprovider \
    tests/test_fgsgd.py tests/test_parametrization.py tests/test_amp.py tests/test_compile.py \
    tests/test_distributed.py
run profile.log 60 $py benchmarks/profile_step.py --device cuda --rounds 10 --top 25
