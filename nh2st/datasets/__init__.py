"""Dataset registry: what `--dataset NAME` means (reader, gene list, default root, sample ids).

Each reader module (hest, demo, legacy_st, stimage) exposes
    find_samples(spec, root) -> list[str]
    load_sample(spec, root, sample_id, genes, allow_missing_genes=False) -> Sample
and keeps every quirk of its source format to itself.
"""

import importlib
from dataclasses import dataclass
from pathlib import Path

from nh2st.errors import NH2STError
from nh2st.genes import load_gene_list


@dataclass(frozen=True)
class DatasetSpec:
    name: str          # what the user types: "zen"
    reader: str        # module under nh2st.datasets
    gene_list: str     # shipped list under nh2st/genes/
    data_root: str     # default --data-root

    def reader_module(self):
        return importlib.import_module(f"nh2st.datasets.{self.reader}")

    def genes(self) -> list[str]:
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


DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in (
    DatasetSpec("demo", "demo", "DEMO", "data/demo"),
    DatasetSpec("zen", "hest", "ZEN", "data/HEST-1k"),
    DatasetSpec("int", "hest", "INT", "data/HEST-1k"),
    DatasetSpec("stnet", "legacy_st", "STNet", "data/stnet"),
    DatasetSpec("skin", "legacy_st", "Skin", "data/skin"),
    DatasetSpec("pcw", "stimage", "PCW", "data/STimage-1K4M"),
    DatasetSpec("mouse", "stimage", "Mouse", "data/STimage-1K4M"),
)}


def get_dataset(name: str) -> DatasetSpec:
    spec = DATASETS.get(name.lower())
    if spec is None:
        raise NH2STError(f"unknown --dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return spec
