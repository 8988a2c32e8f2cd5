"""Writing synthetic samples into a real store, for the stage-two tests."""

import numpy as np

from nh2st.expression import process_expression
from nh2st.neighbors import knn_index


def write_spots(store, sample_id: str, maps: np.ndarray, counts: np.ndarray, grid_xy: np.ndarray,
                pixel_xy: np.ndarray, thumbnail: np.ndarray | None = None, thumbnail_scale: float = 0.02,
                views: np.ndarray | None = None) -> None:
    """One complete sample from feature maps (N, C, H, W) and raw counts (N, G), as extraction writes it;
    a store made with V > 1 views also takes the other views' maps (N, V-1, C, H, W)."""
    writer = store.begin_sample(sample_id, len(maps))
    writer.write_features(maps.astype(np.float16), maps.mean(axis=(2, 3)).astype(np.float32),
                          None if views is None else views.astype(np.float16))
    writer.write_array("counts", counts)
    writer.write_array("targets", process_expression(counts, grid_xy))
    writer.write_array("pixel_xy", pixel_xy)
    writer.write_array("grid_xy", grid_xy)
    writer.write_array("barcodes", np.array([f"{sample_id}-{i:03d}" for i in range(len(maps))]))
    writer.write_array("neighbors", knn_index(pixel_xy, store.meta.neighbors_k))
    if thumbnail is not None:
        writer.write_thumbnail(thumbnail, thumbnail_scale)
    writer.commit()


def smooth_latent(rng, grid: tuple[int, int], latent: int, noise: float) -> tuple[np.ndarray, np.ndarray]:
    """Spots on an nx x ny grid and a latent state per spot, smooth in space plus `noise`: (N, 2), (N, latent)."""
    nx, ny = grid
    gx, gy = np.meshgrid(np.arange(nx), np.arange(ny))
    grid_xy = np.stack([gx.ravel(), gy.ravel()], 1).astype(np.int64)
    freq, phase = rng.uniform(0.3, 0.9, size=(latent, 2)), rng.uniform(0, 2 * np.pi, size=latent)
    z = np.sin(grid_xy @ freq.T + phase) + noise * rng.normal(size=(len(grid_xy), latent))
    return grid_xy, z
