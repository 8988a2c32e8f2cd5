"""Prediction quality on the demo: baselines, NH²2ST paper mode, the recommended recipe and each of its switches.

    python benchmarks/quality.py                                    # every variant, seeds 0 1 2
    python benchmarks/quality.py --variants ridge paper nh2st+ --seeds 0
    python benchmarks/quality.py --report validation                # for tuning: validation slides only
    python benchmarks/quality.py --tune-mlp                         # the MLP probe's settings, on validation
    python benchmarks/quality.py --json quality.json --runs-dir /tmp/quality-runs

For each variant and seed (GENERAL.seed, which also picks the validation slide carved from each
training fold) all demo folds are trained and tested with `nh2st.training.train_folds` under the
default protocol: early stopping and checkpoint selection on validation slides, the test fold
scored once. Variants:

    mean, ridge, mlp      the per-gene training mean; HEST-Bench's ridge and an MLP probe on pooled features
    paper                 NH²2ST paper mode: configs/demo-paper.yaml (the released code's keys)
    nh2st+                the recommended configuration: configs/demo.yaml (MODEL.preset nh2st+)
    paper+<switch>        paper mode plus one switch, at the value nh2st+ uses (SWITCHES): the recipe's
                          decoder-init, selection, schedule, clip; weight-decay (tried, not in nh2st+);
                          and the demo's choices batch-32 and query+neighbors
    nh2st+:views8         nh2st+ on --views-store, a store extracted with `--views 8`: each target spot's
                          query map is one of its 8 dihedral views, drawn per epoch (TRAINING.augment);
                          the table's caption gives both stores' sizes

`--report test` (default) scores the test folds: PCC pooled over each fold's test slides (as
training reports it) and per slide (within-slide, mean over test slides: the quantity the
generator's noise ceiling in demo.json is defined as), R top-50, HVG-50, MSE, MAE. Each seed's
value is the mean over folds; the table shows mean ± std (population) over seeds.
`--report validation` shows instead what selection saw on the validation slides at the selected
epoch (PCC, R, MSE) and never reads a test fold's expression: tune with it, report with test.
`--tune-mlp` fits the MLP probe with a few settings on each fold's training slides and scores
them on its validation slides (seed 0's carve); the chosen one is nh2st.baselines' default.
Runs go to a temporary folder unless --runs-dir is given, never to runs/.
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
from nh2st.config import PRESETS, load_config
from nh2st.evaluate import evaluate_fold
from nh2st.extract import disk_bytes
from nh2st.training import train_folds

ROOT = Path(__file__).resolve().parents[1]


def preset_keys(section: str, names: list[str]) -> list[str]:
    """`--set` overrides of PRESETS["nh2st+"] for the named keys of one section (sub-sections flattened)."""
    values = PRESETS["nh2st+"][section]
    out = []
    for name in names:
        value = values[name]
        if isinstance(value, dict):
            out += [f"{section}.{name}.{k}={v}" for k, v in value.items()]
        else:
            out.append(f"{section}.{name}={str(value).lower() if isinstance(value, bool) else value}")
    return out


RECOMMENDED, PAPER = ROOT / "configs" / "demo.yaml", ROOT / "configs" / "demo-paper.yaml"
SWITCHES = {   # paper mode -> nh2st+, one key group at a time, at nh2st+'s value (weight decay: the value tried)
    "decoder-init": preset_keys("MODEL", ["decoder_init"]),
    "selection": preset_keys("TRAINING", ["early_stopping"]),
    "schedule": preset_keys("TRAINING", ["lr_scheduler"]),
    "weight-decay": ["TRAINING.weight_decay=0.01"],   # not in nh2st+: measured, it cost validation PCC
    "clip": preset_keys("MODEL", ["clip_output"]),
    "batch-32": ["TRAINING.batch_size=32"],
    "query+neighbors": ["MODEL.predict_from=query+neighbors"],
}
VARIANTS = {   # name -> (model kind, config file, overrides, label)
    "mean": ("mean", RECOMMENDED, [], "mean (per-gene training mean)"),
    "ridge": ("ridge", RECOMMENDED, [], "ridge (HEST-Bench: scaler + PCA 256 + ridge, pooled)"),
    "mlp": ("mlp", RECOMMENDED, [], "MLP probe (pooled, 1 hidden layer)"),
    "paper": ("nh2st", PAPER, [], "NH²2ST paper mode (configs/demo-paper.yaml)"),
    "nh2st+": ("nh2st", RECOMMENDED, [], "NH²2ST nh2st+ (recommended, configs/demo.yaml)"),
    "nh2st+:views8": ("nh2st", RECOMMENDED, [], "NH²2ST nh2st+ on the --views 8 store (augmented)"),
    **{f"paper+{name}": ("nh2st", PAPER, keys, f"paper mode + {name}") for name, keys in SWITCHES.items()},
}
VIEWS_VARIANTS = ("nh2st+:views8",)      # trained on --views-store, the demo extracted with --views 8
CORE_VARIANTS = ["mean", "ridge", "mlp", "paper", "nh2st+"]
SWITCH_VARIANTS = [f"paper+{name}" for name in SWITCHES]
TEST_METRICS = ("pcc_mean", "pcc_per_slide", "R", "hvg50_pcc", "mse", "mae")
VALIDATION_METRICS = {"pcc_mean": "val_pcc", "R": "val_R", "mse": "val_loss"}


def ensure_store(store: Path, data_root: Path, views: int = 1) -> None:
    if store.exists():
        return
    from nh2st.extract import run_extract   # stage one only when the store is missing
    run_extract("demo", data_root=data_root, store_path=store, views=views)


def selected_row(fold_dir: Path, best_epoch: int) -> dict:
    """The per-epoch log row of the selected epoch: what selection saw on the validation slides."""
    history = json.loads((fold_dir / "log.json").read_text())
    return next(row for row in history if row["epoch"] == best_epoch)


def run_seed(store: Path, variant: str, seed: int, runs_dir: Path, report: str, show_progress: bool) -> dict:
    """Train and score all folds of one variant with one seed; fold-mean of each metric plus the folds."""
    kind, config, overrides, _ = VARIANTS[variant]
    cfg = load_config(config, [*overrides, f"GENERAL.seed={seed}"])
    out_dir = runs_dir / variant.replace(":", "-").replace("+", "plus") / f"seed-{seed}"
    started = time.perf_counter()
    results = train_folds(store, "all", cfg, out_dir, "default", kind, show_progress=show_progress, overwrite=True)
    seconds = time.perf_counter() - started
    folds = []
    for result in results:
        fold_dir = Path(result["run_dir"])
        fold = {"fold": result["fold"], "best_epoch": result["best_epoch"], "epochs_run": result["epochs_run"]}
        if report == "validation":
            row = selected_row(fold_dir, result["best_epoch"])
            fold.update({k: row.get(v) for k, v in VALIDATION_METRICS.items()})
        else:
            per_slide = evaluate_fold(fold_dir, store, write=False)["per_sample_mean"]["pcc_mean"]["mean"]
            fold.update(test_samples=result["test_samples"], pcc_per_slide=per_slide,
                        **{k: result[k] for k in ("pcc_mean", "R", "hvg50_pcc", "mse", "mae")})
        folds.append(fold)
    keys = TEST_METRICS if report == "test" else tuple(VALIDATION_METRICS)
    means = {k: metrics.mean_std([f[k] for f in folds])["mean"] for k in keys}
    return {"seed": seed, "seconds": seconds, **means, "folds": folds}


MLP_GRID = [dict(hidden=256, dropout=0.2, weight_decay=1e-2), dict(hidden=256, dropout=0.5, weight_decay=1e-1),
            dict(hidden=256, dropout=0.7, weight_decay=1e-1), dict(hidden=256, dropout=0.9, weight_decay=1e-1),
            dict(hidden=512, dropout=0.8, weight_decay=1e-1), dict(hidden=256, dropout=0.9, weight_decay=1e-1, epochs=30)]


def tune_mlp(store: Path, config: Path, console: Console) -> None:
    """Validation PCC and MSE of the MLP probe per setting, averaged over folds; test slides never loaded."""
    import torch

    from nh2st.baselines import fit_mlp
    from nh2st.store import EmbeddingStore, load_spots
    from nh2st.training.data import fold_split_ids, store_folds

    opened = EmbeddingStore.open(store)
    cfg = load_config(config, ["GENERAL.seed=0"])
    folds = []
    for fold in store_folds(opened):
        ids, _ = fold_split_ids(fold, cfg, "default")
        arrays = {name: load_spots(opened, ids[name], ("features", "targets")) for name in ("train", "val")}
        folds.append({name: (a["features"].astype(np.float32).mean(axis=(2, 3)), a["targets"])
                      for name, a in arrays.items()})
    table = Table(title="MLP probe settings on validation slides (seed 0's carve, mean over folds)")
    for name in ("setting", "val PCC", "val MSE"):
        table.add_column(name, justify="left" if name == "setting" else "right")
    for setting in MLP_GRID:
        scores = [metrics.score(fit_mlp(*f["train"], seed=0, **setting).predict(torch.tensor(f["val"][0])).numpy(),
                                f["val"][1], list(opened.meta.genes)) for f in folds]
        table.add_row(", ".join(f"{k} {v}" for k, v in setting.items()),
                      f"{np.mean([s['pcc_mean'] for s in scores]):.3f}", f"{np.mean([s['mse'] for s in scores]):.4f}")
    console.print(table)


def summarise(per_seed: list[dict], keys) -> dict:
    return {k: metrics.mean_std([s[k] for s in per_seed]) for k in (*keys, "seconds")}


def fmt(stats: dict | None, digits: int = 3) -> str:
    if stats is None or stats["mean"] is None:
        return "—"
    if stats["n"] < 2:
        return f"{stats['mean']:.{digits}f}"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def results_table(results: dict, ceiling: dict | None, report: str) -> Table:
    where = "test folds" if report == "test" else "VALIDATION slides at the selected epoch (tuning view)"
    table = Table(title=f"demo quality, default protocol, {where} (mean ± std over seeds of the fold mean)")
    columns = (["PCC", "PCC per slide", "% ceiling", "R top-50", "HVG-50", "MSE", "MSE / mean", "MAE"]
               if report == "test" else ["PCC", "R top-50", "MSE", "MSE / mean"])
    for name in ("variant", "seeds", *columns, "best epoch", "s / seed"):
        table.add_column(name, justify="left" if name == "variant" else "right", no_wrap=name == "variant")
    mean_mse = results.get("mean", {}).get("summary", {}).get("mse", {}).get("mean")
    noise = ceiling.get("noise_ceiling_pcc") if ceiling else None
    for variant, result in results.items():
        s = result["summary"]
        epochs = [f["best_epoch"] for seed in result["seeds"] for f in seed["folds"]]
        ratio = f"{s['mse']['mean'] / mean_mse:.2f}" if mean_mse and s["mse"]["mean"] is not None else "—"
        if report == "test":
            per_slide = s["pcc_per_slide"]["mean"]
            share = f"{100 * per_slide / noise:.0f} %" if noise and per_slide is not None else "—"
            cells = [fmt(s["pcc_mean"]), fmt(s["pcc_per_slide"]), share, fmt(s["R"]), fmt(s["hvg50_pcc"]),
                     fmt(s["mse"]), ratio, fmt(s["mae"])]
        else:
            cells = [fmt(s["pcc_mean"]), fmt(s["R"]), fmt(s["mse"]), ratio]
        table.add_row(VARIANTS[variant][3], " ".join(str(seed["seed"]) for seed in result["seeds"]), *cells,
                      f"{np.mean(epochs):.1f}" if result["kind"] == "nh2st" else "—", fmt(s["seconds"], 0))
    if noise and report == "test":
        cells = ["—", f"{noise:.3f}", "100 %"] + ["—"] * (len(columns) - 3)
        table.add_row("noise ceiling (generator, per slide)", "", *cells, "—", "—", style="italic")
    table.caption = ("PCC: mean over genes, pooled over a fold's test slides; PCC per slide: within-slide, mean over "
                     "slides (comparable with the noise ceiling, which is per slide); R top-50: mean of the 50 best "
                     "genes (picked on the scored slides: optimistic); HVG-50: 50 most variable training genes; "
                     "MSE / mean: MSE over the mean baseline's; best epoch: mean selected epoch (0-based)")
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, default=ROOT / "stores" / "demo.zarr")
    parser.add_argument("--views-store", type=Path, default=ROOT / "stores" / "demo-views8.zarr",
                        help="the demo extracted with --views 8, for nh2st+:views8 (extracted here if missing)")
    parser.add_argument("--data-root", type=Path, default=ROOT / "data" / "demo",
                        help="the generated demo (its demo.json holds the noise ceiling)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="GENERAL.seed values")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS),
                        default=CORE_VARIANTS + [*VIEWS_VARIANTS] + SWITCH_VARIANTS)
    parser.add_argument("--switch-seeds", type=int, nargs="+", default=None,
                        help="GENERAL.seed values for the paper+<switch> variants (default: --seeds)")
    parser.add_argument("--report", choices=("test", "validation"), default="test")
    parser.add_argument("--runs-dir", type=Path, default=None, help="keep the runs here (default: a temp dir)")
    parser.add_argument("--tune-mlp", action="store_true", help="only the MLP probe's settings, on validation")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="also save the results here")
    args = parser.parse_args(argv)

    console = Console(width=None if sys.stdout.isatty() else 200)   # logs keep the table's columns
    ensure_store(args.store, args.data_root)
    if any(v in VIEWS_VARIANTS for v in args.variants):
        ensure_store(args.views_store, args.data_root, views=8)
    if args.tune_mlp:
        tune_mlp(args.store, RECOMMENDED, console)
        return 0
    tmp = tempfile.TemporaryDirectory(prefix="nh2st-quality-") if args.runs_dir is None else None
    runs_dir = Path(tmp.name) if tmp else args.runs_dir
    keys = TEST_METRICS if args.report == "test" else tuple(VALIDATION_METRICS)
    started = time.perf_counter()
    results = {}
    try:
        for variant in args.variants:
            per_seed = []
            seeds = args.switch_seeds if variant in SWITCH_VARIANTS and args.switch_seeds else args.seeds
            for seed in seeds:
                console.print(f"{variant} seed {seed} ...", highlight=False)
                store = args.views_store if variant in VIEWS_VARIANTS else args.store
                per_seed.append(run_seed(store, variant, seed, runs_dir, args.report, not args.no_progress))
            results[variant] = {"kind": VARIANTS[variant][0], "config": str(VARIANTS[variant][1]),
                                "overrides": VARIANTS[variant][2],
                                "summary": summarise(per_seed, keys), "seeds": per_seed}
    finally:
        if tmp:
            tmp.cleanup()
    demo_json = args.data_root / "demo.json"
    ceiling = json.loads(demo_json.read_text()) if demo_json.is_file() else None
    table = results_table(results, ceiling, args.report)
    stores = {"store": args.store, **({"views_store": args.views_store} if any(v in VIEWS_VARIANTS for v in results) else {})}
    sizes = {name: disk_bytes(path) for name, path in stores.items()}
    table.caption += "; store size: " + ", ".join(f"{stores[name].name} {size / 1e6:.1f} MB" for name, size in sizes.items())
    console.print(table)
    wall = time.perf_counter() - started
    console.print(f"wall time {wall:.0f} s", highlight=False)
    if args.json:
        report = {"store": str(args.store), "store_bytes": sizes, "protocol": "default", "report": args.report,
                  "seeds": args.seeds, "wall_seconds": wall, "variants": results, "generator": ceiling}
        args.json.write_text(json.dumps(metrics.to_json(report), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
