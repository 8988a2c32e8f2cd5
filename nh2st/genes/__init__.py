"""The paper's gene lists (250 genes per dataset), shipped as package data."""

from importlib import resources

from nh2st.errors import NH2STError


def available_gene_lists() -> list[str]:
    return sorted(p.name.removesuffix(".txt") for p in resources.files("nh2st.genes").iterdir()
                  if p.name.endswith(".txt"))


def load_gene_list(name: str) -> list[str]:
    """Gene symbols of list `name` (e.g. "ZEN"), in file order (the model's output order)."""
    path = resources.files("nh2st.genes") / f"{name}.txt"
    if not path.is_file():
        raise NH2STError(f"unknown gene list {name!r}; shipped lists: {', '.join(available_gene_lists())}")
    genes = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if len(set(genes)) != len(genes):
        raise NH2STError(f"gene list {name!r} has duplicate genes")
    return genes
