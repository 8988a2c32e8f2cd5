"""The shipped demo dataset: synthetic H&E slides with Visium-like spots, in the HEST-1k layout.

Generated deterministically (fixed seed) on first use into a root (default ``data/demo/``):

    st/DEMO<k>.h5ad  wsis/DEMO<k>.tif  metadata/DEMO<k>.json  HEST_v1_1_0.csv  demo.json

and then read by the HEST reader (:mod:`nh2st.datasets.hest`), so the demo exercises exactly the
code path of a real HEST download.

The tissue. At 0.5 µm/px a Visium spot (55 µm) is 110 px across, the pitch (100 µm) is 200 px
and the 224-px patch that `nh2st extract` crops sees one spot and a rim around it. Each slide is
a patchwork of tumour (dense, large, pleomorphic nuclei), stroma (wavy pink collagen, sparse
elongated nuclei) and fat (empty cells, thin membranes), laid out as smooth random regions a few
pitches across inside a ragged outline on white glass. Small lymphoid aggregates (crowded small
dark nuclei, 35-55 µm across) sit in tumour and stroma on a jittered hexagonal lattice 110 µm
apart, evenly spaced as such structures tend to be. So nearly every patch holds about one
aggregate: whether it lies inside the spot's disc or in the patch's rim is what varies, and a
patch-wide average cannot tell. Colours come from Beer-Lambert mixing of haematoxylin and eosin
optical densities, with per-slide stain variation.

The expression. Per spot, `disc` is the tissue-type composition of the spot's 55 µm disc (the
tissue the spot captures transcripts from), and `surround` the composition beyond the patch, out
to SURROUND_RADIUS_PX (what the neighbouring spots' patches show). Each gene belongs to one
programme (shared by all slides): `region` genes mark tumour, stroma or fat in the disc, `spot`
genes mark lymphoid cells in the disc, `niche` genes respond to tumour or lymphoid tissue in the
surround. With per-gene loadings A, B and baselines b,

    rate[s, g] = library[s] * softmax_g(b_g + A_g . disc_s + B_g . surround_s)
    count      ~ Poisson(Gamma(1/phi_g, phi_g * rate))             (negative binomial)

The patch's rim (inside the patch, outside the disc) enters no rate. Library sizes are
log-normal around 3,000 counts over the 263 genes, scaled by the disc's cellularity, so that
low genes are mostly zeros.

What the signal allows, from the generator's own quantities (recorded in demo.json; the
regression targets are those of :func:`nh2st.expression.process_expression`, whose 3x3 grid
smoothing averages each Visium spot with its 4 diagonal neighbours):
  * noise ceiling: per slide, the mean per-gene PCC between the observed targets and the ideal
    predictor E[targets | rates], estimated as the mean targets of many independent count draws;
  * achievable PCC of three information sets, each a ridge regression on quadratic features of
    the true tissue compositions, fitted to the ideal predictor of the other slides (leave one
    slide out) and scored against the held-out slide's observed targets, like the ceiling:
    `pooled` (the patch's composition: what an average over the patch shows), `map` (the disc
    and the rim apart: a map resolved in space) and `neighbourhood` (plus the surround and the
    grid-smoothed discs of the neighbouring spots: what their patches show).
The smoothing gives a spot's own disc a fifth of its target and the four neighbours' discs the
rest, which bounds what resolving the centre can add over a patch average (it reaches the `spot`
genes' fifth); seeing the neighbours adds more.

Writing: every file goes to a temporary name and is renamed into place; a sample's metadata JSON
is written last and demo.json after all samples, so an interrupted generation is finished (not
trusted) on the next use. The HEST-format writers (`write_hest_sample`, and
`nh2st.slide.write_pyramid_tiff`) are also what tests use to build real-format fixtures.
"""

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from nh2st.atomic import atomic_write
from nh2st.datasets import hest
from nh2st.errors import NH2STError
from nh2st.expression import normalize_log, process_expression, smooth_grid
from nh2st.genes import load_gene_list
from nh2st.metrics import pcc_per_gene
from nh2st.progress import make_progress
from nh2st.slide import write_pyramid_tiff
from nh2st.splits import DEMO_IDS

GENERATOR_VERSION = 2
SEED = 2025_06_30
MPP = 0.5                      # µm per pixel of level 0 ("20x")
PITCH_PX = 200.0               # Visium centre-to-centre 100 µm
SPOT_RADIUS_PX = 55.0          # Visium spot diameter 55 µm
PATCH_PX = 224                 # the patch `nh2st extract` crops (nh2st.encoder.PATCH_SIZE)
SURROUND_RADIUS_PX = 1.75 * PITCH_PX
AGGREGATE_SPACING_PX = 220.0
AGGREGATE_RADIUS_PX = (35.0, 55.0)
MARGIN_PX = 260                # glass around the spot grid
TISSUE_TYPES = ("background", "tumour", "stroma", "lymphoid", "fat")
PROGRAMMES = ("region", "spot", "niche")
INFORMATION_SETS = ("pooled", "map", "neighbourhood")
MITO_GENES = ("MT-ATP6", "MT-ATP8", "MT-CO1", "MT-CO2", "MT-CO3", "MT-CYB", "MT-ND1", "MT-ND2",
              "MT-ND3", "MT-ND4", "MT-ND4L", "MT-ND5", "MT-ND6")  # in var, outside the gene list
CEILING_DRAWS = 64
_LN10 = np.float32(np.log(10.0))

# Optical density vectors (R, G, B) of haematoxylin and eosin, Macenko-style estimates from H&E scans.
_HAEMATOXYLIN = np.array([0.5626, 0.7201, 0.4062], dtype=np.float32)
_EOSIN = np.array([0.2159, 0.8012, 0.5581], dtype=np.float32)

# Per tissue type: (nuclei per px^2, semi-major axis mean, sd [px], minor/major range, darkness mean, sd)
_NUCLEI = {
    1: (1 / 1000, 10.5, 2.2, (0.65, 1.0), 1.0, 0.22),   # tumour: large, pleomorphic, vesicular
    2: (1 / 3800, 11.0, 2.0, (0.22, 0.38), 0.95, 0.15),  # stroma, aligned with the fibres
    3: (1 / 260, 6.2, 0.5, (0.85, 1.0), 1.6, 0.15),     # lymphoid: small, round, dark
    4: (1 / 30000, 8.0, 1.0, (0.3, 0.45), 0.85, 0.1),   # fat
}
# Library size per unit of disc area of each tissue type, relative to tumour (glass captures little)
_CELLULARITY = np.array([0.05, 1.0, 0.55, 1.4, 0.25])


@dataclass
class DemoSimulation:
    """One generated sample; spots in h5ad row order, genes in var order (`var_names`).

    Compositions are (N, 5) fractions of TISSUE_TYPES; `targets` and `ideal` cover the in-tissue
    spots (in row order) and the DEMO gene list (in list order)."""

    sample_id: str
    image: np.ndarray | None       # (H, W, 3) uint8 level 0; None when simulated without rendering
    tissue_map: np.ndarray         # (H/4, W/4) uint8 tissue type (TISSUE_TYPES index) per 4x4 block
    pixel_xy: np.ndarray           # (N, 2) float64 (x = column, y = row)
    array_row: np.ndarray          # (N,) int64
    array_col: np.ndarray          # (N,) int64
    in_tissue: np.ndarray          # (N,) int64
    barcodes: np.ndarray           # (N,) str
    disc: np.ndarray               # the spot's 55 µm disc
    patch: np.ndarray              # the 224-px patch
    rim: np.ndarray                # the patch outside the disc
    surround: np.ndarray           # beyond the patch, within SURROUND_RADIUS_PX
    library_size: np.ndarray       # (N,)
    rates: np.ndarray              # (N, G_var) expected counts
    counts: np.ndarray             # (N, G_var) int64 observed counts
    var_names: list[str]
    programme: np.ndarray          # (G_list,) PROGRAMMES index of each list gene
    targets: np.ndarray            # (N_in, G_list) processed observed counts
    ideal: np.ndarray              # (N_in, G_list) E[targets | rates]
    ceiling: float                 # mean per-gene PCC of `ideal` against `targets`

    @property
    def grid_xy(self) -> np.ndarray:
        """(N_in, 2) grid ids (array_col, array_row) of the in-tissue spots."""
        kept = self.in_tissue == 1
        return np.stack([self.array_col[kept], self.array_row[kept]], axis=1)


# ---------------------------------------------------------------- random fields and layout

def _smooth_noise(rng, shape, sigma) -> np.ndarray:
    """Unit-variance Gaussian random field with correlation length ~sigma (in array px)."""
    field_ = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma, mode="reflect")
    return (field_ - field_.mean()) / (field_.std() + 1e-8)


def _upsample(array: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a 2-D field to `shape` (cell-centre aligned)."""
    zoom = (shape[0] / array.shape[0], shape[1] / array.shape[1])
    return ndimage.zoom(array, zoom, order=1, grid_mode=True, mode="nearest")[:shape[0], :shape[1]]


def _rotation(angle: float) -> np.ndarray:
    return np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])


def _spot_grid(rng):
    """Visium-like hex grid: columns of one row 2 apart, odd rows shifted by one; slight rotation."""
    n_rows, n_per_row = int(rng.integers(15, 19)), int(rng.integers(15, 19))
    row0, col0 = int(rng.integers(4, 40)), int(rng.integers(4, 60))
    rows, cols = [], []
    for r in range(row0, row0 + n_rows):
        start = col0 + ((r - col0) % 2)  # array_col has the parity of array_row
        for c in range(start, start + 2 * n_per_row, 2):
            rows.append(r)
            cols.append(c)
    rows, cols = np.array(rows, dtype=np.int64), np.array(cols, dtype=np.int64)
    local = np.stack([(cols - col0) * PITCH_PX / 2, (rows - row0) * PITCH_PX * np.sqrt(3) / 2], axis=1)
    xy = (local - local.mean(0)) @ _rotation(np.deg2rad(rng.uniform(-3, 3))).T
    xy += rng.uniform(-0.4, 0.4, size=xy.shape)  # sub-pixel registration jitter
    xy -= xy.min(0) - MARGIN_PX
    width, height = (np.ceil(xy.max(0)) + MARGIN_PX).astype(int)
    return rows, cols, xy, int(height), int(width)


def _aggregate_centres(rng, height: int, width: int) -> np.ndarray:
    """(M, 2) x, y: a hexagonal lattice AGGREGATE_SPACING_PX apart at a random angle and offset,
    each centre jittered by 15 % of the spacing, one in seven left out."""
    spacing = AGGREGATE_SPACING_PX
    n = int(np.hypot(height, width) / spacing / 2) + 2
    i, j = np.meshgrid(np.arange(-n, n + 1), np.arange(-n, n + 1))
    lattice = np.stack([(i + 0.5 * (j % 2)) * spacing, j * spacing * np.sqrt(3) / 2], axis=-1).reshape(-1, 2)
    xy = lattice @ _rotation(rng.uniform(0, np.pi)).T + np.array([width, height]) / 2 + rng.uniform(0, spacing, 2)
    xy += rng.normal(0, 0.15 * spacing, xy.shape)
    keep = (xy[:, 0] > -spacing) & (xy[:, 0] < width + spacing) & (xy[:, 1] > -spacing) & (xy[:, 1] < height + spacing)
    return xy[keep & (rng.random(len(xy)) > 1 / 7)]


def _tissue_labels(rng, height, width, spot_xy) -> np.ndarray:
    """(H/4, W/4) uint8 tissue type per 4x4 pixel block (0 = glass)."""
    ds, fine_ds = 32, 4
    coarse = (-(-height // ds), -(-width // ds))
    fine = (-(-height // fine_ds), -(-width // fine_ds))
    region_types = np.array([1, 2, 4], dtype=np.uint8)  # tumour, stroma, fat; lymphoid comes as aggregates
    fields = np.stack([_upsample(_smooth_noise(rng, coarse, 1.0 * PITCH_PX / ds), fine) for _ in range(3)])
    fields += (np.array([0.2, 0.3, -0.35]) + rng.normal(0, 0.3, 3))[:, None, None].astype(np.float32)
    fields += 0.1 * _smooth_noise(rng, (3, *fine), (0, 1.3, 1.3))  # ragged region borders
    labels = region_types[fields.argmax(0)]
    # fat is mostly empty: drop specks of it, they would look like holes torn along region borders
    specks = (labels == 4) & ~ndimage.binary_opening(labels == 4, iterations=2)
    fields[2] = -np.inf
    labels[specks] = region_types[fields.argmax(0)][specks]
    # lymphoid aggregates, evenly spaced, with ragged edges; fat has none
    centres = _aggregate_centres(rng, height, width)
    seeds = np.zeros(fine, dtype=bool)
    radius_at = np.zeros(fine, dtype=np.float32)
    iy, ix = (centres[:, 1] // fine_ds).astype(int), (centres[:, 0] // fine_ds).astype(int)
    on = (iy >= 0) & (iy < fine[0]) & (ix >= 0) & (ix < fine[1])
    seeds[iy[on], ix[on]] = True
    radius_at[iy[on], ix[on]] = rng.uniform(*AGGREGATE_RADIUS_PX, on.sum()) / fine_ds
    distance, (ny, nx) = ndimage.distance_transform_edt(~seeds, return_indices=True)
    aggregate = distance + 1.2 * _smooth_noise(rng, fine, 1.0) < radius_at[ny, nx]
    labels[aggregate & (labels != 4)] = 3
    # tissue outline: an ellipse over the spot grid with a ragged, random edge
    centre, half = spot_xy.mean(0) / fine_ds, (spot_xy.max(0) - spot_xy.min(0)) / 2 / fine_ds
    yy, xx = np.mgrid[:fine[0], :fine[1]].astype(np.float32)
    radius2 = ((xx + 0.5 - centre[0]) / half[0]) ** 2 + ((yy + 0.5 - centre[1]) / half[1]) ** 2
    outline = (1.35 - radius2 + 0.45 * _upsample(_smooth_noise(rng, coarse, 2.0 * PITCH_PX / ds), fine)
               + 0.06 * _smooth_noise(rng, fine, 1.0))
    labels[outline <= 0] = 0
    return labels


def _composition(labels_ds: np.ndarray, ds: int, spot_xy: np.ndarray, region) -> np.ndarray:
    """(N, 5) fraction of each tissue type over the cells of `labels_ds` (cell side `ds` px) whose
    offset (dx, dy) in px from the spot's cell satisfies `region(dx, dy)`; outside the image = glass."""
    reach = int(np.ceil(max(SURROUND_RADIUS_PX, PATCH_PX) / ds)) + 1
    dy, dx = np.mgrid[-reach:reach + 1, -reach:reach + 1]
    inside = region(dx * ds, dy * ds)
    dy, dx = dy[inside], dx[inside]
    cy = np.floor(spot_xy[:, 1] / ds).astype(int)[:, None] + dy
    cx = np.floor(spot_xy[:, 0] / ds).astype(int)[:, None] + dx
    h, w = labels_ds.shape
    valid = (cy >= 0) & (cy < h) & (cx >= 0) & (cx < w)
    types = np.where(valid, labels_ds[cy.clip(0, h - 1), cx.clip(0, w - 1)], 0)
    spot = np.repeat(np.arange(len(spot_xy)), types.shape[1])
    counts = np.bincount(spot * 5 + types.ravel(), minlength=5 * len(spot_xy)).reshape(-1, 5)
    return counts / counts.sum(1, keepdims=True)


def _in_disc(dx, dy):
    return dx ** 2 + dy ** 2 <= SPOT_RADIUS_PX ** 2


def _in_patch(dx, dy):
    return (np.abs(dx) <= PATCH_PX / 2) & (np.abs(dy) <= PATCH_PX / 2)


def _in_rim(dx, dy):
    return _in_patch(dx, dy) & ~_in_disc(dx, dy)


def _in_surround(dx, dy):
    return ~_in_patch(dx, dy) & (dx ** 2 + dy ** 2 <= SURROUND_RADIUS_PX ** 2)


# ---------------------------------------------------------------- rendering

def _nuclei(rng, labels_full_at, shape, fibre_angle_at) -> np.ndarray:
    """(H, W) float32 haematoxylin of nuclei: soft ellipses stamped with np.maximum.at."""
    height, width = shape
    out = np.zeros(height * width, dtype=np.float32)
    for kind, (density, a_mean, a_sd, aspect, dark_mean, dark_sd) in _NUCLEI.items():
        n = rng.poisson(density * height * width)
        x, y = rng.uniform(0, width, n), rng.uniform(0, height, n)
        keep = labels_full_at(x, y) == kind
        x, y = x[keep], y[keep]
        n = len(x)
        if n == 0:
            continue
        a = np.clip(rng.normal(a_mean, a_sd, n), 0.6 * a_mean, a_mean + 2.5 * a_sd).astype(np.float32)
        b = (a * rng.uniform(*aspect, n)).astype(np.float32)
        angle = (fibre_angle_at(x, y) if kind == 2 else rng.uniform(0, np.pi, n)).astype(np.float32)
        dark = np.clip(rng.normal(dark_mean, dark_sd, n), 0.3, 2.5).astype(np.float32)
        half = int(np.ceil(a.max())) + 1
        offsets = np.arange(-half, half + 1)
        px = np.floor(x).astype(int)[:, None, None] + offsets[None, None, :]
        py = np.floor(y).astype(int)[:, None, None] + offsets[None, :, None]
        dx = (px + 0.5 - x[:, None, None]).astype(np.float32)
        dy = (py + 0.5 - y[:, None, None]).astype(np.float32)
        cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
        u, v = dx * cos + dy * sin, -dx * sin + dy * cos
        q = np.sqrt((u / a[:, None, None]) ** 2 + (v / b[:, None, None]) ** 2)
        value = np.clip((1 - q) * b[:, None, None] + 0.5, 0, 1) * dark[:, None, None]
        if kind == 1:  # vesicular: chromatin along the rim, paler centre
            value *= 0.5 + 0.5 * np.minimum(q, 1) ** 2
        inside = (px >= 0) & (px < width) & (py >= 0) & (py < height) & (value > 0)
        flat = np.broadcast_to(py * width, value.shape)[inside] + np.broadcast_to(px, value.shape)[inside]
        np.maximum.at(out, flat, value[inside].astype(np.float32))
    return out.reshape(height, width)


def _fibres(rng, theta2: np.ndarray, where: np.ndarray) -> np.ndarray:
    """(h, w) float32 in [0, 1]: collagen streaks along angle `theta2` (line-integral convolution of
    white noise, evaluated only where `where` is true), at the resolution of `theta2`."""
    h, w = theta2.shape
    noise = ndimage.gaussian_filter(rng.standard_normal((h, w), dtype=np.float32), 0.6)
    ys, xs = np.nonzero(where)
    out = np.zeros((h, w), dtype=np.float32)
    if len(ys) == 0:
        return out
    dx, dy = np.cos(theta2[ys, xs]), np.sin(theta2[ys, xs])
    total = np.zeros(len(ys), dtype=np.float32)
    for step in range(-7, 8):
        sy = np.clip(np.rint(ys + step * dy).astype(np.int64), 0, h - 1)
        sx = np.clip(np.rint(xs + step * dx).astype(np.int64), 0, w - 1)
        total += noise[sy, sx]
    total /= total.std() + 1e-8
    out[ys, xs] = np.clip(0.45 + 0.5 * total, 0, 1) ** 1.5
    return out


def _render(rng, labels4: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W, 3) uint8 H&E-like image of the tissue-type map (labels per 4x4 block).

    Stain densities of the tissue background (cytoplasm, collagen, membranes) are made at half
    resolution; nuclei and grain at full resolution.
    """
    labels2 = np.repeat(np.repeat(labels4, 2, 0), 2, 1)[: -(-height // 2), : -(-width // 2)]
    half_shape = labels2.shape

    def full(array):  # half resolution -> level 0 by pixel repetition
        return np.repeat(np.repeat(array, 2, 0), 2, 1)[:height, :width]

    ds = 32
    coarse = (-(-height // ds), -(-width // ds))
    # collagen runs along a slowly turning direction; fat membranes are the zero set of a cell-sized field
    theta2 = _upsample(1.4 * _smooth_noise(rng, coarse, 2.0 * PITCH_PX / ds), half_shape)
    fibres = _fibres(rng, theta2, labels2 == 2)
    cells = _upsample(_smooth_noise(rng, (-(-height // 8), -(-width // 8)), 40.0 / 8), half_shape)
    membranes = np.exp(-(cells / np.float32(0.06)) ** 2)
    mottle = _smooth_noise(rng, half_shape, 2.5)
    del cells

    eosin = np.array([0.0, 0.34, 0.10, 0.10, 0.02], np.float32)[labels2]
    haem = np.array([0.0, 0.08, 0.01, 0.12, 0.0], np.float32)[labels2]
    eosin += np.where(labels2 == 2, 0.60 * fibres, 0).astype(np.float32)
    eosin += np.where(labels2 == 4, 0.45 * membranes, 0).astype(np.float32)
    eosin *= 1 + 0.22 * mottle
    haem *= 1 + 0.3 * mottle
    glass = np.where(labels2 == 0, np.float32(0.035), np.float32(0.02))
    del fibres, membranes, mottle

    def label_at(x, y):
        return labels2[np.floor(y / 2).astype(int), np.floor(x / 2).astype(int)]

    def fibre_angle_at(x, y):
        return theta2[np.floor(y / 2).astype(int), np.floor(x / 2).astype(int)]

    nuclei = _nuclei(rng, label_at, (height, width), fibre_angle_at)
    grain = rng.standard_normal((height, width), dtype=np.float32)
    haem = full(haem) + nuclei * (0.85 + 0.12 * grain)
    eosin = full(eosin) * (1 - 0.6 * np.minimum(nuclei, 1))
    del nuclei
    glass = full(glass) + 0.006 * grain
    del grain

    stain_h, stain_e = rng.uniform(0.85, 1.15), rng.uniform(0.85, 1.15)
    image = np.empty((height, width, 3), dtype=np.uint8)
    for c in range(3):
        density = haem * (stain_h * _HAEMATOXYLIN[c]) + eosin * (stain_e * _EOSIN[c]) + glass
        image[:, :, c] = np.clip(255 * np.exp(-_LN10 * density), 0, 255).astype(np.uint8)
    return image


# ---------------------------------------------------------------- expression

@dataclass(frozen=True)
class GeneModel:
    """Per-gene parameters shared by every demo slide (one 'biology'), in var order."""

    var_names: list[str]
    programme: np.ndarray          # (G,) index into PROGRAMMES
    baseline: np.ndarray           # (G,)
    disc_loadings: np.ndarray      # (G, 5) on the disc's composition
    surround_loadings: np.ndarray  # (G, 5) on the surround's composition
    dispersion: np.ndarray         # (G,) negative-binomial phi (variance = mu + phi mu^2)


def gene_model(seed: int = SEED) -> GeneModel:
    """Loadings sized so that each programme's marked input moves its genes' log rate by about one
    unit (sd over spots): tissue regions change the disc's composition by whole fractions,
    aggregates by about 0.2, the surround's lymphoid share varies by about 0.05."""
    rng = np.random.default_rng([seed, 1_000_000])
    names = load_gene_list("DEMO") + list(MITO_GENES)
    names = [names[i] for i in rng.permutation(len(names))]  # var order is not the list order
    g = len(names)
    programme = rng.choice(len(PROGRAMMES), g, p=[0.3, 0.4, 0.3])
    baseline = rng.normal(0.0, 1.2, g)
    baseline[[n.startswith("MT-") for n in names]] += 1.5
    disc = rng.normal(0.0, 0.25, (g, 5))
    surround = rng.normal(0.0, 0.25, (g, 5))
    disc[:, 0] *= 0.3                # glass adds little
    surround[:, 0] *= 0.3
    strength = rng.uniform(0.6, 1.4, g) * rng.choice([-1.0, 1.0], g, p=[0.2, 0.8])
    region = np.flatnonzero(programme == 0)
    disc[region, rng.choice([1, 2, 4], len(region))] += 2.5 * strength[region]
    spot = np.flatnonzero(programme == 1)
    disc[spot, 3] += 5.0 * strength[spot]
    niche = np.flatnonzero(programme == 2)
    niche_type = rng.choice([1, 3], len(niche))
    surround[niche, niche_type] += np.where(niche_type == 3, 16.0, 2.5) * strength[niche]
    return GeneModel(names, programme, baseline, disc, surround, np.exp(rng.uniform(np.log(0.05), np.log(0.4), g)))


def expected_counts(model: GeneModel, disc: np.ndarray, surround: np.ndarray,
                    library_size: np.ndarray) -> np.ndarray:
    """(N, G) rates = library * softmax_g(baseline + disc @ A.T + surround @ B.T)."""
    logits = model.baseline + disc @ model.disc_loadings.T + surround @ model.surround_loadings.T
    logits -= logits.max(axis=1, keepdims=True)
    share = np.exp(logits)
    share /= share.sum(axis=1, keepdims=True)
    return library_size[:, None] * share


def draw_counts(rng, rates: np.ndarray, dispersion: np.ndarray) -> np.ndarray:
    """Negative-binomial counts as a Poisson-Gamma mixture, int64."""
    shape = 1.0 / dispersion
    return rng.poisson(rng.gamma(shape, rates / shape)).astype(np.int64)


def ideal_targets(rng, rates: np.ndarray, dispersion: np.ndarray, grid_xy: np.ndarray,
                  draws: int = CEILING_DRAWS) -> np.ndarray:
    """(N, G) E[targets | rates], estimated as the mean processed targets of `draws` independent
    count draws (smoothing is linear, so the draws' normalised values are averaged first)."""
    total = np.zeros(rates.shape)
    for _ in range(draws):
        total += normalize_log(draw_counts(rng, rates, dispersion))
    return smooth_grid(total / draws, grid_xy)


def mean_pcc(pred: np.ndarray, targets: np.ndarray) -> float:
    """Mean over genes of the per-gene PCC over spots (constant genes left out)."""
    return float(np.nanmean(pcc_per_gene(pred, targets)))


# ---------------------------------------------------------------- what the signal allows

def _quadratic(x: np.ndarray) -> np.ndarray:
    """(N, F) -> (N, F + F(F+1)/2): the features and their pairwise products."""
    upper = np.triu_indices(x.shape[1])
    return np.hstack([x, (x[:, :, None] * x[:, None, :])[:, upper[0], upper[1]]])


def information_sets(sim: "DemoSimulation") -> dict[str, np.ndarray]:
    """Per INFORMATION_SETS name, (N_in, F) true tissue quantities a model of that kind could read:
    pooled = the patch's composition, map = the disc and the rim apart, neighbourhood = map plus
    the surround and the discs of the spots the target smoothing averages over."""
    kept = sim.in_tissue == 1
    own = np.hstack([sim.disc[kept], sim.rim[kept]])
    around = np.hstack([sim.surround[kept], smooth_grid(np.hstack([sim.disc[kept], sim.surround[kept]]), sim.grid_xy)])
    return {"pooled": _quadratic(sim.patch[kept]), "map": _quadratic(own),
            "neighbourhood": np.hstack([_quadratic(own), around])}


def achievable_pcc_per_gene(sims: list["DemoSimulation"]) -> dict[str, dict[str, np.ndarray]]:
    """{sample_id: {name: (G_list,) PCC}} for the noise ceiling ("ceiling") and each of
    INFORMATION_SETS: the PCC per gene, against the held-out slide's observed targets, of a ridge
    regression on that information set fitted to the ideal targets of the other slides."""
    from sklearn.linear_model import Ridge

    features = [information_sets(sim) for sim in sims]
    out = {}
    for i, held in enumerate(sims):
        out[held.sample_id] = {"ceiling": pcc_per_gene(held.ideal, held.targets)}
        for name in INFORMATION_SETS:
            x_train = np.vstack([f[name] for j, f in enumerate(features) if j != i])
            y_train = np.vstack([s.ideal for j, s in enumerate(sims) if j != i])
            pred = Ridge(alpha=1e-3).fit(x_train, y_train).predict(features[i][name])
            out[held.sample_id][name] = pcc_per_gene(pred, held.targets)
    return out


def signal_summary(sims: list["DemoSimulation"]) -> dict:
    """demo.json's signal figures: the noise ceiling and each information set's achievable PCC,
    each the mean per-gene PCC per slide, then averaged over slides; overall, per programme and
    per sample."""
    per_gene = achievable_pcc_per_gene(sims)
    programme = sims[0].programme

    def per_slide(name, select=slice(None)):
        return [float(np.nanmean(per_gene[s.sample_id][name][select])) for s in sims]

    def achievable(select=slice(None)):
        return {name: round(float(np.mean(per_slide(name, select))), 4) for name in INFORMATION_SETS}

    return {
        "noise_ceiling_pcc": round(float(np.mean(per_slide("ceiling"))), 4),
        "noise_ceiling_method": (f"per slide: mean over genes of the PCC between the observed targets and the ideal "
                                 f"predictor E[targets | rates] (mean targets of {CEILING_DRAWS} independent count "
                                 "draws from the same rates), in-tissue spots; overall: mean over slides"),
        "achievable_pcc": achievable(),
        "achievable_method": ("the same PCC, of a ridge regression (alpha 1e-3) on quadratic features of the true "
                              f"tissue compositions, fitted to the ideal targets of the other {len(sims) - 1} slides. "
                              "pooled: the "
                              "224-px patch's composition (what an average over the patch shows); map: the 55 µm "
                              "disc and the rest of the patch apart (a map resolved in space); neighbourhood: map "
                              "plus the surround beyond the patch and the grid-smoothed discs and surrounds of the "
                              "neighbouring spots (what their patches show)"),
        "by_programme": {p: {"genes": int((programme == k).sum()),
                             "noise_ceiling_pcc": round(float(np.mean(per_slide("ceiling", programme == k))), 4),
                             "achievable_pcc": achievable(programme == k)} for k, p in enumerate(PROGRAMMES)},
        "samples": {s.sample_id: {"spots_in_tissue": int(s.in_tissue.sum()),
                                  "noise_ceiling_pcc": round(float(np.nanmean(per_gene[s.sample_id]["ceiling"])), 4),
                                  "achievable_pcc": {name: round(float(np.nanmean(per_gene[s.sample_id][name])), 4)
                                                     for name in INFORMATION_SETS}} for s in sims},
        "counts": count_summary(sims),
    }


def count_summary(sims: list["DemoSimulation"]) -> dict:
    """How sparse and deep the counts are, over the in-tissue spots: median counts per spot (all
    var genes), the fraction of zeros over the list genes, and over the tenth of them lowest in
    mean count."""
    listed = list_columns(sims[0].var_names)
    counts = np.vstack([s.counts[s.in_tissue == 1] for s in sims])
    listed_counts = counts[:, listed]
    low = np.argsort(listed_counts.mean(0))[: max(1, len(listed) // 10)]
    return {"median_counts_per_spot": float(np.median(counts.sum(1))),
            "zero_fraction": round(float((listed_counts == 0).mean()), 4),
            "zero_fraction_lowest_tenth_of_genes": round(float((listed_counts[:, low] == 0).mean()), 4)}


# ---------------------------------------------------------------- one sample

def _barcodes(rng, n: int) -> np.ndarray:
    """Unique Visium-style barcodes, e.g. 'AAACAAGTATCTCCCA-1'."""
    letters = np.array(list("ACGT"))
    while True:
        codes = np.array(["".join(row) + "-1" for row in letters[rng.integers(0, 4, (n, 16))]])
        if len(set(codes)) == n:
            return codes


def simulate_sample(sample_id: str, seed: int = SEED, render: bool = True) -> DemoSimulation:
    """Generate one demo sample in memory (deterministic in `seed` and the sample's position).

    Layout, rendering, counts and the ceiling's draws use separate random streams, so
    `render=False` (image None, much faster) gives the same tissue and counts.
    """
    if sample_id not in DEMO_IDS:
        raise NH2STError(f"unknown demo sample {sample_id!r}; the demo has {', '.join(DEMO_IDS)}")
    k = DEMO_IDS.index(sample_id)
    layout_rng, render_rng, count_rng, ceiling_rng = (np.random.default_rng([seed, k, s]) for s in range(4))
    rows, cols, xy, height, width = _spot_grid(layout_rng)
    labels4 = _tissue_labels(layout_rng, height, width, xy)
    image = _render(render_rng, labels4, height, width) if render else None
    disc, patch, rim = (_composition(labels4, 4, xy, region) for region in (_in_disc, _in_patch, _in_rim))
    surround = _composition(labels4[::2, ::2], 8, xy, _in_surround)

    model = gene_model(seed)
    library = np.exp(count_rng.normal(np.log(3000.0), 0.35, len(xy))) * (disc @ _CELLULARITY)
    rates = expected_counts(model, disc, surround, library)
    counts = draw_counts(count_rng, rates, model.dispersion)
    in_tissue = (disc[:, 0] < 0.5).astype(np.int64)
    barcodes = _barcodes(layout_rng, len(xy))

    order = layout_rng.permutation(len(xy))  # Visium rows are not in grid order
    kept = in_tissue[order] == 1
    listed = list_columns(model.var_names)
    grid = np.stack([cols[order][kept], rows[order][kept]], axis=1)
    targets = process_expression(counts[order][kept][:, listed], grid)
    ideal = ideal_targets(ceiling_rng, rates[order][kept][:, listed], model.dispersion[listed], grid)
    return DemoSimulation(sample_id=sample_id, image=image, tissue_map=labels4, pixel_xy=xy[order],
                          array_row=rows[order], array_col=cols[order], in_tissue=in_tissue[order],
                          barcodes=barcodes, disc=disc[order], patch=patch[order], rim=rim[order],
                          surround=surround[order], library_size=library[order], rates=rates[order],
                          counts=counts[order], var_names=model.var_names, programme=model.programme[listed],
                          targets=targets, ideal=ideal, ceiling=mean_pcc(ideal, targets))


def list_columns(var_names: list[str]) -> np.ndarray:
    """Positions in `var_names` of the DEMO gene list, in list order."""
    position = {name: i for i, name in enumerate(var_names)}
    return np.array([position[g] for g in load_gene_list("DEMO")])


# ---------------------------------------------------------------- HEST-format writing

HEST_CSV_COLUMNS = ("dataset_title", "id", "image_filename", "organ", "disease_state", "oncotree_code",
                    "species", "patient", "st_technology", "data_publication_date", "license", "study_link",
                    "download_page_link1", "inter_spot_dist", "spot_diameter", "spots_under_tissue",
                    "preservation_method", "nb_genes", "treatment_comment", "pixel_size_um_embedded",
                    "pixel_size_um_estimated", "magnification", "fullres_px_width", "fullres_px_height",
                    "tissue", "disease_comment", "subseries", "hest_version_added")


def qc_columns(X, var_names) -> tuple[dict, dict]:
    """HEST/scanpy QC columns for obs and var computed from raw counts X (sparse or dense)."""
    from scipy import sparse

    X = sparse.csr_matrix(X, dtype=np.float64)
    mito = np.array([str(n).upper().startswith("MT-") for n in var_names])
    total = np.asarray(X.sum(axis=1)).ravel()
    detected = np.diff(X.indptr)
    dense_top = np.sort(X.toarray(), axis=1)[:, ::-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        obs = {"n_counts": total, "n_genes_by_counts": detected.astype(np.int64),
               "log1p_n_genes_by_counts": np.log1p(detected), "total_counts": total,
               "log1p_total_counts": np.log1p(total),
               "pct_counts_in_top_50_genes": 100 * dense_top[:, :50].sum(1) / total,
               "total_counts_mito": np.asarray(X[:, mito].sum(axis=1)).ravel(),
               "pct_counts_mito": 100 * np.asarray(X[:, mito].sum(axis=1)).ravel() / total}
    gene_total = np.asarray(X.sum(axis=0)).ravel()
    cells = np.asarray((X > 0).sum(axis=0)).ravel()
    var = {"mito": mito, "n_cells_by_counts": cells.astype(np.int64), "mean_counts": gene_total / max(X.shape[0], 1),
           "log1p_mean_counts": np.log1p(gene_total / max(X.shape[0], 1)),
           "pct_dropout_by_counts": 100 * (1 - cells / max(X.shape[0], 1)), "total_counts": gene_total,
           "log1p_total_counts": np.log1p(gene_total)}
    return obs, var


def write_hest_sample(root, sample_id: str, *, image: np.ndarray, mpp: float, obs, X, var_names,
                      metadata: dict, uns: dict | None = None, compression: str = "jpeg",
                      pyramid: str = "subifds", qc: bool = True) -> dict[str, Path]:
    """Write one sample in the HEST-1k layout: wsis/<id>.tif, st/<id>.h5ad, metadata/<id>.json.

    `obs` is a DataFrame indexed by barcode (HEST columns such as in_tissue, array_row, array_col,
    pxl_col_in_fullres, pxl_row_in_fullres; whatever is given is written as is); `X` raw counts
    (scipy sparse or dense), one column per `var_names`. `qc` adds scanpy's QC columns; obsm['spatial']
    is [pxl_col, pxl_row] when those columns exist; `uns` defaults to HEST's 'spatial' block with
    a downscaled image (long edge 1000). Each file is written atomically; the metadata JSON is
    written last (json's bare NaN tokens included), so its presence means the sample is complete.
    """
    import anndata
    import pandas as pd
    from PIL import Image

    root = Path(root)
    obs = obs.copy()
    var = pd.DataFrame(index=pd.Index([str(v) for v in var_names]))
    if qc:
        obs_qc, var_qc = qc_columns(X, var_names)
        for name, values in obs_qc.items():
            if name not in obs.columns:
                obs[name] = values
        for name, values in var_qc.items():
            var[name] = values
    if uns is None:
        scale = 1000.0 / max(image.shape[:2])
        size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
        small = Image.fromarray(image).resize(size, Image.Resampling.BOX)
        uns = {"spatial": {"ST": {"images": {"downscaled_fullres": np.asarray(small)},
                                  "scalefactors": {"spot_diameter_fullres": 55.0 / mpp,
                                                   "tissue_downscaled_fullres_scalef": scale,
                                                   "fiducial_diameter_fullres": 89.5 / mpp},
                                  "metadata": {}}}}
    obsm = {}
    if {"pxl_col_in_fullres", "pxl_row_in_fullres"} <= set(obs.columns):
        obsm["spatial"] = obs[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy()
    adata = anndata.AnnData(X=X, obs=obs, var=var, uns=uns, obsm=obsm)

    paths = {"wsi": root / "wsis" / f"{sample_id}.tif", "st": root / "st" / f"{sample_id}.h5ad",
             "metadata": root / "metadata" / f"{sample_id}.json"}
    paths["wsi"].parent.mkdir(parents=True, exist_ok=True)
    write_pyramid_tiff(paths["wsi"], image, mpp, compression=compression, pyramid=pyramid)
    atomic_write(paths["st"], lambda tmp: adata.write_h5ad(tmp))
    atomic_write(paths["metadata"], lambda tmp: tmp.write_text(json.dumps(metadata, indent=1)))
    return paths


def _hest_metadata(sim: DemoSimulation, seed: int) -> dict:
    nan = float("nan")  # HEST's writer leaves missing fields as bare NaN tokens
    height, width = sim.image.shape[:2]
    n_in = int(sim.in_tissue.sum())
    return {"dataset_title": "nh2st synthetic demo (H&E-like tissue, Visium-like spots)", "id": sim.sample_id,
            "image_filename": f"{sim.sample_id}.tif", "organ": "Synthetic", "disease_state": "Cancer",
            "oncotree_code": nan, "species": "Synthetic", "patient": f"Demo patient {sim.sample_id[4:]}",
            "st_technology": "Visium", "data_publication_date": nan, "license": "CC0 (generated by nh2st)",
            "study_link": nan, "download_page_link1": nan, "inter_spot_dist": 100.0, "spot_diameter": 55.0,
            "spots_under_tissue": n_in, "preservation_method": "Synthetic", "nb_genes": len(sim.var_names),
            "treatment_comment": nan, "pixel_size_um_embedded": MPP, "pixel_size_um_estimated": MPP,
            "magnification": "20x", "fullres_px_width": width, "fullres_px_height": height,
            "tissue": "Synthetic", "disease_comment": nan, "subseries": nan, "hest_version_added": nan,
            "fullres_height": height, "fullres_width": width, "spot_estimate_dist": PITCH_PX,
            "adata_nb_col": len(sim.var_names),
            "nh2st_demo": {"generator_version": GENERATOR_VERSION, "seed": seed,
                           "spots_in_tissue": n_in, "tissue_types": list(TISSUE_TYPES)}}


def write_demo_sample(root, sim: DemoSimulation, seed: int = SEED) -> dict[str, Path]:
    import pandas as pd
    from scipy import sparse

    obs = pd.DataFrame({"in_tissue": sim.in_tissue, "array_row": sim.array_row, "array_col": sim.array_col,
                        "pxl_col_in_fullres": sim.pixel_xy[:, 0], "pxl_row_in_fullres": sim.pixel_xy[:, 1]},
                       index=pd.Index(sim.barcodes))
    X = sparse.csr_matrix(sim.counts.astype(np.float32))
    return write_hest_sample(root, sim.sample_id, image=sim.image, mpp=MPP, obs=obs, X=X,
                             var_names=sim.var_names, metadata=_hest_metadata(sim, seed))


# ---------------------------------------------------------------- the dataset

def _sample_complete(root: Path, sample_id: str, seed: int) -> dict | None:
    """The sample's demo block if all its files are there from this generator version and seed."""
    paths = hest.sample_paths(root, sample_id)
    if not all(paths[k].is_file() for k in ("st", "wsi", "metadata")):
        return None
    try:
        block = hest.read_metadata(paths["metadata"]).get("nh2st_demo") or {}
    except NH2STError:
        return None
    if block.get("generator_version") != GENERATOR_VERSION or block.get("seed") != seed:
        return None
    return block


class _Quiet:
    """Progress stand-in when no bar is wanted."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, *args, **kwargs):
        return 0

    def advance(self, *args, **kwargs):
        pass


def generate_demo(root, seed: int = SEED, show_progress: bool = True) -> dict:
    """Write the demo dataset under `root` and return demo.json's content.

    Samples already complete (same generator version and seed) are kept; they are simulated again
    without rendering, since the signal figures need every slide's tissue and counts. demo.json is
    written last, so it exists only once every sample does.
    """
    import pandas as pd

    root = Path(root)
    started = time.perf_counter()
    todo = [sid for sid in DEMO_IDS if _sample_complete(root, sid, seed) is None]

    def simulate(sid):
        sim = simulate_sample(sid, seed, render=sid in todo)
        if sim.image is not None:
            write_demo_sample(root, sim, seed)
            sim.image = None
        return sim

    with make_progress(transient=True) if todo and show_progress else _Quiet() as progress:
        task = progress.add_task("generating the demo dataset (once)", total=len(DEMO_IDS))
        sims = []
        # two samples at a time: most of the rendering is numpy work that releases the GIL
        with ThreadPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
            for sim in pool.map(simulate, DEMO_IDS):
                sims.append(sim)
                progress.advance(task)
    metadata = {sid: hest.read_metadata(hest.sample_paths(root, sid)["metadata"]) for sid in DEMO_IDS}
    rows = [{column: meta.get(column) for column in HEST_CSV_COLUMNS} for meta in metadata.values()]
    atomic_write(root / "HEST_v1_1_0.csv", lambda tmp: pd.DataFrame(rows).to_csv(tmp, index=False))
    manifest = {
        "dataset": "demo", "generator": "nh2st.datasets.demo", "generator_version": GENERATOR_VERSION,
        "seed": seed, "mpp": MPP, "pitch_px": PITCH_PX, "spot_diameter_px": 2 * SPOT_RADIUS_PX,
        "patch_px": PATCH_PX, "surround_radius_px": SURROUND_RADIUS_PX, "tissue_types": list(TISSUE_TYPES),
        "genes": "DEMO list (GENE001..GENE250); var also holds 13 MT- genes",
        **signal_summary(sims),
        "generated_now": todo, "generation_seconds": round(time.perf_counter() - started, 2),
    }
    atomic_write(root / "demo.json", lambda tmp: tmp.write_text(json.dumps(manifest, indent=1)))
    return manifest


def ensure_demo(root, seed: int = SEED) -> dict:
    """demo.json's content, generating the dataset first if any part is absent or from another version."""
    root = Path(root)
    try:
        manifest = json.loads((root / "demo.json").read_text())
    except (OSError, ValueError):
        manifest = None
    if (manifest and manifest.get("generator_version") == GENERATOR_VERSION and manifest.get("seed") == seed
            and all(_sample_complete(root, sid, seed) for sid in DEMO_IDS)):
        return manifest
    return generate_demo(root, seed)


def find_samples(spec, root: Path) -> list[str]:
    """DEMO1..DEMO6, generated under `root` on first use."""
    ensure_demo(root)
    return hest.find_samples(spec, root)


def load_sample(spec, root: Path, sample_id: str, genes: list[str], allow_missing_genes: bool = False):
    """A demo sample read back by the HEST reader (generated first if absent)."""
    if sample_id in DEMO_IDS:
        ensure_demo(root)
    return hest.load_sample(spec, root, sample_id, genes, allow_missing_genes)
