"""The wdm3d_brats bundle end to end at a given size: train a few iterations, generate, check the written files.

Unlike train_step.py / sampling.py (which time the pieces), this runs the bundle's own configs (MONAI
SupervisedTrainer, EMA, checkpoints, validation sampling off, VolumeGenerator) on a synthetic prepared dataset
with a flipped, anisotropic, off-centre affine, and reports seconds per iteration, peak GPU memory, seconds per
generated volume, and whether the NIfTI written has the requested shape and the dataset's affine.

    python benchmarks/bundle_e2e.py --size 128 --device cuda          # the bundle's default at 128^3, batch 10, bf16
    python benchmarks/bundle_e2e.py --size 128 --device cuda --wdm-paper   # WDM's recipe (fp32, as WDM ran it)
    python benchmarks/bundle_e2e.py --size 256 --device cuda          # + wdm_256.json (batch 1, checkpointing)
    python benchmarks/bundle_e2e.py --size 16 --tiny --device cpu     # smoke test

The BENCHMARKS.md rows of 2026-11-23 ran WDM's one-level recipe (then the default) in bf16 with DDIM-50; since
2026-12-06 the default is the two-level rectified flow sampled with 50 Euler steps.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

CONFIGS = Path(__file__).resolve().parents[1] / "bundles" / "wdm3d_brats" / "configs"
AFFINE = np.array([[-1.2, 0, 0, 100.0], [0, 1.0, 0, -130.0], [0, 0, 1.5, -80.0], [0, 0, 0, 1]])
TINY = {
    "network_def#base_channels": 8,
    "network_def#channel_mult": [1, 2],
    "network_def#num_res_blocks": 1,
    "network_def#norm_num_groups": 4,
}


def make_dataset(root: Path, size: int, num: int) -> Path:
    rng = np.random.default_rng(0)
    g = np.linspace(-1, 1, size, dtype=np.float32)
    zz, yy, xx = np.meshgrid(g, g, g, indexing="ij")
    entries = []
    for i in range(num):
        r = 0.6 + 0.2 * rng.random(3)
        vol = ((zz / r[0]) ** 2 + (yy / r[1]) ** 2 + (xx / r[2]) ** 2 <= 1).astype(np.float32) * (
            0.5 + 0.5 * rng.random()
        )
        (root / f"c{i}").mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(vol, AFFINE), root / f"c{i}" / "t1n.nii.gz")
        entries.append({"case": f"c{i}", "t1n": f"c{i}/t1n.nii.gz"})
    (root / "datalist.json").write_text(json.dumps({"intensity_range": [0, 1], "training": entries}))
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iterations", type=int, default=4, help="training iterations (one epoch)")
    parser.add_argument("--sampler", default=None, help="default: the config's (rflow; ddpm with --wdm-paper)")
    parser.add_argument(
        "--wdm-paper", action="store_true", help="add configs/wdm_paper.json: WDM's recipe, fp32, raw weights"
    )
    parser.add_argument("--num-steps", type=int, default=None, help="default: the config's for the sampler")
    parser.add_argument("--tiny", action="store_true", help="a tiny U-Net (smoke test)")
    parser.add_argument("--json", default=None, help="write the result here")
    parser.add_argument("--set", nargs="*", default=[], help="extra config overrides key=json_value")
    args = parser.parse_args()

    from monai.bundle import ConfigWorkflow

    overlays = ([str(CONFIGS / "wdm_paper.json")] if args.wdm_paper else []) + (
        [str(CONFIGS / "wdm_256.json")] if args.size == 256 else []
    )  # wdm_paper.json before wdm_256.json: it pins the 128^3 preset
    files = [str(CONFIGS / "train.json")] + overlays
    extra = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        common = {
            "image_size": [args.size] * 3,
            "output_dir": str(tmp / "out"),
            "mlflow": False,
            "device": f"$torch.device('{device}')",
            **(TINY if args.tiny else {}),
            **extra,
        }
        batch = 2 if args.tiny else (1 if args.size == 256 else 10)
        data = make_dataset(tmp / "data", args.size, batch * args.iterations)
        wf = ConfigWorkflow(
            config_file=files,
            workflow_type="train",
            run_id="training",
            dataset_dir=str(data),
            max_epochs=1,
            batch_size=batch,
            num_workers=0,
            val_interval=1000,
            **{"train#validator#enabled": False},
            **common,
        )  # no validation sampling here
        wf.initialize()
        trainer = wf.parser.get_parsed_content("train#trainer")
        times = []
        from ignite.engine import Events

        def sync():
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: (sync(), times.append(time.perf_counter())))
        trainer.add_event_handler(Events.COMPLETED, lambda e: (sync(), times.append(time.perf_counter())))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        wf.run()
        train_peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        steps = np.diff(times)
        net_params = sum(p.numel() for p in wf.parser.get_parsed_content("network").parameters())
        bf16 = bool(wf.parser.get_parsed_content("bf16")) and device.type == "cuda"
        wf.finalize()
        del wf, trainer
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)

        inf_files = [str(CONFIGS / "inference.json")] + overlays
        wf = ConfigWorkflow(
            config_file=inf_files,
            workflow_type="infer",
            run_id="inference",
            dataset_dir=str(data),
            num_samples=1,
            **({"num_steps": args.num_steps} if args.num_steps else {}),
            **({"sampler": args.sampler} if args.sampler else {}),
            **common,
        )
        wf.initialize()
        t0 = time.perf_counter()
        wf.run()
        sample_s = time.perf_counter() - t0
        inf_peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        img = nib.load(tmp / "out" / "samples" / "sample_0000.nii.gz")
        manifest = json.loads((tmp / "out" / "samples" / "manifest.json").read_text())
        result = {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "size": args.size,
            "batch": batch,
            "parameters_M": round(net_params / 1e6, 2),
            "recipe": "wdm_paper" if args.wdm_paper else "default",
            "bf16": bf16,
            "first_iteration_s": round(float(steps[0]), 3),
            "seconds_per_iteration": round(float(np.median(steps[1:])) if len(steps) > 1 else float(steps[0]), 3),
            "volumes_per_s": round(batch / float(np.median(steps[1:] if len(steps) > 1 else steps)), 2),
            "train_peak_gb": None if train_peak is None else round(train_peak, 2),
            "sampler": f"{manifest['sampler']}-{manifest['num_steps']}",
            "sample_seconds": round(sample_s, 2),
            "sample_peak_gb": None if inf_peak is None else round(inf_peak, 2),
            "nifti_shape_ok": img.shape == (args.size,) * 3,
            "nifti_affine_ok": bool(np.allclose(img.affine, AFFINE)),
        }
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
