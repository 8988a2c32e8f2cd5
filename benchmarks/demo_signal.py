"""Does the demo's signal survive the real pipeline? Ridge probes on the cached features of the demo.

    python benchmarks/demo_signal.py                      # probes on stores/demo.zarr (built if missing)
    python benchmarks/demo_signal.py --fresh              # also time generation + extraction from scratch
                                                          # (in a temporary folder), then probe that store

The generator records, from its own quantities, what each kind of model could reach at best
(data/demo/demo.json: noise ceiling, achievable PCC of a pooled / map-aware / neighbourhood-aware
model; see nh2st.datasets.demo). This script fits the corresponding probes on the features the
pipeline actually cached (random-weight ResNet18 512x7x7 maps) and prints both side by side:

    pooled              the 512-d pooled feature
    map                 pooled + the mean of the centre 3x3 cells of the map (the spot's disc)
    map, 3x3 cells      pooled + the 9 centre cells, flattened (5,120 features)
    neighbourhood       map + the mean pooled feature of the spot's 8 neighbours (store's index)
    neighbourhood+      neighbourhood + the neighbours' mean centre 3x3 cells

Each probe is a ridge regression (features standardised on the training slides) whose alpha is
picked by leave-one-slide-out over the training slides only; the 3 demo folds (nh2st.splits) are
the test folds. PCC per slide is the within-slide mean per-gene PCC averaged over test slides:
the quantity the generator's figures are defined as.
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from nh2st.datasets import demo
from nh2st.metrics import pcc_per_gene
from nh2st.splits import folds
from nh2st.store import EmbeddingStore, load_spots

ROOT = Path(__file__).resolve().parents[1]
ALPHAS = np.logspace(-2, 3, 11)   # in units of the mean kernel diagonal (features standardised)
EXTRACT_BUDGET_S = 120.0


def probe_features(spots: dict) -> dict[str, np.ndarray]:
    """{probe name: (N, F) float32} from a load_spots table (features, pooled, neighbors)."""
    maps = spots["features"]
    centre = maps[:, :, 2:5, 2:5].astype(np.float32)
    centre_mean = centre.mean(axis=(2, 3))
    pooled = spots["pooled"].astype(np.float32)
    neighbours = spots["neighbors"][:, 1:]
    mapped = np.hstack([pooled, centre_mean])
    around = np.hstack([mapped, pooled[neighbours].mean(1)])
    return {"pooled": pooled, "map": mapped, "map, 3x3 cells": np.hstack([pooled, centre.reshape(len(maps), -1)]),
            "neighbourhood": around, "neighbourhood+": np.hstack([around, centre_mean[neighbours].mean(1)])}


def ridge_predictions(x_train, y_train, x_test_list, alphas=ALPHAS):
    """Kernel-form ridge for every alpha at once: [(n_alpha, N_test, G) per test matrix]."""
    mean, scale = x_train.mean(0), x_train.std(0) + 1e-6
    z = (x_train - mean) / scale
    kernel = z @ z.T / z.shape[1]
    eigval, eigvec = np.linalg.eigh(kernel.astype(np.float64))
    y_mean = y_train.mean(0)
    projected = eigvec.T @ (y_train - y_mean)
    out = []
    for x_test in x_test_list:
        cross = (((x_test - mean) / scale) @ z.T / z.shape[1]) @ eigvec
        out.append(np.stack([y_mean + cross @ (projected / (eigval + a)[:, None]) for a in alphas]))
    return out


def run_probe(x, targets, slide, fold_list) -> dict:
    """Leave-slides-out probe: per fold, alpha by leave-one-training-slide-out, then test."""
    pooled_pcc, per_gene_slides, alphas = [], [], []
    for fold in fold_list:
        train, test = np.isin(slide, fold.train), np.isin(slide, fold.test)
        score = np.zeros(len(ALPHAS))
        for held in fold.train:
            inner, valid = train & (slide != held), slide == held
            for k, pred in enumerate(ridge_predictions(x[inner], targets[inner], [x[valid]])[0]):
                score[k] += np.nanmean(pcc_per_gene(pred, targets[valid]))
        best = int(np.argmax(score))
        pred = ridge_predictions(x[train], targets[train], [x[test]], ALPHAS[best:best + 1])[0][0]
        pooled_pcc.append(pcc_per_gene(pred, targets[test]))
        for sid in fold.test:
            rows = slide[test] == sid
            per_gene_slides.append(pcc_per_gene(pred[rows], targets[test][rows]))
        alphas.append(float(ALPHAS[best]))
    return {"pcc": np.nanmean(pooled_pcc, axis=1), "per_slide": np.array(per_gene_slides), "alphas": alphas}


def time_pipeline(console: Console, workdir: Path) -> tuple[Path, Path, dict]:
    """Generate the demo and extract it through the CLI, as a user would; seconds of each step."""
    data, store = workdir / "data" / "demo", workdir / "demo.zarr"
    started = time.perf_counter()
    demo.generate_demo(data, show_progress=False)
    generated = time.perf_counter() - started
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cli.main", "extract", "--dataset", "demo", "--data-root", str(data),
                    "--store", str(store)], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    extracted = time.perf_counter() - started
    table = Table(title="demo from scratch (this CPU)")
    table.add_column("step")
    table.add_column("seconds", justify="right")
    table.add_row("generate 6 slides (nh2st.datasets.demo.generate_demo)", f"{generated:.1f}")
    table.add_row("nh2st extract --dataset demo (includes starting Python and torch)", f"{extracted:.1f}")
    table.add_row("total", f"{generated + extracted:.1f}", style="bold")
    table.add_row("budget", f"{EXTRACT_BUDGET_S:.0f}", style="italic")
    console.print(table)
    return data, store, {"generate_seconds": generated, "extract_seconds": extracted}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, default=ROOT / "stores" / "demo.zarr")
    parser.add_argument("--data-root", type=Path, default=ROOT / "data" / "demo")
    parser.add_argument("--fresh", action="store_true", help="generate and extract from scratch in a temp dir, timed")
    parser.add_argument("--json", type=Path, default=None, help="also save the results here")
    args = parser.parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 160)

    workdir = Path(tempfile.mkdtemp(prefix="nh2st-demo-signal-")) if args.fresh else None
    try:
        timing = {}
        if workdir is not None:
            args.data_root, args.store, timing = time_pipeline(console, workdir)
        elif not args.store.exists():
            from nh2st.extract import run_extract
            run_extract("demo", data_root=args.data_root, store_path=args.store)
        manifest = demo.ensure_demo(args.data_root)
        store = EmbeddingStore.open(args.store)
        ids = store.sample_ids()
        genes = list(store.meta.genes)
        spots = load_spots(store, ids, fields=("features", "pooled", "targets", "neighbors"))
    finally:
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)

    model = demo.gene_model(manifest["seed"])
    programme_of = dict(zip(model.var_names, model.programme))
    programme = np.array([programme_of[g] for g in genes])
    targets = spots["targets"].astype(np.float64)
    slide = np.array(ids)[spots["sample_index"]]
    fold_list = folds("demo", ids)
    results = {}
    for name, x in probe_features(spots).items():
        started = time.perf_counter()
        result = run_probe(x, targets, slide, fold_list)
        result["seconds"] = time.perf_counter() - started
        result["features"] = x.shape[1]
        results[name] = result

    oracle = {"pooled": "pooled", "map": "map", "neighbourhood": "neighbourhood"}
    table = Table(title=f"demo signal: ridge probes on the cached features ({len(ids)} slides, "
                        f"{len(targets):,} spots, 3 folds) vs the generator's achievable PCC")
    for column in ("probe", "features", "PCC", "PCC per slide", *(f"per slide, {p}" for p in demo.PROGRAMMES),
                   "generator (per slide)", "alphas"):
        table.add_column(column, justify="left" if column == "probe" else "right", no_wrap=column == "probe")
    for name, result in results.items():
        per_slide = result["per_slide"]
        by_programme = [f"{np.nanmean(np.nanmean(per_slide[:, programme == k], axis=1)):.3f}"
                        for k in range(len(demo.PROGRAMMES))]
        generator = manifest["achievable_pcc"].get(oracle.get(name, ""))
        table.add_row(name, f"{result['features']:,}", f"{np.mean(result['pcc']):.3f}",
                      f"{np.mean(np.nanmean(per_slide, axis=1)):.3f}", *by_programme,
                      "—" if generator is None else f"{generator:.3f}",
                      " ".join(f"{a:.3g}" for a in result["alphas"]))
    ceiling = manifest["by_programme"]
    table.add_row("noise ceiling (generator)", "—", "—", f"{manifest['noise_ceiling_pcc']:.3f}",
                  *(f"{ceiling[p]['noise_ceiling_pcc']:.3f}" for p in demo.PROGRAMMES), "—", "—", style="italic")
    table.caption = ("PCC: mean over genes, pooled over each fold's test slides, mean over folds; per slide: within "
                     "each test slide, mean over slides (comparable with the generator's figures); per programme: "
                     "the same over the genes of that programme; generator: demo.json achievable_pcc")
    console.print(table)
    if args.json:
        report = {"timing": timing, "generator": {k: manifest[k] for k in ("noise_ceiling_pcc", "achievable_pcc",
                                                                          "by_programme")},
                  "probes": {name: {"features": r["features"], "pcc": float(np.mean(r["pcc"])),
                                    "pcc_per_slide": float(np.mean(np.nanmean(r["per_slide"], axis=1))),
                                    "alphas": r["alphas"], "seconds": r["seconds"]} for name, r in results.items()}}
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
