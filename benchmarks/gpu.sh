#!/usr/bin/env bash
# The accelerator paths on an NVIDIA GPU, checked and timed against timm.
#
#   bash benchmarks/gpu.sh [BATCH [STEPS [TIMM_DEVICE]]]
#
# Stages, each under its own time limit, each logged to $OUT/<stage>.log
# (the last lines also printed): the GPU tests
# (tests/models/test_attention_sizes.py); the benchmark job in bfloat16 and
# float32 (MFU against an 8192^3 matmul in its dtype); training at BATCH
# against timm on the same GPU, with cuDNN's attention (`auto`) and XLA's,
# and in float32; inference at 2 x BATCH, with the kernels cast to bfloat16
# once and without; training at 384 px at BATCH / 4. Needs JAX with CUDA,
# flax, optax, orbax, ml_collections, torch and timm; not TensorFlow.
# MODEL and TIMM_MODEL (ViT-B_16, vit_base_patch16_224) pick another pair,
# PYTHON the interpreter (python3), TIMM_PYTHON timm's (the same);
# TIMM_DEVICE=cpu (or the third argument) times timm on the CPU: a dry run
# of the script on a machine without a GPU, where the GPU tests skip.
# Exits 1 if any stage failed.
cd "$(dirname "$0")/.."
BATCH=${1:-128}
STEPS=${2:-20}
TIMM_DEVICE=${3:-${TIMM_DEVICE:-cuda}}
PYTHON=${PYTHON:-python3}
TIMM_PYTHON=${TIMM_PYTHON:-$PYTHON}
MODEL=${MODEL:-ViT-B_16}
TIMM_MODEL=${TIMM_MODEL:-vit_base_patch16_224}
export TIMM_PYTHONPATH=${TIMM_PYTHONPATH:-}
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=2

failed=()
stage() {  # stage NAME SECONDS COMMAND...
  local name=$1 seconds=$2 rc=0
  shift 2
  echo "=== $name ($(date +%T))"
  timeout "$seconds" "$@" > "$OUT/$name.log" 2>&1 || rc=$?
  echo "rc $rc ($(date +%T))"
  ((rc == 0)) || failed+=("$name")
  grep -v -E 'Warning|warn\(|^\s*$' "$OUT/$name.log" | tail -n 25
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tail -2
"$PYTHON" -c 'import jax, flax, optax, sys; print(sys.version.split()[0], "jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, jax.devices())'
"$TIMM_PYTHON" -c 'import torch, timm; print("torch", torch.__version__, "timm", timm.__version__)'

stage tests 120 env JAX_PLATFORMS=cuda,cpu CUDA_VISIBLE_DEVICES=0 \
  "$PYTHON" -m pytest -q -p no:cacheprovider tests/models/test_attention_sizes.py

stage benchmark 90 "$PYTHON" - "$BATCH" "$MODEL" "$OUT" "$STEPS" <<'EOF'
import sys
from absl import logging
from configs import benchmark as benchmark_config
from vit_jax.jobs import benchmark
logging.set_verbosity('info')
for dtype in ('bfloat16', 'float32'):
  config = benchmark_config.get_config(sys.argv[2])
  config.batch_size = int(sys.argv[1])
  config.model.dtype = dtype
  config.benchmark.steps = int(sys.argv[4])
  config.benchmark.peak_matmul_size = 8192
  config.benchmark.inference_kernel_dtype = 'bfloat16' if dtype == 'bfloat16' else ''
  benchmark.run(config, f'{sys.argv[3]}/benchmark-{dtype}')
EOF

stage train 130 "$PYTHON" benchmarks/interleave.py --timm_python="$TIMM_PYTHON" --timm_pythonpath="$TIMM_PYTHONPATH" --model="$MODEL" --timm_model="$TIMM_MODEL" \
  --timm_device="$TIMM_DEVICE" --batch="$BATCH" --steps="$STEPS" \
  --settings='model.dtype=bfloat16;model.dtype=bfloat16,model.attention=xla;model.dtype=float32'

stage inference 90 "$PYTHON" benchmarks/interleave.py --mode=inference \
  --timm_python="$TIMM_PYTHON" --timm_pythonpath="$TIMM_PYTHONPATH" --model="$MODEL" --timm_model="$TIMM_MODEL" --timm_device="$TIMM_DEVICE" \
  --batch=$((BATCH * 2)) --steps="$STEPS" --timm_dtypes=bf16,bf16w \
  --settings='model.dtype=bfloat16;model.dtype=bfloat16,benchmark.inference_kernel_dtype=bfloat16'

stage train_384 90 "$PYTHON" benchmarks/interleave.py --timm_python="$TIMM_PYTHON" --timm_pythonpath="$TIMM_PYTHONPATH" --model="$MODEL" --timm_model="$TIMM_MODEL" \
  --timm_device="$TIMM_DEVICE" --batch=$((BATCH / 4)) --res=384 --steps="$STEPS" \
  --timm_dtypes=bf16 --settings='model.dtype=bfloat16;model.dtype=bfloat16,model.attention=xla'

if ((${#failed[@]})); then
  echo "Failed: ${failed[*]} (logs in $OUT)"
  exit 1
fi
