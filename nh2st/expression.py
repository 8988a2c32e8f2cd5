"""Gene lists and expression targets exactly as the paper computes them.

0. the gene list: the paper's shipped list of a named dataset, a file (one symbol a line), or
   chosen from the data: `hvg:N` / `heg:N`, the N most variable / most expressed genes over the
   samples being extracted (:func:`parse_gene_choice`, :func:`rank_genes`);
1. keep the list's genes, in list order (:func:`select_genes`);
2. per spot, divide by its sum over those genes and multiply by 10,000; ``log10(x + 1)``
   (:func:`normalize_log`, scprep 1.2.3 defaults);
3. replace each spot by the mean of itself and whichever of its 8 grid neighbours
   (x±1, y±1) exist (:func:`smooth_grid`). On a Visium hex grid only the 4 diagonal ids exist, as
   in the paper's code.
"""

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nh2st.errors import NH2STError

LIBRARY_SIZE = 10_000.0

# Every target lies in [0, log10(LIBRARY_SIZE + 1)]: log10(x + 1) of non-negative shares of
# LIBRARY_SIZE, and the grid smoothing averages such values. Predictions can be clipped to it.
TARGET_RANGE = (0.0, float(np.log10(LIBRARY_SIZE + 1.0)))

NORMALISATION = {
    "library_size": LIBRARY_SIZE,
    "library_over": "selected genes",
    "log": "log10(x+1)",
    "smoothing": "mean over existing grid ids x±1, y±1 (3x3 stencil incl. self)",
}


def select_genes(var_names, genes: list[str], sample_id: str, source: str,
                 allow_missing_genes: bool = False) -> tuple[np.ndarray, list[str]]:
    """Column index of each gene of `genes` in `var_names` (exact match), -1 where missing.

    A missing gene is an error naming it and the sample, unless `allow_missing_genes`, where
    the caller fills zeros and a warning names the genes. A sample lacking more than half of the
    list is always an error: the list was made for other data.
    """
    position = {}
    for i, name in enumerate(map(str, var_names)):
        position.setdefault(name, i)
    index = np.array([position.get(g, -1) for g in genes], dtype=np.int64)
    missing = [g for g, i in zip(genes, index) if i < 0]
    shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
    if 2 * len(missing) > len(genes):  # zero-filling most of the list would train on nothing
        raise NH2STError(f"{source}: sample {sample_id} has only {len(genes) - len(missing)} of the {len(genes)} "
                         f"genes of the list (lacks {shown}): the gene list does not fit this data (another "
                         "tissue, species or gene naming?); choose genes from the data with --genes hvg:N or "
                         "--genes heg:N, or give your own list with --genes FILE")
    if missing and not allow_missing_genes:
        raise NH2STError(f"{source}: sample {sample_id} lacks {len(missing)} of the {len(genes)} genes "
                         f"({shown}); pass --allow-missing-genes to fill them with zeros")
    if missing:
        warnings.warn(f"{source}: sample {sample_id}: {len(missing)} genes missing, filled with zeros: "
                      + ", ".join(missing[:10]), stacklevel=2)
    return index, missing


def take_genes(matrix, index: np.ndarray) -> np.ndarray:
    """Dense float32 (N, G) of the columns `index` of a dense or scipy-sparse matrix; -1 gives zeros."""
    present = index >= 0
    out = np.zeros((matrix.shape[0], len(index)), dtype=np.float32)
    if present.any():
        cols = matrix[:, index[present]]
        cols = cols.toarray() if hasattr(cols, "toarray") else np.asarray(cols)
        out[:, present] = cols
    return out


def normalize_log(counts: np.ndarray) -> np.ndarray:
    """(N, G) raw counts -> log10(counts / spot total * 10,000 + 1), float32; zero-sum spots stay 0."""
    counts = np.asarray(counts, dtype=np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    scale = np.divide(LIBRARY_SIZE, totals, out=np.zeros_like(totals), where=totals > 0)
    return np.log10(counts * scale + 1.0).astype(np.float32)


def smooth_grid(values: np.ndarray, grid_xy: np.ndarray) -> np.ndarray:
    """Mean of each spot and the spots at grid offsets (±1, ±1) that exist, float32.

    `grid_xy` (N, 2) integer grid ids (x, y); ids must be unique within a sample.
    """
    values = np.asarray(values, dtype=np.float64)
    grid_xy = np.asarray(grid_xy, dtype=np.int64)
    lookup = {(int(x), int(y)): i for i, (x, y) in enumerate(grid_xy)}
    if len(lookup) != len(grid_xy):
        raise NH2STError("duplicate grid coordinates in one sample; each spot needs its own (x, y)")
    total = np.zeros_like(values)
    count = np.zeros((len(values), 1))
    for dx in (-1, 0, 1):
        for dy in (-1, 0, 1):
            src = np.array([lookup.get((int(x) + dx, int(y) + dy), -1) for x, y in grid_xy])
            hit = src >= 0
            total[hit] += values[src[hit]]
            count[hit] += 1
    return (total / count).astype(np.float32)


def process_expression(counts: np.ndarray, grid_xy: np.ndarray) -> np.ndarray:
    """Raw counts -> the regression targets (normalised, log10, grid-smoothed)."""
    return smooth_grid(normalize_log(counts), grid_xy)


# ---- choosing the gene list --------------------------------------------------------------------------
RANKINGS = {
    "hvg": ("most variable", "variance"),
    "heg": ("most expressed", "mean"),
}
GENE_CHOICE_HELP = "FILE (one gene symbol a line), hvg:N (N most variable) or heg:N (N most expressed)"


@dataclass(frozen=True)
class GeneChoice:
    """What `--genes` asked for: kind "file" (path) or "hvg" / "heg" (n)."""

    kind: str
    n: int = 0
    path: Path | None = None

    @property
    def spec(self) -> str:
        return f"{self.kind}:{self.n}" if self.kind in RANKINGS else f"file:{self.path}"


def parse_gene_choice(text: str) -> GeneChoice:
    """`hvg:250`, `heg:250` or a path to a gene list file."""
    text = str(text).strip()
    kind, sep, value = text.partition(":")
    if sep and kind.lower() in RANKINGS:
        if not value.strip().isdigit() or int(value) < 1:
            raise NH2STError(f"--genes {text}: N must be a positive whole number of genes, e.g. {kind.lower()}:250")
        return GeneChoice(kind.lower(), int(value))
    path = Path(text)
    if not path.is_file():
        raise NH2STError(f"--genes {text}: no such file; give {GENE_CHOICE_HELP}")
    return GeneChoice("file", path=path)


def read_gene_file(path) -> list[str]:
    """One gene symbol a line; blank lines and `#` comments skipped; duplicates are an error."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise NH2STError(f"{path}: cannot read the gene list ({type(exc).__name__}); give a text file, one symbol a line") from None
    genes = [line.split("#", 1)[0].strip() for line in lines]
    genes = [g for g in genes if g]
    if not genes:
        raise NH2STError(f"{path}: the gene list is empty; write one gene symbol a line")
    spaced = [g for g in genes if len(g.split()) > 1]
    if spaced:
        raise NH2STError(f"{path}: line {spaced[0]!r} holds more than one name; write one gene symbol a line")
    seen, repeated = set(), []
    for g in genes:
        if g in seen:
            repeated.append(g)
        seen.add(g)
    if repeated:
        raise NH2STError(f"{path}: gene(s) listed twice: {', '.join(dict.fromkeys(repeated))}; list each once")
    return genes


class GeneStatistics:
    """Pooled per-gene mean and variance of log10(10,000 * x / spot total + 1) over many samples.

    Spot totals are over every gene of the sample (the whole transcriptome, not a list).
    Only genes present in every added sample are candidates; a name repeated in one sample counts
    its first column, as :func:`select_genes` does.
    """

    def __init__(self):
        self._sum: dict[str, float] = {}
        self._sumsq: dict[str, float] = {}
        self._detected: dict[str, bool] = {}
        self._common: set[str] | None = None
        self.n_spots = 0
        self.samples: list[str] = []

    def add(self, sample_id: str, var_names, matrix) -> None:
        """One sample: gene names (G,) and raw counts (N, G), dense or scipy sparse."""
        from scipy import sparse

        names = [str(v) for v in var_names]
        first = {}
        for i, name in enumerate(names):
            first.setdefault(name, i)
        cols = np.fromiter(first.values(), dtype=np.int64, count=len(first))
        x = sparse.csr_matrix(matrix, dtype=np.float64)[:, cols]
        totals = np.asarray(x.sum(axis=1)).ravel()
        scale = np.divide(LIBRARY_SIZE, totals, out=np.zeros_like(totals), where=totals > 0)
        x = sparse.csr_matrix(sparse.diags(scale) @ x)
        x.data = np.log10(x.data + 1.0)
        sums = np.asarray(x.sum(axis=0)).ravel()
        sumsq = np.asarray(x.multiply(x).sum(axis=0)).ravel()
        for name, s1, s2 in zip(first, sums, sumsq):
            self._sum[name] = self._sum.get(name, 0.0) + float(s1)
            self._sumsq[name] = self._sumsq.get(name, 0.0) + float(s2)
            self._detected[name] = self._detected.get(name, False) or s1 > 0
        self._common = set(first) if self._common is None else self._common & set(first)
        self.n_spots += x.shape[0]
        self.samples.append(sample_id)

    def candidates(self) -> list[str]:
        """Genes in every sample and detected in at least one spot, sorted by name."""
        return sorted(g for g in (self._common or ()) if self._detected[g])

    def score(self, kind: str, genes: list[str]) -> np.ndarray:
        mean = np.array([self._sum[g] for g in genes]) / max(self.n_spots, 1)
        if kind == "heg":
            return mean
        return np.maximum(np.array([self._sumsq[g] for g in genes]) / max(self.n_spots, 1) - mean ** 2, 0.0)


def rank_genes(stats: GeneStatistics, choice: GeneChoice) -> tuple[list[str], dict]:
    """The `choice.n` top genes by the choice's statistic (ties by name), and a record of how they were chosen."""
    candidates = stats.candidates()
    if choice.n > len(candidates):
        raise NH2STError(f"--genes {choice.spec}: only {len(candidates)} genes are present (in all "
                         f"{len(stats.samples)} samples and detected in at least one spot); ask for at most "
                         f"{len(candidates)}")
    score = stats.score(choice.kind, candidates)
    order = sorted(range(len(candidates)), key=lambda i: (-score[i], candidates[i]))[:choice.n]
    genes = [candidates[i] for i in order]
    words, statistic = RANKINGS[choice.kind]
    how = (f"the {choice.n} {words} genes ({statistic} of log10(10,000 x / spot total + 1) over "
           f"{stats.n_spots:,} spots of {len(stats.samples)} samples) among {len(candidates):,} genes "
           "present in every sample")
    return genes, {"spec": choice.spec, "how": how, "samples": list(stats.samples), "n_spots": stats.n_spots,
                   "n_candidates": len(candidates)}
