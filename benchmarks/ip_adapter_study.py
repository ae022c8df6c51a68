"""IP-Adapter study (issue 20): does the image prompt help, and how much, against the base and concatenation?

Four methods, each trained for the same number of optimizer steps on its trainable parameters, from the same seeds:

- ``base``: the unconditioned WDM U-Net on the targets (it never sees the reference);
- ``adapter``: an IP-Adapter on the frozen base (EMA weights): the reference goes through a frozen WF-VAE encoder
  trained by this project on the training references, a global+spatial projection makes 20 tokens, zero-initialised
  image cross-attention blocks are added after the base's residual blocks at every level but the first and in the
  middle; a learned null prompt replaces 10% of the prompts in training (classifier-free guidance on the image);
- ``concat``: cWDM-style, the reference's Haar coefficients concatenated to the noisy input, trained from scratch;
- ``adapter+concat``: an IP-Adapter on the frozen concat model.

The adapters' budget is the same number of steps again, on top of their frozen model's (stated in the results).
Tasks, each with a known answer:

- ``paired_demo32``: T1n -> T2w synthesis on the embedded demo data at 32^3 (8 mm): 40 training cases, 8 held out;
  PSNR / SSIM / MAE of each sample against the held-out case's true T2w (whole volume in [0, 1]);
- ``transfer_shapes32``: known-truth shapes (:func:`data_prep.known_truth.make_pairs`): reference and target share
  the organ's radius (long-tailed law) and intensity (bimodal law), everything else (position, lesions, texture, rod)
  is drawn independently. The transfer measure is how well the sample's re-measured radius and intensity match the
  reference's true ones: ``transfer_error``, the mean over the two of ``|measured - truth| / sd(law)`` (an
  unconditioned model is at ~1.1, as two independent draws of the law; 0 is perfect); ``valid`` is the share of
  samples with one intact organ. PSNR / SSIM against the paired target are recorded too, but they only score the
  shared parameters loosely (the target's position differs).

Samples use DDIM-50 (the bundle's default) with lambda 1; adapters also with classifier-free guidance 2 on the image
(``adapter_g2``, ``adapter+concat_g2``; the unconditional branch is the learned null prompt). Every (task, seed) is
one process that writes ``OUT/<task>/seed<k>.json`` when done (and keeps each trained model under
``OUT/<task>/seed<k>/``), so a re-run resumes; the WF-VAE encoder is trained once per task
(``OUT/<task>/encoder``, seed 0) and shared by all seeds.

    python benchmarks/ip_adapter_study.py run /tmp/ipa --task paired_demo32 --seeds 0 1 2
    python benchmarks/ip_adapter_study.py report /tmp/ipa --write --command "..."
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for path in (REPO, HERE):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from ip_adapter_encoder import train_wfvae_encoder  # noqa: E402
from quality import machine, t_interval  # noqa: E402

from data_prep.known_truth import make_pairs, measure  # noqa: E402
from wdm3d.diffusion import ClassifierFreeGuidance, WaveletDiffusion, WaveletDiffusionInferer  # noqa: E402
from wdm3d.diffusion.conditioning import build_image_encoder  # noqa: E402
from wdm3d.metrics import psnr, ssim3d  # noqa: E402
from wdm3d.networks import IPAdapter, count_parameters, wdm_unet  # noqa: E402

RESULTS_JSON = REPO / "benchmarks" / "results" / "ip_adapter.json"
README = REPO / "bundles" / "ip_adapter_brats" / "docs" / "README.md"
BENCHMARKS_MD = REPO / "BENCHMARKS.md"
MARK_BEGIN, MARK_END = "<!-- ip_adapter_study:begin -->", "<!-- ip_adapter_study:end -->"

TASKS = ("paired_demo32", "transfer_shapes32")
METHODS = ("base", "adapter", "adapter_grid", "concat", "adapter+concat", "adapter_grid+concat")
#: rows of the table: method and the image guidance it samples with
ROWS = (
    ("base", 1.0),
    ("adapter", 1.0),
    ("adapter", 2.0),
    ("adapter_grid", 1.0),
    ("adapter_grid", 2.0),
    ("concat", 1.0),
    ("adapter+concat", 1.0),
    ("adapter+concat", 2.0),
    ("adapter_grid+concat", 1.0),
    ("adapter_grid+concat", 2.0),
)
UNET = {"base_channels": 16, "channel_mult": (1, 2, 2), "num_res_blocks": 1, "norm_num_groups": 8}
DIFFUSION = {"process": "ddpm", "prediction_type": "sample"}  # WDM's recipe, the ip_adapter bundle's process
TOKEN_DIM = 64
SHARED = ("radius", "intensity")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def row_name(method: str, guidance: float) -> str:
    return method if guidance == 1.0 else f"{method}_g{guidance:g}"


# -- data ------------------------------------------------------------------------------------------------------------


def load_task(task: str, work: Path) -> dict[str, np.ndarray]:
    """Training and held-out (reference, target) volumes ``(N, n, n, n)`` in [0, 1], cached under ``work``."""
    cache = work / f"{task}.npz"
    if cache.is_file():
        return dict(np.load(cache))
    if task == "transfer_shapes32":
        ref, tgt, _, _ = make_pairs(256, 32, seed=1000, shared=SHARED)
        test_ref, test_tgt, test_params, _ = make_pairs(32, 32, seed=2000, shared=SHARED)
        law = make_pairs(256, 32, seed=3000, shared=SHARED)[2]  # the laws' spread, for the normalised error
        data = {
            "train_ref": ref,
            "train_tgt": tgt,
            "test_ref": test_ref,
            "test_tgt": test_tgt,
            **{f"test_{k}": test_params[k] for k in SHARED},
            **{f"law_sd_{k}": np.asarray(np.std(law[k])) for k in SHARED},
        }
    elif task == "paired_demo32":
        data = _demo_pairs(work)
    else:
        raise ValueError(f"unknown task {task!r}: one of {TASKS}.")
    work.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **data)
    return data


def _demo_pairs(work: Path) -> dict[str, np.ndarray]:
    import nibabel as nib

    from data_prep.demo import make_demo_dataset

    dst = work / "demo32_data"
    datalist = dst / "prepared" / "datalist.json"
    if not datalist.is_file():
        make_demo_dataset(dst, num_cases=48, seed=0, resolution=4, pool=2, progress=False)
    data = json.loads(datalist.read_text())
    cases = sorted(
        (e for split in ("training", "validation", "test") for e in data.get(split, [])), key=lambda e: e["case"]
    )

    def vols(key: str, entries: list) -> np.ndarray:
        return np.clip(
            np.stack([np.asarray(nib.load(datalist.parent / e[key]).dataobj, np.float32) for e in entries]), 0, 1
        )

    train, test = cases[:40], cases[40:]
    return {
        "train_ref": vols("t1n", train),
        "train_tgt": vols("t2w", train),
        "test_ref": vols("t1n", test),
        "test_tgt": vols("t2w", test),
    }


def to_model(vols: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(vols))[:, None].float() * 2 - 1  # [0, 1] -> [-1, 1]


# -- training --------------------------------------------------------------------------------------------------------


def train_method(
    method: str,
    data: dict,
    encoder_path: Path,
    frozen: torch.nn.Module | None,
    seed: int,
    args: argparse.Namespace,
    out: Path,
) -> tuple[torch.nn.Module, dict]:
    """Train one method (the adapters on ``frozen``, their base's EMA weights); returns the model to sample and
    figures. A model already trained (``out/<method>.pt``) is loaded instead."""
    diffusion = WaveletDiffusion(**DIFFUSION)
    adapter = method.startswith("adapter")
    concat = method.endswith("concat")
    torch.manual_seed(seed)
    if adapter:
        encoder = build_image_encoder("wfvae", checkpoint=encoder_path)
        if "grid" in method:  # one token per feature-grid cell, read by place (positions on both sides)
            grid = json.loads((encoder_path / "encoder_info.json").read_text())["latent_shape"][1:]
            model = IPAdapter(frozen, encoder, projection="global+grid", token_dim=TOKEN_DIM, feature_grid=grid)
        else:
            model = IPAdapter(frozen, encoder, projection="global+spatial", token_dim=TOKEN_DIM)
        params = model.trainable_parameters()
        ema = None
    else:
        model = wdm_unet("wdm_128", in_channels=16 if concat else 8, out_channels=8, **UNET)
        params = list(model.parameters())
        ema = torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(args.ema_decay)
        )
    info = {"trainable_parameters": int(sum(p.numel() for p in params))}
    weights = out / f"{method}.pt"
    if weights.is_file():
        state = torch.load(weights, weights_only=True)
        if adapter:
            model.load_adapter_state_dict(state["weights"])
        else:
            model.load_state_dict(state["weights"])
        return model.eval(), {**info, **state["info"]}
    opt = torch.optim.AdamW(params, lr=args.adapter_lr if adapter else args.lr, weight_decay=0.0)
    inferer = WaveletDiffusionInferer(diffusion)
    rng = np.random.default_rng(seed)
    refs, tgts = to_model(data["train_ref"]), to_model(data["train_tgt"])
    gen = torch.Generator().manual_seed(seed)
    model.train()
    losses, t0 = [], time.time()
    for _ in range(args.iterations):
        idx = torch.from_numpy(rng.choice(len(tgts), args.batch_size, replace=False))
        x0 = diffusion.encode(tgts[idx])
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, diffusion.num_train_timesteps, (len(idx),), generator=gen)
        kw = {}
        if concat:
            kw["concat"] = diffusion.encode(refs[idx])
        if adapter:
            kw["image"] = refs[idx]
            kw["drop_image"] = torch.rand(len(idx), generator=gen) < args.image_drop
        pred = inferer(x0, model, noise=noise, timesteps=t, **kw)
        loss = (pred - x0).pow(2).mean()  # x0 prediction, unweighted: WDM's loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if ema is not None:
            ema.update_parameters(model)
        losses.append(loss.item())
    info.update(train_seconds=round(time.time() - t0, 1), final_loss=float(np.mean(losses[-50:])))
    final = ema.module if ema is not None else model
    state = model.adapter_state_dict() if adapter else final.state_dict()
    out.mkdir(parents=True, exist_ok=True)
    tmp = weights.with_suffix(".tmp")
    torch.save({"weights": state, "info": info}, tmp)
    os.replace(tmp, weights)
    return final.eval(), info


# -- sampling and scoring --------------------------------------------------------------------------------------------


@torch.no_grad()
def sample(method: str, model: torch.nn.Module, refs: torch.Tensor, guidance: float, seed: int, args) -> np.ndarray:
    """One sample per reference row of ``refs`` ``(N, 1, n, n, n)`` in [-1, 1]; returns ``(N, n, n, n)`` in [0, 1]."""
    diffusion = WaveletDiffusion(**DIFFUSION)
    out = []
    for start in range(0, len(refs), args.sample_batch):
        ref = refs[start : start + args.sample_batch]
        kw: dict = {}
        net = model
        if method.endswith("concat"):
            kw["concat"] = ref
        if method.startswith("adapter"):
            net = ClassifierFreeGuidance(model, guidance, drop=("image",))
            kw["model_kwargs"] = {"image_tokens": model.encode_image(ref), "image_scale": 1.0}
        vols = diffusion.sample(
            net,
            (1, *ref.shape[2:]),
            num_samples=len(ref),
            sampler="ddim",
            num_steps=args.steps,
            seed=10_000 * (seed + 1) + start,
            progress=False,
            **kw,
        )
        out.append(((vols[:, 0].clamp(-1, 1) + 1) / 2).numpy())
    return np.concatenate(out)


def score(task: str, data: dict, fake: np.ndarray, reps: int) -> dict:
    """Per-sample figures averaged: PSNR / SSIM / MAE against the paired target, and for the shapes the transfer."""
    target = np.repeat(data["test_tgt"], reps, axis=0)
    f, t = torch.from_numpy(fake)[:, None], torch.from_numpy(target)[:, None]
    out = {
        "psnr": float(psnr(f, t, data_range=1.0).mean()),
        "ssim": float(ssim3d(f, t, data_range=1.0).mean()),
        "mae": float((f - t).abs().mean()),
        "num_samples": len(fake),
    }
    if task == "transfer_shapes32":
        got = [measure(v) for v in fake]
        errs = []
        for k in SHARED:
            truth = np.repeat(data[f"test_{k}"], reps)
            measured = np.array([g[k] for g in got], np.float64)
            ok = np.isfinite(measured)
            err = np.abs(measured[ok] - truth[ok]) / float(data[f"law_sd_{k}"])
            out[f"transfer_error_{k}"] = float(err.mean()) if ok.any() else math.inf
            out[f"transfer_r_{k}"] = float(np.corrcoef(measured[ok], truth[ok])[0, 1]) if ok.sum() > 2 else math.nan
            errs.append(out[f"transfer_error_{k}"])
        out["transfer_error"] = float(np.mean(errs))
        out["valid"] = float(np.mean([g["valid"] for g in got]))
    return out


def design(method: str) -> str | None:
    """How an adapter row's tokens reach the base (None for base and concat)."""
    if not method.startswith("adapter"):
        return None
    if "grid" in method:
        return "global+grid tokens (4 pooled + one per feature-grid cell), place-biased blocks at levels 1-2 + middle"
    return "global+spatial tokens (4 pooled + 16 Perceiver), blocks at levels 1-2 + middle"


def run_one(task: str, seed: int, args: argparse.Namespace) -> None:
    """Train and score ``args.methods`` for one task and seed; rows already in ``seed<k>.json`` are kept (a later
    run adds the methods it lacks, reusing the trained models it needs)."""
    root = Path(args.out) / task
    done = root / f"seed{seed}.json"
    previous = json.loads(done.read_text()) if done.is_file() else None
    have = {r["method"] for r in previous["records"]} if previous else set()
    todo = [m for m in args.methods if any(row_name(m, g) not in have for mm, g in ROWS if mm == m)]
    if not todo:
        log(f"{task} seed {seed}: done already")
        return
    needed = set(todo) | {("concat" if m.endswith("concat") else "base") for m in todo if m.startswith("adapter")}
    data = load_task(task, Path(args.out) / "data")
    enc_dir = root / "encoder"
    enc = train_wfvae_encoder(data["train_ref"], enc_dir, seed=0, iterations=args.encoder_iterations)
    log(f"{task}: encoder {enc}")
    work = root / f"seed{seed}"
    reps = args.samples_per_reference if task == "paired_demo32" else 1
    refs = to_model(np.repeat(data["test_ref"], reps, axis=0))
    records, models = list(previous["records"]) if previous else [], {}
    for method in [m for m in METHODS if m in needed]:
        frozen = models.get("concat" if method.endswith("concat") else "base") if method.startswith("adapter") else None
        model, info = train_method(method, data, enc_dir, frozen, seed, args, work)
        models[method] = model
        for m, g in ROWS:
            if m != method or m not in todo or row_name(m, g) in have:
                continue
            t0 = time.time()
            fake = sample(method, model, refs, g, seed, args)
            rec = {
                "method": row_name(method, g),
                "task": task,
                "seed": seed,
                "guidance": g,
                "ip_scale": 1.0 if method.startswith("adapter") else None,
                "design": design(method),
                **info,
                "iterations": args.iterations,
                "lr": args.adapter_lr if method.startswith("adapter") else args.lr,
                "budget_iterations": args.iterations * (2 if method.startswith("adapter") else 1),
                "sample_seconds": round(time.time() - t0, 1),
                **score(task, data, fake, reps),
            }
            records.append(rec)
            log(
                f"{task} seed {seed} {rec['method']}: "
                + ", ".join(f"{k} {rec[k]:.4g}" for k in ("psnr", "ssim", "transfer_error") if k in rec)
            )
            np.save(work / f"samples_{rec['method']}.npy", fake[:8])
    doc = {
        "task": task,
        "seed": seed,
        "encoder": enc,
        "settings": {k: v for k, v in vars(args).items() if k not in ("func",)},
        "network": UNET,
        "diffusion": DIFFUSION,
        "parameters": {m: count_parameters(models[m]) for m in ("base", "concat") if m in models}
        or (previous or {}).get("parameters", {}),
        "records": records,
    }
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=float))
    os.replace(tmp, done)


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    for task in args.task:
        for seed in args.seeds:
            run_one(task, seed, args)


# -- report ----------------------------------------------------------------------------------------------------------

METRICS = {"paired_demo32": ("psnr", "ssim", "mae"), "transfer_shapes32": ("transfer_error", "valid", "psnr")}


def _records(docs: list[dict]) -> list[dict]:
    """Every record, with ``design`` and ``lr`` filled in for rows written before the records carried them."""
    out = []
    for d in docs:
        for r in d["records"]:
            adapter = r["method"].startswith("adapter")
            lr = d["settings"]["adapter_lr"] if adapter else d["settings"]["lr"]
            out.append({"design": design(r["method"].split("_g")[0]), "lr": lr, **r})
    return out


def _paired(rows: list[dict], method: str, other: str, metric: str) -> tuple[float, float, float] | None:
    theirs = {r["seed"]: r[metric] for r in rows if r["method"] == other}
    d = [r[metric] - theirs[r["seed"]] for r in rows if r["method"] == method and r["seed"] in theirs]
    return t_interval(d) if len(d) >= 2 else None


def summarize(records: list[dict]) -> dict:
    """Per task and row: mean and 95% t-interval of each metric over seeds; per-seed differences to the base (all
    metrics) and, for adapters, to concat; and whether the row's interval on each metric is disjoint from the
    base's (the issue's criterion)."""
    out: dict = {}
    order = [row_name(m, g) for m, g in ROWS]
    for task in TASKS:
        rows = [r for r in records if r["task"] == task]
        if not rows:
            continue
        table = {}
        for method in sorted({r["method"] for r in rows}, key=order.index):
            mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["seed"])
            entry = {
                "seeds": [r["seed"] for r in mine],
                "design": mine[0]["design"],
                "lr": mine[0]["lr"],
                "trainable_parameters": mine[0]["trainable_parameters"],
                **{m: t_interval([r[m] for r in mine]) for m in METRICS[task] if m in mine[0]},
            }
            if method != "base":
                entry["vs_base"] = {m: _paired(rows, method, "base", m) for m in METRICS[task]}
                entry["disjoint_from_base"] = {
                    m: bool(entry[m][1] > table["base"][m][2] or entry[m][2] < table["base"][m][1])
                    for m in METRICS[task]
                    if "base" in table and m in entry
                }
            if method.startswith("adapter"):
                entry["vs_concat"] = {m: _paired(rows, method, "concat", m) for m in METRICS[task]}
            table[method] = entry
        out[task] = table
    return out


def _fmt(ci, digits: int = 2) -> str:
    if ci is None:
        return ""
    mean, lo, hi = ci
    return f"{mean:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _digits(metric: str) -> int:
    return 3 if metric in ("ssim", "mae", "valid", "transfer_error") else 2


def markdown(summary: dict, docs: list[dict], command: str) -> str:
    m = docs[0]["settings"]
    enc = {d["task"]: d["encoder"] for d in docs}
    lines = [
        MARK_BEGIN,
        f"Measured with `{command}` on {machine()['cpu']} (CPU, {m['threads']} thread per run, two runs at a time), "
        f"{datetime.date.today().isoformat()}. Every model: {m['iterations']} AdamW steps, batch {m['batch_size']}; "
        f"base and concat (lr {m['lr']}) keep an EMA ({m['ema_decay']}) and the adapters train on it (frozen): "
        f"their total budget is twice the steps. WDM's process (DDPM, x0 prediction), DDIM-{m['steps']} sampling, "
        "lambda 1; `_g2` rows add classifier-free guidance 2 on the image (the learned null prompt as the "
        "unconditional branch). Image encoder: a WF-VAE trained by this project on the training references ("
        + ", ".join(
            f"{t}: {e.get('iterations')} steps, {e.get('recon_psnr_db', float('nan')):.1f} dB" for t, e in enc.items()
        )
        + "). Mean and 95% t-interval over the row's seeds (`n`); `vs base` is the mean difference to the base over "
        "the seeds both have, with its interval; **bold**: the row's interval is disjoint from the base's.",
        "",
    ]
    for task, table in summary.items():
        metrics = [k for k in METRICS[task] if k in table.get("base", {})]
        lines += [
            f"**{task}**",
            "",
            "| method | n | lr | "
            + " | ".join(metrics)
            + " | "
            + " | ".join(f"vs base ({k})" for k in metrics[:2])
            + " |",
            "|---" * (len(metrics) + 3 + len(metrics[:2])) + "|",
        ]
        for method, row in table.items():
            cells = []
            for k in metrics:
                text = _fmt(row.get(k), _digits(k))
                cells.append(f"**{text}**" if row.get("disjoint_from_base", {}).get(k) else text)
            diffs = [_fmt(row.get("vs_base", {}).get(k), _digits(k)) for k in metrics[:2]]
            lines.append(
                f"| {method} | {len(row['seeds'])} | {row['lr']:g} | "
                + " | ".join(cells)
                + " | "
                + " | ".join(diffs)
                + " |"
            )
        lines.append("")
    designs = {row["design"] for table in summary.values() for row in table.values() if row["design"]}
    lines.append("Adapters: " + "; ".join(sorted(designs)) + ".")
    lines.append(MARK_END)
    return "\n".join(lines)


def _splice(path: Path, block: str, heading: str) -> None:
    text = path.read_text()
    if MARK_BEGIN in text:
        a, b = text.index(MARK_BEGIN), text.index(MARK_END) + len(MARK_END)
        text = text[:a] + block + text[b:]
    else:
        text = text.rstrip("\n") + f"\n\n{heading}\n\n{block}\n"
    path.write_text(text)


def report(args: argparse.Namespace) -> None:
    docs = sorted(
        (json.loads(p.read_text()) for p in Path(args.out).glob("*/seed*.json")), key=lambda d: (d["task"], d["seed"])
    )
    if not docs:
        raise SystemExit(f"no finished runs under {args.out}")
    records = _records(docs)
    summary = summarize(records)
    block = markdown(summary, docs, args.command)
    print(block)
    if args.write:
        RESULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
        result = {
            "benchmark": "ip_adapter_study",
            "machine": machine(),
            "command": args.command,
            "date": datetime.date.today().isoformat(),
            "settings": docs[0]["settings"],
            "network": docs[0]["network"],
            "diffusion": docs[0]["diffusion"],
            "encoders": {d["task"]: d["encoder"] for d in docs},
            "summary": summary,
            "records": records,
        }
        RESULTS_JSON.write_text(json.dumps(result, indent=1, default=float) + "\n")
        _splice(README, block, "### Measured study (issue 20): base, adapter, concat, adapter + concat")
        _splice(BENCHMARKS_MD, block, "## IP-Adapter: base, adapter, concat, adapter + concat (issue 20)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(required=True)
    r = sub.add_parser("run")
    r.add_argument("out")
    r.add_argument("--task", nargs="+", default=list(TASKS), choices=TASKS)
    r.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    r.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="(in training order)")
    r.add_argument("--iterations", type=int, default=600)
    r.add_argument("--batch-size", type=int, default=8)
    r.add_argument("--lr", type=float, default=2e-4)
    r.add_argument("--adapter-lr", type=float, default=5e-4)
    r.add_argument("--ema-decay", type=float, default=0.995)
    r.add_argument("--image-drop", type=float, default=0.1)
    r.add_argument("--encoder-iterations", type=int, default=300)
    r.add_argument("--steps", type=int, default=50)
    r.add_argument("--samples-per-reference", type=int, default=4)
    r.add_argument("--sample-batch", type=int, default=16)
    r.add_argument("--threads", type=int, default=1)
    r.set_defaults(func=run)
    p = sub.add_parser("report")
    p.add_argument("out")
    p.add_argument("--write", action="store_true")
    p.add_argument("--command", default="")
    p.set_defaults(func=report)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
