"""Dataset registry: what `--dataset NAME` means (reader, gene list, default root, sample ids).

Each reader module (hest, visium, demo, legacy_st, stimage) exposes
    find_samples(spec, root) -> list[str]
    load_sample(spec, root, sample_id, genes, allow_missing_genes=False) -> Sample
and, where `--genes hvg:N|heg:N` can choose genes from its data,
    read_gene_table(spec, root, sample_id) -> (gene names (G,), raw counts (N, G) of the kept spots)
It keeps every quirk of its source format to itself.

The paper's datasets keep the paper's gene list, folds and native-resolution crops. `visium` (Space
Ranger output) and `hest` (any HEST-1k id) are the user's own data: they have no shipped gene list
(`--genes` chooses one) and crop the paper's field of view (nh2st.slide.at_paper_resolution).
"""

import dataclasses
import importlib
from dataclasses import dataclass, field
from pathlib import Path

from nh2st.errors import NH2STError
from nh2st.genes import load_gene_list


@dataclass(frozen=True)
class DatasetSpec:
    name: str                  # what the user types: "zen"
    reader: str                # module under nh2st.datasets
    gene_list: str | None      # shipped list under nh2st/genes/; None: --genes must say
    data_root: str             # default --data-root
    paper: bool = True         # the paper's dataset: its sample list, folds and native-resolution crops
    options: dict = field(default_factory=dict, compare=False)   # per-run reader options: image_dir, mpp

    def reader_module(self):
        return importlib.import_module(f"nh2st.datasets.{self.reader}")

    def with_options(self, image_dir=None, mpp: float | None = None) -> "DatasetSpec":
        """This dataset with `--image-dir` / `--mpp` (checked: only the own-data readers use them)."""
        given = {k: v for k, v in (("image_dir", image_dir), ("mpp", mpp)) if v is not None}
        if "image_dir" in given and self.reader != "visium":
            raise NH2STError(f"--image-dir is for --dataset visium; {self.name} finds its images in its own layout")
        if "mpp" in given and self.paper:
            raise NH2STError(f"--mpp is for your own slides (--dataset visium or hest); {self.name} is cropped at "
                             "native resolution as in the paper")
        if "mpp" in given and not given["mpp"] > 0:
            raise NH2STError(f"--mpp {given['mpp']}: must be a positive number of µm per pixel")
        if "image_dir" in given and not Path(given["image_dir"]).is_dir():
            raise NH2STError(f"--image-dir {given['image_dir']}: folder not found")
        return dataclasses.replace(self, options=given)

    def genes(self) -> list[str]:
        if self.gene_list is None:
            raise NH2STError(f"--dataset {self.name} has no shipped gene list; choose one with --genes hvg:250 "
                             "(the 250 most variable genes of your samples), --genes heg:250 (most expressed) "
                             "or --genes FILE (one symbol a line)")
        return load_gene_list(self.gene_list)

    def known_samples(self) -> list[str]:
        """The paper's sample ids for this dataset (no data needed)."""
        from nh2st.splits import known_samples
        return known_samples(self.name)

    def find_samples(self, root: str | Path) -> list[str]:
        # each reader says which folders it looked for (and the demo reader creates its root)
        return self.reader_module().find_samples(self, Path(root))

    def load_sample(self, root, sample_id: str, genes: list[str] | None = None,
                    allow_missing_genes: bool = False):
        return self.reader_module().load_sample(self, Path(root), sample_id,
                                                genes if genes is not None else self.genes(),
                                                allow_missing_genes)

    def read_gene_table(self, root, sample_id: str):
        reader = self.reader_module()
        if not hasattr(reader, "read_gene_table"):
            raise NH2STError(f"--genes hvg/heg: the {self.name} reader cannot list every gene of a sample; "
                             "give the gene list with --genes FILE")
        return reader.read_gene_table(self, Path(root), sample_id)

    def choose_genes(self, root, sample_ids: list[str], genes: str | None = None,
                     show_progress: bool = True) -> tuple[list[str], dict]:
        """(gene list, how it was chosen) for `--genes` (None: the shipped list).

        hvg:N / heg:N read every sample's whole expression table once (nh2st.expression.rank_genes).
        """
        from nh2st.expression import GeneStatistics, parse_gene_choice, rank_genes, read_gene_file

        if genes is None:
            listed = self.genes()
            return listed, {"spec": "paper", "how": f"the paper's {self.gene_list} list "
                                                    f"(nh2st/genes/{self.gene_list}.txt)"}
        choice = parse_gene_choice(genes)
        if choice.kind == "file":
            listed = read_gene_file(choice.path)
            return listed, {"spec": choice.spec, "how": f"{len(listed)} genes listed in {choice.path.resolve()}"}
        from nh2st.progress import make_progress

        stats = GeneStatistics()
        bar = make_progress(transient=True)
        bar.disable = not show_progress
        with bar:
            task = bar.add_task(f"choosing {choice.spec} genes", total=len(sample_ids))
            for sample_id in sample_ids:
                stats.add(sample_id, *self.read_gene_table(root, sample_id))
                bar.advance(task)
        return rank_genes(stats, choice)


DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in (
    DatasetSpec("demo", "demo", "DEMO", "data/demo"),
    DatasetSpec("zen", "hest", "ZEN", "data/HEST-1k"),
    DatasetSpec("int", "hest", "INT", "data/HEST-1k"),
    DatasetSpec("stnet", "legacy_st", "STNet", "data/stnet"),
    DatasetSpec("skin", "legacy_st", "Skin", "data/skin"),
    DatasetSpec("pcw", "stimage", "PCW", "data/STimage-1K4M"),
    DatasetSpec("mouse", "stimage", "Mouse", "data/STimage-1K4M"),
    DatasetSpec("hest", "hest", None, "data/HEST-1k", paper=False),
    DatasetSpec("visium", "visium", None, "data/visium", paper=False),
)}


def get_dataset(name: str) -> DatasetSpec:
    spec = DATASETS.get(name.lower())
    if spec is None:
        raise NH2STError(f"unknown --dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return spec
