"""`python -m nh2st.training`: the torchrun entry point; each fold trains with DDP over the launched processes.

    torchrun --standalone --nproc_per_node=4 -m nh2st.training --store stores/zen.zarr --folds 0
"""

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

from nh2st.config import resolve_config
from nh2st.devices import resolve_device
from nh2st.errors import NH2STError
from nh2st.progress import console
from nh2st.training.fold import PROTOCOLS, open_store, train_fold
from nh2st.training.loop import rank_world
from nh2st.training.parallel import resolve_folds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nh2st.training", description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--folds", nargs="+", default=["all"])
    parser.add_argument("--config")
    parser.add_argument("--set", dest="overrides", nargs="*", action="extend", default=[])
    parser.add_argument("--protocol", choices=PROTOCOLS, default="default")
    parser.add_argument("--split", default=None)
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        device = resolve_device(args.device)
        if world > 1:
            if device.type == "cuda":
                device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        store = open_store(args.store)
        cfg, _ = resolve_config(store.meta.dataset, args.config, args.overrides)
        split = args.split or cfg.DATASET.fold_scheme
        for k in resolve_folds(store, args.folds, split):
            result = train_fold(args.store, k, cfg, args.runs_dir, args.protocol, "nh2st", device,
                                show_progress=rank_world()[0] == 0, split=split, overwrite=args.overwrite,
                                resume=args.resume)
            if rank_world()[0] == 0:
                print(json.dumps({key: result.get(key) for key in ("fold", "R", "pcc_mean", "mse", "mae", "run_dir")}))
    except NH2STError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
