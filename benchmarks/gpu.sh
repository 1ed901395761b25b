#!/usr/bin/env bash
# The GPU benchmark suite (H100 / H200), from the repository root, in parts that each
# end well inside ten minutes:
#
#   bash benchmarks/gpu.sh quick                # the headline rows in one lent slot (97 s on an H200)
#   bash benchmarks/gpu.sh quick --dry-run      # the same on the CPU at tiny sizes (a test in the suite)
#   bash benchmarks/gpu.sh all                  # every part, in this order
#   bash benchmarks/gpu.sh tests kernels        # or some of them
#
# parts: quick    the gpu-marked tests, then benchmarks/quick.py: the steps at 256x3x224x224 vs copy,
#                 PGD-10 ResNet-18 b256 (floor, torchattacks), small CNN b1024, fast mode ResNet-18 b512,
#                 AutoAttack on the robust ResNet-18 vs pyautoattack; results in <device-slug>-quick.*; then
#                 benchmarks/fair.py: floor, fastadv (eager and replayed graph) and torchattacks under one set of
#                 settings, 21 interleaved CUDA-event samples each: PGD-10 ResNet-18 b256 and small CNN b1024,
#                 the launch-bound loop (small CNN b32, 20 calls), one PGD-10 AT epoch of ResNet-18 (fit vs the
#                 torchattacks loop), kernel tables per step; results in <device-slug>-fair.*
#        tests    the gpu-marked tests and the GPU pytest-benchmark suite
#        kernels  fused step ops vs the eager chain and a copy, 3 shapes, fp32 + bf16
#        small    every attack (AutoAttack too, DeepFool not) on the small CNN and the linear model,
#                 batch 1024, exact + fast
#        digits   the same on the 8x8 CNN (random weights) and the digits-trained CNN
#        large    PGD / PGDL2 on ResNet-18, WRN-28-10, ResNet-50 and the robust ResNet-18 at
#                 their GPU batches (256, 128, 64, 256), exact + fast
#        b512     PGD-10 at batch 512 on ResNet-18 and WRN-28-10, exact + fast
#        aa       AutoAttack (standard) on the robust ResNet-18 at batch 500 vs pyautoattack
#        slots    fixed-shape slots on CUDA: the gpu-marked slot tests, a sample's numbers at a fixed
#                 shape (digits CNN, robust ResNet-18, deterministic on and off), PGD-100/1000 on 64 slots
#                 vs torchattacks (digits CNN), evaluate with and without exits: PGD-100, APGD-CE and
#                 their cascade (digits CNN), PGD-100, PGD-1000 and AutoAttack (robust ResNet-18, 256
#                 images); slots_<device>.*
#        plot     bar charts of every results file
#
# Machines without the reference libraries: put their wheels in .whl/ first (ignored by git)
# (pip download --no-deps torchattacks==3.5.1 pyautoattack==0.2.0 -d .whl); they are
# installed into /tmp/site. fastadv itself is installed in place, so fastadv.kernels
# resolves. A copy of the tree without .git: set FASTADV_COMMIT=<hash>.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8}
# Every attack but DeepFool: torchattacks' DeepFool loops over the images one by one,
# minutes per call at batch 1024 (fastadv's is batched; time it on its own if wanted).
ZOO=FGSM,FFGSM,PGD,PGDL2,RFGSM,MIFGSM,TPGD,EOTPGD,CW,APGD,APGDT,FAB,Square,AutoAttack

setup() {
    if [ "$DRY_RUN" = 1 ]; then  # the CPU environment that runs the test suite has everything
        "$PY" -c "import fastadv.kernels, torchattacks, pyautoattack"
        return
    fi
    if compgen -G ".whl/*.whl" >/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site --upgrade .whl/*.whl
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    "$PY" -c "import fastadv.kernels" 2>/dev/null ||
        "$PY" -m pip install -q --no-deps --no-build-isolation -e .
    "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
}

part() {
    case "$1" in
        quick)   if [ "$DRY_RUN" = 1 ]; then
                     "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py tests/test_gpu_graphs.py  # skip without CUDA
                     "$PY" -m benchmarks.quick --dry-run --results "${FASTADV_QUICK_RESULTS:-benchmarks/results}"
                     "$PY" -m benchmarks.fair --dry-run --results "${FASTADV_QUICK_RESULTS:-benchmarks/results}"
                 else
                     "$PY" -m pytest -q -p no:cacheprovider -m gpu --continue-on-collection-errors tests ||
                         { echo "gpu.sh quick: gpu tests FAILED; the benchmarks run anyway" >&2; FAILED=1; }
                     "$PY" -m benchmarks.quick --results "${FASTADV_QUICK_RESULTS:-benchmarks/results}"
                     "$PY" -m benchmarks.fair --results "${FASTADV_QUICK_RESULTS:-benchmarks/results}"
                 fi ;;
        tests)   "$PY" -m pytest -q -p no:cacheprovider -m gpu tests
                 "$PY" -m pytest -q -p no:cacheprovider -m gpu benchmarks/test_bench_cpu.py --benchmark-enable ;;
        kernels) "$PY" -m benchmarks.bench_kernels --quiet ;;
        small)   "$PY" -m benchmarks.bench_attacks --models smallcnn,linear --attacks "$ZOO" --repeats 5 --warmup 1 --quiet ;;
        digits)  "$PY" -m benchmarks.bench_attacks --models smallcnn-digits,digits-cnn --attacks "$ZOO" --repeats 5 \
                     --warmup 1 --quiet ;;
        large)   "$PY" -m benchmarks.bench_attacks --models resnet18,wrn-28-10,resnet50,robust-resnet18 --quiet ;;
        b512)    "$PY" -m benchmarks.bench_attacks --models resnet18,wrn-28-10 --attacks PGD --batch 512 --quiet ;;
        aa)      "$PY" -m benchmarks.bench_attacks --models robust-resnet18 --attacks AutoAttack --batch 500 \
                     --modes exact --repeats 2 --warmup 0 --quiet ;;
        slots)   "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu_slots.py ||
                     { echo "gpu.sh slots: gpu tests FAILED; the benchmark runs anyway" >&2; FAILED=1; }
                 # several short runs, each writing its rows: a timeout loses only the run it hit
                 "$PY" -m benchmarks.bench_slots --device cuda --parts invariance --models digits-cnn,robust-resnet18
                 "$PY" -m benchmarks.bench_slots --device cuda --parts pgd --models digits-cnn --repeats 1
                 "$PY" -m benchmarks.bench_slots --device cuda --parts eval --models digits-cnn \
                     --attacks "pgd-100;apgd-ce;pgd-100,apgd-ce" --repeats 3
                 "$PY" -m benchmarks.bench_slots --device cuda --parts eval --models robust-resnet18 --n 256 \
                     --attacks "pgd-100;pgd-1000;autoattack" --repeats 1 ;;
        plot)    "$PY" -m benchmarks.plot benchmarks/results ;;
        *)       echo "unknown part '$1' (quick, tests, kernels, small, digits, large, b512, aa, slots, plot, all)" >&2; return 2 ;;
    esac
}

DRY_RUN=0
PARTS=()
for a in "$@"; do
    if [ "$a" = --dry-run ]; then DRY_RUN=1; else PARTS+=("$a"); fi
done
[ ${#PARTS[@]} -gt 0 ] || { sed -n '2,33p' "$0"; exit 2; }
[ "$DRY_RUN" = 0 ] || [ "${PARTS[*]}" = quick ] || { echo "--dry-run goes with quick only" >&2; exit 2; }
SECONDS=0
FAILED=0
setup
for p in "${PARTS[@]}"; do
    if [ "$p" = all ]; then
        for q in tests kernels small digits large b512 aa slots plot; do part "$q"; done
    else
        part "$p"
    fi
done
echo "gpu.sh ${PARTS[*]}: ${SECONDS} s in all (setup included)"
exit "$FAILED"
