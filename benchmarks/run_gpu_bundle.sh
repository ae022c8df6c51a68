#!/usr/bin/env bash
# The wdm3d_brats bundle on a GPU: end to end at 256^3 and 128^3 (benchmarks/bundle_e2e.py), and the demo trained
# longer than a CPU allows, from a prepared demo dataset in $DEMO_DATA. Results (JSON, PNG) go to $OUT.
#   OUT=gpu_bundle DEMO_DATA=.gpu_data/demo DEMO_EPOCHS=1000 bash benchmarks/run_gpu_bundle.sh
set -u
OUT=${OUT:-gpu_bundle}; mkdir -p "$OUT"; PY=${PY:-python3}; export PYTHONUNBUFFERED=1
if ! "$PY" -c 'import monai, ignite, nibabel' 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
echo "== e2e 256"; timeout "${T_256:-130}" "$PY" benchmarks/bundle_e2e.py --size 256 --iterations 3 --json "$OUT/e2e_256.json" 2>&1 | tail -n 2
if [ -n "${DEMO_DATA:-}" ]; then
  echo "== demo"
  timeout "${T_DEMO:-170}" "$PY" - "$DEMO_DATA" "${DEMO_EPOCHS:-1000}" "$OUT" <<'PYEOF' 2>&1 | grep -vE "Iter:|Warning|warn" | tail -n 6
import json, shutil, sys, time
from pathlib import Path
from wdm3d.bundle import run_bundle
data, epochs, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
o = Path("/tmp/gpu_demo"); common = dict(dataset_dir=data, output_dir=str(o), mlflow=False)
t0 = time.time()
run_bundle("wdm3d_brats", "training", ["train.json", "demo.json"], max_epochs=epochs, val_interval=epochs // 4, **common)
t1 = time.time()
run_bundle("wdm3d_brats", "inference", ["inference.json", "demo.json"], autocast="bf16", **common)
t2 = time.time()
for p in sorted((o / "samples").glob("*.png")): shutil.copy(p, out / f"demo_{p.name}")
shutil.copy(sorted((o / "validation").glob("*.png"))[-1], out / "demo_validation_last.png")
json.dump({"epochs": epochs, "train_s": round(t1 - t0, 1), "sample_s": round(t2 - t1, 1)}, open(out / "demo.json", "w"))
print("demo", epochs, "epochs: train", round(t1 - t0, 1), "s, sample", round(t2 - t1, 1), "s")
PYEOF
fi
echo "== e2e 128 compile"; timeout "${T_128:-120}" "$PY" benchmarks/bundle_e2e.py --size 128 --iterations 3 --set compile=true --json "$OUT/e2e_128_compile.json" 2>&1 | tail -n 2
echo "== done"
