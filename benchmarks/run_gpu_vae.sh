#!/usr/bin/env bash
# The WF-VAE benchmarks of issue 6 on a GPU, each stage under its own time limit, tables and logs to $OUT.
#
#   OUT=gpu_vae bash benchmarks/run_gpu_vae.sh                         # all stages (~10-15 min on an H100)
#   OUT=gpu_vae STAGES="memory_fp32" bash benchmarks/run_gpu_vae.sh
#   OUT=gpu_vae DATALIST=.gpu_data/demo/prepared/datalist.json bash benchmarks/run_gpu_vae.sh
#
# Stages: env memory_fp32 memory_bf16 train. Limits (seconds) with T_<STAGE>=...; extra arguments with
# MEMORY_ARGS / TRAIN_ARGS. memory_*: WFVAE3D at its default width (base_channels=128), whole vs chunked encode and
# decode at 64^3, 128^3, 256^3 and a depth sweep at 256 x 256 slices (peak = torch.cuda.max_memory_allocated).
# train: the side-by-side training on 64^3 demo volumes (DATALIST, a prepared datalist; without it the demo dataset
# is written with data_prep.demo, which needs nilearn's wheel for the template). On a machine without a package
# index, wheels of the missing pure-Python dependencies (monai, pytorch-ignite) can be put in .whl/ (see run_gpu.sh).
set -u
OUT=${OUT:-gpu_vae}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
STAGES=${STAGES:-"env memory_fp32 memory_bf16 train"}
MEMORY_ARGS=${MEMORY_ARGS:-"--depths 32 64 128 256 512 --repeats 5 --sweep-repeats 3"}
TRAIN_ARGS=${TRAIN_ARGS:-"--steps 2000 --eval-every 500 --batch 2"}
log() { echo "== $(date +%T) $*"; }
want() { [[ " $STAGES " == *" $1 "* ]]; }

"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available(),
torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")' || exit 1
if ! "$PY" -c 'import monai' 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && \
      export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
"$PY" -c 'import wdm3d.networks, monai; print("wdm3d ok; monai", monai.__version__)' || exit 1

if want env; then
  log env
  { nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; nproc; date -u; } >"$OUT/env.txt" 2>&1
  cat "$OUT/env.txt"
fi
if want memory_fp32; then
  log memory_fp32
  timeout "${T_MEMORY_FP32:-300}" "$PY" benchmarks/vae.py memory --device cuda $MEMORY_ARGS \
    --markdown "$OUT/vae_memory_fp32.md" --json "$OUT/vae_memory_fp32.json" 2>&1 | grep -v Warning | tail -n 60
fi
if want memory_bf16; then
  log memory_bf16
  timeout "${T_MEMORY_BF16:-300}" "$PY" benchmarks/vae.py memory --device cuda --bf16 --no-check $MEMORY_ARGS \
    --markdown "$OUT/vae_memory_bf16.md" --json "$OUT/vae_memory_bf16.json" 2>&1 | grep -v Warning | tail -n 40
fi
if want train; then
  log train
  DATA_ARGS="--demo-resolution 2 --demo-cases 32 --demo-dir /tmp/wdm3d_vae_demo64"
  [ -n "${DATALIST:-}" ] && DATA_ARGS="--datalist $DATALIST"
  timeout "${T_TRAIN:-600}" "$PY" benchmarks/vae.py train --device cuda $DATA_ARGS $TRAIN_ARGS \
    --markdown "$OUT/vae_train.md" --json "$OUT/vae_train.json" 2>&1 | grep -v Warning | tail -n 40
fi
log done
