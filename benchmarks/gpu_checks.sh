#!/usr/bin/env bash
# The GPU checks this project owes, in steps that each fit one 10-minute call of the device tool
# (docs/GPU_CHECKS.md says how to call it). Every step writes its log and JSON under $OUT (the
# device tool's return folder; default benchmarks/results/gpu) and goes on past a failing command,
# so one broken check does not hide the others; the step's exit status is the number of failures.
#
#   benchmarks/gpu_checks.sh wheels   # HERE (registry access): DeepSpeed and the packages the
#                                     # device image lacks, as cp312 wheels, into .whl/ (git-ignored)
#   benchmarks/gpu_checks.sh test     # THERE: build the CUDA extension (sm_90a), run the test suite
#   benchmarks/gpu_checks.sh bench    # THERE: kernels, decode and ViT-B training throughput, JSON
#   benchmarks/gpu_checks.sh train    # THERE: deepspeed --num_gpus 1 pretrain, nccl, ZeRO-2, bf16,
#                                     # killed mid-way and resumed, then exported and loaded strictly
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
PY=${PY:-python3}
fails=0

# Versions known to work with this code (the CPU stack of docs/TRAINING.md); the device image has
# pydantic's dependencies missing and no DeepSpeed.
WHEELS="hjson==3.1.0 pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2"
DEEPSPEED=deepspeed==0.19.8

check() {  # check NAME COMMAND...: run, log to $OUT/NAME.log, count a failure
    local name=$1
    shift
    echo "== $name: $*"
    local t0=$SECONDS
    "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "   rc=$rc, $((SECONDS - t0)) s (log: $OUT/$name.log)"
    tail -n 5 "$OUT/$name.log" | sed 's/^/   | /'
    [ $rc -eq 0 ] || fails=$((fails + 1))
}

use_wheels() {  # the carried wheels, installed beside the image's packages
    if ls .whl/*.whl > /dev/null 2>&1; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
            && export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
    else
        echo "no .whl/: run 'benchmarks/gpu_checks.sh wheels' here first and carry .whl" >&2
        export PYTHONPATH=$PWD
    fi
    if [ -d shared/fixtures ]; then export MAGE_FAST_SHARED=$PWD/shared; fi
}

build() {
    MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} \
        $PY setup.py build_ext --inplace
}

ensure_built() {  # a call that lands on a fresh machine has no extension yet
    [ -n "$(ls mage_fast/_C*.so 2> /dev/null)" ] || check build build
}

case "${1:-}" in
wheels)
    mkdir -p .whl
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl $WHEELS || exit 1
    # DeepSpeed ships an sdist only: build a pure-Python wheel (no ops compiled) for the device.
    tmp=$(mktemp -d)
    python3 -m pip download -q --no-deps --no-binary=:all: -d "$tmp" $DEEPSPEED \
        && DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --no-build-isolation -w .whl "$tmp"/deepspeed-*.tar.gz \
        || exit 1
    rm -rf "$tmp"
    # The parity fixtures live in ../shared, which the device tool does not carry; shared/ does travel.
    if [ -d ../shared/fixtures ] && [ ! -d shared/fixtures ]; then mkdir -p shared && cp -r ../shared/fixtures shared/; fi
    ls -la .whl
    exit 0
    ;;
test)
    use_wheels
    check info $PY -m mage_fast info
    check build build
    check info_after_build $PY -m mage_fast info
    check tests timeout 480 $PY -m pytest -q -p no:cacheprovider tests --timeout 240
    ;;
bench)
    use_wheels
    ensure_built
    check kernels $PY benchmarks/kernels.py --device cuda --out "$OUT/kernels_cuda.json"
    check decode $PY benchmarks/decode_throughput.py --device cuda --out "$OUT/decode_throughput_cuda.json"
    check train_throughput_vitb $PY benchmarks/train_throughput.py --model vit_base --img_size 256 --ch_mult '' \
        --batch_size 64 --rounds 5 --warmup 2 --out "$OUT/train_throughput_vitb.json"
    ;;
train)
    use_wheels
    ensure_built
    run_dir=/tmp/gpu_pretrain
    rm -rf $run_dir
    args=(train/pretrain.py --model vit_base --synthetic --synthetic_length 2048 --img_size 256
          --batch_size 32 --max_steps 40 --warmup_steps 5 --precision bf16 --deepspeed_config zero2
          --save_every 10 --log_every 5 --num_workers 4 --data_backend auto --no_progress
          --output_dir $run_dir --resume auto --export $run_dir/mage.pth)
    # killed with SIGKILL at step 25 (checkpoints at 10 and 20): this run must fail
    check pretrain_crash bash -c '! deepspeed --num_gpus 1 "$@" --simulate_crash_at_step 25' _ "${args[@]}"
    check pretrain_resume deepspeed --num_gpus 1 "${args[@]}"
    cp $run_dir/metrics.csv "$OUT/pretrain_metrics.csv" 2> /dev/null
    check export_loads $PY -c "import sys, mage_fast; m = mage_fast.MAGE.from_pretrained(sys.argv[1]); print(type(m).__name__, 'loaded strictly')" $run_dir/mage.pth
    ;;
*)
    sed -n 2,12p "$0"
    exit 2
    ;;
esac
echo "$fails failing check(s); logs and JSON in $OUT"
exit $fails
