"""Stage two: train NH²2ST heads (or a baseline) on cached features.

    results = train_folds("stores/demo.zarr", "all", load_config("configs/demo.yaml"))
    predictor = Predictor.load("runs/demo/fold-0")        # nh2st.predictor

data.py     a fold as device tensors (FoldSpots), its train/validation/test samples, the store's folds
loop.py     fit: the training loop, one readable epoch at a time
fold.py     train_fold: one fold end to end, into its run folder (nh2st.runs)
parallel.py train_folds: folds over processes and devices; spawn_ddp
__main__    `python -m nh2st.training` under torchrun: one fold with DDP
"""

from nh2st.training.data import FoldSpots, carve_validation, fold_split_ids, store_folds
from nh2st.training.fold import MODEL_KINDS, PROTOCOLS, score_run, train_fold
from nh2st.training.loop import fit
from nh2st.training.parallel import resolve_folds, spawn_ddp, train_folds

__all__ = ["FoldSpots", "MODEL_KINDS", "PROTOCOLS", "carve_validation", "fit", "fold_split_ids", "resolve_folds",
           "score_run", "spawn_ddp", "store_folds", "train_fold", "train_folds"]
