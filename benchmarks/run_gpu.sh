#!/usr/bin/env bash
# Run every GPU benchmark once, each under its own time limit, writing Markdown/JSON tables and logs to $OUT.
#
#   OUT=gpu_results bash benchmarks/run_gpu.sh            # all of it (about 15-19 minutes on an H100)
#   OUT=gpu_results STAGES="train256 sampling_compile" bash benchmarks/run_gpu.sh
#
# Stages: env wavelets tests train128 train256 sampling sampling_compile sampling_flow_map profile quality. Limits (seconds) can be changed with T_<STAGE>=..., the
# benchmark arguments with TRAIN_ARGS / SAMPLING_ARGS / QUALITY_ARGS. On a machine without a package index, wheels of the missing
# pure-Python dependencies (monai, pytorch-ignite) can be put in .whl/ and are installed to /tmp/site.
set -u
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
STAGES=${STAGES:-"env wavelets tests train128 train256 sampling sampling_compile sampling_flow_map"}
TRAIN_ARGS=${TRAIN_ARGS:-"--steps 6 --warmup 2"}
SAMPLING_ARGS=${SAMPLING_ARGS:-"--ddpm-steps 20"}
QUALITY_ARGS=${QUALITY_ARGS:-"--size 32 --iterations 3000"}
log() { echo "== $(date +%T) $*"; }
want() { [[ " $STAGES " == *" $1 "* ]]; }

"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available(),
torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")' || exit 1
if ! "$PY" -c 'import monai, ignite' 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && \
      export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
fi
# the package itself; without an index its dependencies cannot be resolved, hence --no-deps (they are checked below)
"$PY" -m pip install -q --no-deps --no-build-isolation -e . >/tmp/wdm3d_pip.log 2>&1 || { log "pip install -e . failed; using PYTHONPATH"; tail -n 5 /tmp/wdm3d_pip.log; }
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
"$PY" -c 'import wdm3d.diffusion, wdm3d.networks, monai, triton; print("wdm3d ok; monai", monai.__version__, "triton", triton.__version__)' || exit 1

if want env; then
  log env
  { nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; nproc; date -u; } >"$OUT/env.txt" 2>&1
  cat "$OUT/env.txt"
fi
if want wavelets; then
  log wavelets
  timeout "${T_WAVELETS:-120}" "$PY" benchmarks/wavelets.py --device cuda --no-naive --sizes 64 128 256 --repeats 9 \
    --markdown "$OUT/wavelets.md" --json "$OUT/wavelets.json" 2>&1 | tail -n 40
fi
if want tests; then
  log tests
  # the GPU-only tests (CUDA fused Haar, bf16 + channels_last) and the switch tests; non-Haar tests need
  # pytorch_wavelets, which this machine may lack
  timeout "${T_TESTS:-90}" "$PY" -m pytest -q -p no:cacheprovider tests/test_perf_switches.py \
    "tests/test_wavelets.py::test_cuda_matches_cpu" -k "not benchmark_tiny" 2>&1 | tail -n 15
fi
if want train128; then
  log train128
  timeout "${T_TRAIN128:-200}" "$PY" benchmarks/train_step.py --device cuda --presets wdm_128 $TRAIN_ARGS \
    --markdown "$OUT/train_128.md" --json "$OUT/train_128.json" 2>&1 | grep -v Warning | tail -n 20
fi
if want train256; then
  log train256
  timeout "${T_TRAIN256:-230}" "$PY" benchmarks/train_step.py --device cuda --presets wdm_256 $TRAIN_ARGS \
    --markdown "$OUT/train_256.md" --json "$OUT/train_256.json" 2>&1 | grep -v Warning | tail -n 20
fi
if want sampling; then
  log sampling
  timeout "${T_SAMPLING:-200}" "$PY" benchmarks/sampling.py --device cuda --sizes 128 256 $SAMPLING_ARGS \
    --markdown "$OUT/sampling.md" --json "$OUT/sampling.json" 2>&1 | grep -v Warning | tail -n 20
fi
if want sampling_compile; then
  log sampling_compile
  timeout "${T_SAMPLING_COMPILE:-240}" "$PY" benchmarks/sampling.py --device cuda --sizes ${COMPILE_SIZES:-256 128} --compile-only \
    --markdown "$OUT/sampling_compile.md" --json "$OUT/sampling_compile.json" 2>&1 | grep -v Warning | tail -n 20
fi
if want sampling_flow_map; then
  log sampling_flow_map
  # issue 25: a shortcut model's 1, 2 and 4 jumps at 256^3 beside RFlow-30, bf16 and bf16 + compile
  timeout "${T_SAMPLING_FLOW_MAP:-240}" "$PY" benchmarks/sampling.py --device cuda --sizes 256 --precisions bf16 \
    --compile --compile-samplers rflow shortcut --flow-map-steps 1 2 4 --ddpm-steps 5 \
    --markdown "$OUT/sampling_flow_map.md" --json "$OUT/sampling_flow_map.json" 2>&1 | grep -v Warning | tail -n 20
fi
if want quality; then
  log quality
  # the few-step samplers against DDPM-1000 on a demo-data model (not in the default stages: several minutes);
  # a rerun reuses the finished models and sample sets under $OUT/quality/work; needs nilearn (the demo data)
  timeout "${T_QUALITY:-580}" "$PY" benchmarks/sampler_quality.py "$OUT/quality" --device cuda \
    $QUALITY_ARGS 2>&1 | grep -v -e Warning -e "INFO" | tail -n 20
fi
if want profile; then
  log profile
  timeout "${T_PROFILE:-90}" "$PY" benchmarks/train_step.py --device cuda --presets wdm_128 --steps 3 --warmup 2 \
    --variants "[baseline]" "bf16 autocast" --profile "$OUT/profile.txt" 2>&1 | grep -v Warning | tail -n 5
fi
log done
