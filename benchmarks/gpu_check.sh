#!/usr/bin/env bash
# The GPU check, in one go: the step-time benchmark (eager and compiled), pretraining throughput with and without
# --gpu-augment, the CUDA tests, and a short bf16 + compile pretraining run through accelerate launch whose loss
# must fall. Offline; installs nothing (but --minkowski, which installs ME); runs from
# the source tree in an environment that has torch >= 2.11, timm, accelerate and simplejpeg (plus pytest,
# scikit-image for the demo photos, and wids / webdataset for the shard tests). An image without the small ones
# installs them from wheels carried along: pip install --no-index --find-links .whl simplejpeg wids webdataset. About 15 minutes on one H100 or H200, most of it compiling; where one call is limited to 10
# minutes, run --timings (part 1, about 9) and --checks (parts 2-3, about 6) as two calls.
#
#     bash benchmarks/gpu_check.sh [RESULTS_DIR]          # RESULTS_DIR defaults to $OUT, else gpu_check_results
#     bash benchmarks/gpu_check.sh --timings | --checks [RESULTS_DIR]   # part 1 | parts 2 and 3
#     bash benchmarks/gpu_check.sh --short [RESULTS_DIR]  # ~2.5 minutes: CUDA equivalence fp32 / bf16, compiled vs
#                                                         # eager on CUDA, eager bf16 benchmark rows for atto, tiny
#     bash benchmarks/gpu_check.sh --minkowski [RESULTS_DIR]  # builds MinkowskiEngine for this GPU (CUDA, offline),
#         # then its tests on CUDA and the three-backend step-time rows. Needs .me/ carried: the ME sdist and, where
#         # the image has no cblas.h, Debian's OpenBLAS debs. Made here (see README, "MinkowskiEngine backend"):
#         #   mkdir -p .me && echo /.me/ >> .git/info/exclude && cd .me && apt-get download libopenblas-dev \
#         #   libopenblas-pthread-dev libopenblas0-pthread libgfortran5 && curl -sSLO https://files.pythonhosted.org/\
#         #   packages/source/M/MinkowskiEngine/MinkowskiEngine-0.5.4.tar.gz  (the install script checks its SHA-256)
#         # Its parts fit one 600 s call on a 16-core H100 / H200 if the build does; the wheel stays cached in
#         # ~/.cache/fcmae while the machine is held, so a rerun skips the build.
#
# Each part prints PASS or FAIL; the script exits non-zero if any part failed. The benchmark table goes to
# RESULTS_DIR/step_time_cuda_{eager,compiled}.md (rewritten after each model, so a run cut short keeps what it
# measured), the throughput table to throughput_cuda.md, the loader's to loader_cuda.md.
set -u
SHORT=0 TIMINGS=1 CHECKS=1 MINKOWSKI=0
case "${1:-}" in
    --short) SHORT=1; shift ;;
    --minkowski) MINKOWSKI=1; shift ;;
    --timings) CHECKS=0; shift ;;
    --checks) TIMINGS=0; shift ;;
esac
cd "$(dirname "$0")/.."
RESULTS=${1:-${OUT:-gpu_check_results}}
mkdir -p "$RESULTS"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
WORK=$(mktemp -d)
FAILED=()
START=$SECONDS

part() {  # part NAME TIMEOUT_S COMMAND...: run, time and record one part
    local name=$1 limit=$2
    shift 2
    echo "=== $name ($((SECONDS - START)) s in)"
    if timeout "$limit" "$@"; then echo "PASS $name"; else echo "FAIL $name (exit $?)"; FAILED+=("$name"); fi
}

finish() {  # the summary line; exits non-zero if any part failed
    echo "=== done in $((SECONDS - START)) s; failed: ${FAILED[*]:-none}"
    rm -rf "$WORK"
    [ ${#FAILED[@]} -eq 0 ]
    exit
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PYTHON -c "import torch, timm, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'timm', timm.__version__, 'accelerate', accelerate.__version__, torch.cuda.get_device_name())" || exit 1

if [ $MINKOWSKI = 1 ]; then
    # ME 0.5.4 for this GPU's architecture only (a few minutes on 16 cores), into this environment, from .me/.
    if compgen -G ".me/libopenblas*.deb" >/dev/null; then  # the carried OpenBLAS (the image may have none)
        for deb in .me/*.deb; do dpkg -x "$deb" "$WORK/openblas"; done
        blas_lib=$WORK/openblas/usr/lib/x86_64-linux-gnu
        export CPLUS_INCLUDE_PATH=$WORK/openblas/usr/include/x86_64-linux-gnu/openblas-pthread \
            LIBRARY_PATH=$blas_lib/openblas-pthread LD_LIBRARY_PATH=$blas_lib/openblas-pthread:$blas_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    fi
    export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$($PYTHON -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
    part "MinkowskiEngine CUDA build (arch $TORCH_CUDA_ARCH_LIST)" 420 \
        bash scripts/install_minkowskiengine.sh --cuda --jobs "$(nproc)" --python "$PYTHON" \
        --sdist .me/MinkowskiEngine-0.5.4.tar.gz
    # FCMAE_REQUIRE_MINKOWSKI_CUDA: the CUDA test fails, not skips, where ME or its CUDA build is missing
    part "minkowski tests (CPU and CUDA)" 100 env FCMAE_REQUIRE_MINKOWSKI_CUDA=1 $PYTHON -m pytest -q \
        -p no:cacheprovider -rs tests/test_minkowski.py
    part "step time: sparse, dense, minkowski (fp32)" 70 $PYTHON benchmarks/step_time.py --device cuda \
        --backends sparse,dense,minkowski --modes eager --precisions fp32 --model atto tiny --batch-size 32 32 \
        --repeats 5 --output "$RESULTS/step_time_cuda_minkowski.md"
    finish
fi

if [ $SHORT = 1 ]; then
    part "step-time benchmark, eager bf16" 90 $PYTHON benchmarks/step_time.py --device cuda --model atto tiny \
        --batch-size 128 128 --modes eager --precisions bf16 --repeats 5 --output "$RESULTS/step_time_cuda.md"
    part "cuda tests" 80 $PYTHON -m pytest -q -x -p no:cacheprovider tests/test_cuda.py tests/test_compile.py \
        -k "cuda and not aot_eager and not compiled_dense"
    finish
fi

# 1. The step-time benchmark, bf16, batch 128, atto / tiny / base at 224 px: eager, a profile of tiny's sparse
#    step, then compiled (about 100 s of compilation per model on an H200). Timings first, on an idle GPU.
if [ $TIMINGS = 1 ]; then
part "step-time benchmark, eager" 120 $PYTHON benchmarks/step_time.py --device cuda --model atto tiny base \
    --batch-size 128 128 128 --modes eager --precisions bf16 --repeats 5 \
    --output "$RESULTS/step_time_cuda_eager.md"
part "profile, tiny sparse eager" 60 $PYTHON benchmarks/step_time.py --device cuda --model tiny --batch-size 128 \
    --modes eager --precisions bf16 --repeats 2 --no-memory --profile
part "step-time benchmark, compiled" 360 $PYTHON benchmarks/step_time.py --device cuda --model atto tiny base \
    --batch-size 128 128 128 --modes compiled --precisions bf16 --repeats 5 \
    --output "$RESULTS/step_time_cuda_compiled.md"
fi

if [ $CHECKS = 1 ]; then
# 2. Does the loader keep up? pretrain.py end to end, CPU augmentation vs --gpu-augment (nvjpeg), atto bf16.
part "throughput, cpu vs gpu augment" 120 $PYTHON benchmarks/throughput.py --batch-size 128 --num-workers 14 \
    --mixed-precision bf16 --steps 30 --images 2048 --output "$RESULTS/throughput_cuda.md"
part "loader benchmark, gpu-augment" 40 $PYTHON benchmarks/loader.py --images 256 --rounds 1 --batch-size 64 \
    --gpu-augment --device cuda --output "$RESULTS/loader_cuda.md"

# 3. Together (timings are done): the CUDA tests (backends in fp32 / bf16, compiled vs eager on CUDA, nvjpeg), and
#    30 steps of bf16 + compile pretraining through accelerate launch whose loss must fall. One process: two on
#    one GPU is not a configuration NCCL supports; the 2-process path runs in the CPU tests (gloo).
export FCMAE_INDUCTOR_TESTS=1  # inductor on CUDA too (the CPU suite checks graphs with aot_eager only)
part "cuda tests" 200 $PYTHON -m pytest -q -x -p no:cacheprovider tests/test_cuda.py tests/test_compile.py \
    tests/test_data.py -k "cuda and not aot_eager" > "$WORK/tests.log" 2>&1 &
TESTS=$!
part "pretrain bf16 + compile, 30 steps" 200 $PYTHON -m accelerate.commands.launch --num_processes 1 \
    --mixed_precision bf16 pretrain.py --data-path demo --input-size 96 --batch-size 16 --num-workers 4 \
    --max-steps 30 --warmup-steps 5 --lr 2e-3 --decoder-embed-dim 128 --log-every 5 --save-every 30 --vis-every 0 \
    --compile --no-progress --output-dir "$WORK/pretrain"
part "loss falls" 20 $PYTHON benchmarks/loss_falls.py "$WORK/pretrain/metrics.jsonl" 6
wait $TESTS
tail -n 5 "$WORK/tests.log"
grep -q "^PASS cuda tests" "$WORK/tests.log" || FAILED+=("cuda tests")
fi

finish
