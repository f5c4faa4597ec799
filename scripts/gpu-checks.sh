#!/usr/bin/env bash
# The GPU checks of issue 10 on one CUDA GPU (written for an H200):
#   bash scripts/gpu-checks.sh OUT [LIKE] [STAGE ...]
# OUT: a folder; everything lands in OUT/gpu-checks.tar.gz (logs and the benchmarks' JSONs), re-packed after every
# stage so that a run cut short still returns what it finished. LIKE: the model whose config and tokenizer the
# random-weight models copy (an alias or a folder; only config and tokenizer files are read). STAGE: run only these
# (a lent machine may allow one 10-minute command: the whole list took longer than that on 2026-12-04, when P1 and
# P3 alone took two minutes each). Stages, most important first, each under its own time limit:
#   tests_cuda    the equivalence tests on CUDA (batch invariance, cached decode == generate, split == joined
#                 attention gradients, decode compaction, preallocated traces, sliding windows);
#   sdpa_probe    which CUDA SDPA kernels take grouped key/value heads together with a mask;
#   gpu_check     scripts/gpu_check.py: bf16 batch (non-)invariance, TF32 checkpointing gradients, grounded
#                 losses CPU vs CUDA, coupled-step memory and time as m grows (a 22-layer random Llama, bf16);
#   p4_small p3_small p1_small   P4, P3, P1 on a random-weight copy of LIKE in float32;
#   p4_large p3_large            P4 and P3 at Qwen3-8B's layer shapes in bfloat16 (random weights).
set -uo pipefail
OUT=${1:?usage: gpu-checks.sh OUT [LIKE] [STAGE ...]}
LIKE=${2:-smollm2-135m-instruct}
shift $(( $# < 2 ? $# : 2 ))
WANT=${*:-tests_cuda sdpa_probe p4_small gpu_check p3_small p1_small p4_large p3_large}
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false DIFFMAS_HOME=${DIFFMAS_HOME:-/tmp/diffmas-home}
WORK=$(mktemp -d)/gpu-checks
mkdir -p "$OUT" "$WORK/small" "$WORK/large"
SMALL=/tmp/random-small LARGE=/tmp/random-qwen3-8b

stage() {  # stage NAME SECONDS COMMAND...: run with a limit, keep its log, re-pack the results
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" >"$WORK/$name.log" 2>&1
    rc=$?
    echo "$name rc=$rc seconds=$((SECONDS - start))" | tee -a "$WORK/stages.txt"
    tail -n 30 "$WORK/$name.log"
    tar -czf "$OUT/gpu-checks.tar.gz" -C "$(dirname "$WORK")" gpu-checks
}
wanted() { [[ " $WANT " == *" $1 "* ]]; }
needs() {  # the random-weight model a stage runs on, made once
    if [[ $1 == small && ! -d $SMALL ]]; then
        stage random_small 120 "$PY" benchmarks/random_model.py --like "$LIKE" --out "$SMALL" --device cuda
    elif [[ $1 == large && ! -d $LARGE ]]; then
        stage random_large 240 "$PY" benchmarks/random_model.py --like "$LIKE" --shape qwen3-8b --dtype bfloat16 \
            --out "$LARGE" --device cuda
    fi
}

stage env 60 bash -c "nvidia-smi; $PY -c 'import torch, transformers, peft; print(torch.__version__, torch.version.cuda, transformers.__version__, peft.__version__, torch.cuda.get_device_name())'"
wanted tests_cuda && stage tests_cuda 300 env DIFFMAS_TEST_DEVICE=cuda "$PY" -m pytest -q -p no:cacheprovider \
    --maxfail=20 tests/test_engine.py tests/test_split_attention.py tests/test_decode.py tests/test_trace_arena.py \
    tests/test_sliding_window.py
wanted sdpa_probe && stage sdpa_probe 120 "$PY" benchmarks/probe_cuda_sdpa.py --device cuda --out "$WORK/small"
wanted p4_small && needs small && stage p4_small 240 "$PY" benchmarks/bench_memory.py --device cuda --model "$SMALL" \
    --out "$WORK/small"
wanted gpu_check && stage gpu_check 240 "$PY" scripts/gpu_check.py --device cuda --out "$WORK/small"
wanted p3_small && needs small && stage p3_small 180 "$PY" benchmarks/bench_train_step.py --device cuda \
    --model "$SMALL" --reps 2 --out "$WORK/small"
wanted p1_small && needs small && stage p1_small 180 "$PY" benchmarks/bench_rollout.py --device cuda \
    --model "$SMALL" --reps 3 --out "$WORK/small"
wanted p4_large && needs large && stage p4_large 420 "$PY" benchmarks/bench_memory.py --device cuda \
    --dtype bfloat16 --model "$LARGE" --no-demo --out "$WORK/large"
wanted p3_large && needs large && stage p3_large 240 "$PY" benchmarks/bench_train_step.py --device cuda \
    --dtype bfloat16 --model "$LARGE" --reps 2 --out "$WORK/large"
cat "$WORK/stages.txt"
