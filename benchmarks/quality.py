"""Prediction quality on the demo benchmark: baselines, NH²2ST paper mode and its switches, several seeds.

    python benchmarks/quality.py                                   # all variants, seeds 0 1 2: ~25 min on 2 CPU cores
    python benchmarks/quality.py --variants ridge nh2st --seeds 0  # a subset
    python benchmarks/quality.py --json quality.json --runs-dir /tmp/quality-runs

For each variant and seed (GENERAL.seed, which also picks the validation slide carved from each
training fold) all 3 demo folds are trained and tested with `nh2st.training.train_folds` under the
default protocol (early stopping and checkpoint selection on validation slides, the test fold
scored once). Variants:

    mean                  per-gene training mean (`--model mean`)
    ridge                 HEST-Bench ridge on pooled features (`--model ridge`)
    nh2st                 paper mode: configs/demo.yaml as shipped
    nh2st:query+neighbors MODEL.predict_from=query+neighbors
    nh2st:no-neighbors    MODEL.neighbor_branch=false

Each seed's value of a metric is the mean over the 3 folds; the table shows mean ± std (population)
over seeds. "PCC" is pooled over each fold's test slides (as training reports it); "PCC per slide"
is the mean over test slides of the within-slide PCC (`nh2st.evaluate.evaluate_fold`), the quantity
the generator's noise ceiling (data/demo/demo.json) is defined as, so only that column compares
with the ceiling row. Runs go to a temporary folder unless --runs-dir is given, never to runs/.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from nh2st import metrics
from nh2st.config import load_config
from nh2st.evaluate import evaluate_fold
from nh2st.training import train_folds

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {   # name -> (model kind, config overrides)
    "mean": ("mean", []),
    "ridge": ("ridge", []),
    "nh2st": ("nh2st", []),
    "nh2st:query+neighbors": ("nh2st", ["MODEL.predict_from=query+neighbors"]),
    "nh2st:no-neighbors": ("nh2st", ["MODEL.neighbor_branch=false"]),
}
LABELS = {"nh2st": "NH²2ST paper mode", "nh2st:query+neighbors": "NH²2ST query+neighbors",
          "nh2st:no-neighbors": "NH²2ST no neighbor branch"}
METRICS = ("pcc_mean", "pcc_per_slide", "R", "hvg50_pcc", "mse", "mae")


def ensure_store(store: Path) -> None:
    if store.exists():
        return
    from nh2st.extract import run_extract   # stage one only when the store is missing
    run_extract("demo", data_root=ROOT / "data" / "demo", store_path=store)


def validation_trace(fold_dir: Path) -> dict:
    """The per-epoch log of a fold, condensed: what the selection saw (validation only, never test)."""
    history = json.loads((fold_dir / "log.json").read_text())
    keep = ("epoch", "train_loss", "val_loss", "val_R", "val_pcc")
    return {"epochs": [{k: row.get(k) for k in keep} for row in history]}


def run_seed(store: Path, config: Path, variant: str, seed: int, runs_dir: Path, show_progress: bool) -> dict:
    """Train and test all folds of one variant with one seed; fold-mean of each metric plus the folds."""
    kind, overrides = VARIANTS[variant]
    cfg = load_config(config, [*overrides, f"GENERAL.seed={seed}"])
    out_dir = runs_dir / variant.replace(":", "-") / f"seed-{seed}"
    started = time.perf_counter()
    results = train_folds(store, "all", cfg, out_dir, "default", kind, show_progress=show_progress, overwrite=True)
    seconds = time.perf_counter() - started
    folds = []
    for result in results:
        fold_dir = Path(result["run_dir"])
        per_slide = evaluate_fold(fold_dir, store, write=False)["per_sample_mean"]["pcc_mean"]["mean"]
        folds.append({"fold": result["fold"], "test_samples": result["test_samples"],
                      "best_epoch": result["best_epoch"], "epochs_run": result["epochs_run"],
                      "pcc_per_slide": per_slide,
                      **{k: result[k] for k in ("pcc_mean", "R", "hvg50_pcc", "mse", "mae")},
                      "validation": validation_trace(fold_dir)})
    means = {k: metrics.mean_std([f[k] for f in folds])["mean"] for k in METRICS}
    return {"seed": seed, "seconds": seconds, **means, "folds": folds}


def summarise(per_seed: list[dict]) -> dict:
    return {k: metrics.mean_std([s[k] for s in per_seed]) for k in (*METRICS, "seconds")}


def fmt(stats: dict, digits: int = 3) -> str:
    if stats["mean"] is None:
        return "—"
    if stats["n"] < 2:
        return f"{stats['mean']:.{digits}f}"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def results_table(results: dict, ceiling: dict | None, seeds: list[int]) -> Table:
    table = Table(title=f"demo benchmark, default protocol, 3 folds, seeds {' '.join(map(str, seeds))} "
                        "(mean ± std over seeds of the fold mean)")
    for name in ("variant", "PCC", "PCC per slide", "R top-50", "HVG-50", "MSE", "MAE", "best epoch", "seconds"):
        table.add_column(name, justify="left" if name == "variant" else "right", no_wrap=name == "variant")
    for variant, result in results.items():
        s = result["summary"]
        epochs = [f["best_epoch"] for seed in result["seeds"] for f in seed["folds"]]
        table.add_row(LABELS.get(variant, variant), fmt(s["pcc_mean"]), fmt(s["pcc_per_slide"]), fmt(s["R"]),
                      fmt(s["hvg50_pcc"]), fmt(s["mse"]), fmt(s["mae"]),
                      f"{np.mean(epochs):.1f}" if result["kind"] == "nh2st" else "—", fmt(s["seconds"], 0))
    if ceiling is not None:
        table.add_row("noise ceiling (generator)", "—", f"{ceiling['noise_ceiling_pcc']:.3f}", "—", "—", "—", "—",
                      "—", "—", style="italic")
    table.caption = ("PCC: mean over genes, pooled over each fold's test slides; PCC per slide: within-slide, mean "
                     "over test slides (comparable with the noise ceiling, which is per slide); R top-50: mean of "
                     "the 50 best genes (picked on test: optimistic); HVG-50: 50 most variable training genes; "
                     "best epoch: mean selected epoch (0-based, on validation); seconds: 3 folds per seed. "
                     "query+neighbors: MODEL.predict_from=query+neighbors; no neighbor branch: "
                     "MODEL.neighbor_branch=false")
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, default=ROOT / "stores" / "demo.zarr")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="GENERAL.seed values")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--runs-dir", type=Path, default=None, help="keep the runs here (default: a temp dir)")
    parser.add_argument("--demo-json", type=Path, default=ROOT / "data" / "demo" / "demo.json",
                        help="the generator's manifest with the noise ceiling")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="also save the results here")
    args = parser.parse_args(argv)

    console = Console(width=None if sys.stdout.isatty() else 160)   # logs keep the table's columns
    ensure_store(args.store)
    tmp = tempfile.TemporaryDirectory(prefix="nh2st-quality-") if args.runs_dir is None else None
    runs_dir = Path(tmp.name) if tmp else args.runs_dir
    started = time.perf_counter()
    results = {}
    try:
        for variant in args.variants:
            per_seed = []
            for seed in args.seeds:
                console.print(f"{variant} seed {seed} ...", highlight=False)
                per_seed.append(run_seed(args.store, args.config, variant, seed, runs_dir, not args.no_progress))
            results[variant] = {"kind": VARIANTS[variant][0], "overrides": VARIANTS[variant][1],
                                "summary": summarise(per_seed), "seeds": per_seed}
    finally:
        if tmp:
            tmp.cleanup()
    ceiling = json.loads(args.demo_json.read_text()) if args.demo_json.is_file() else None
    console.print(results_table(results, ceiling, args.seeds))
    wall = time.perf_counter() - started
    console.print(f"wall time {wall:.0f} s", highlight=False)
    if args.json:
        report = {"store": str(args.store), "config": str(args.config), "protocol": "default", "seeds": args.seeds,
                  "wall_seconds": wall, "variants": results,
                  "noise_ceiling": None if ceiling is None else
                  {"pcc_per_slide": ceiling["noise_ceiling_pcc"], "method": ceiling["noise_ceiling_method"],
                   "samples": ceiling["samples"]}}
        args.json.write_text(json.dumps(metrics.to_json(report), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
