"""Gene lists chosen from the data (--genes hvg:N | heg:N | FILE) and the list-does-not-fit error."""

import numpy as np
import pytest
from scipy import sparse

from nh2st.errors import NH2STError
from nh2st.expression import GeneStatistics, parse_gene_choice, rank_genes, read_gene_file, select_genes


def _log_normalised(counts):
    counts = np.asarray(counts, dtype=np.float64)
    return np.log10(counts / counts.sum(1, keepdims=True) * 1e4 + 1)


def test_hvg_and_heg_rank_pooled_statistics_over_common_genes():
    rng = np.random.default_rng(0)
    names_a = ["FLAT", "HIGH", "VAR", "MID", "ONLY_A", "ZERO", "BG1", "BG2"]
    names_b = ["BG2", "VAR", "HIGH", "FLAT", "MID", "ZERO", "BG1"]          # other order, no ONLY_A
    a = rng.poisson(5.0, (40, len(names_a))).astype(float)
    b = rng.poisson(5.0, (30, len(names_b))).astype(float)
    for counts, names in ((a, names_a), (b, names_b)):
        counts[:, names.index("HIGH")] = 400                                   # highly expressed, steady
        counts[:, names.index("VAR")] = rng.choice([0, 300], len(counts))       # highly variable
        counts[:, names.index("FLAT")] = 10
        counts[:, names.index("ZERO")] = 0                                      # never detected
    a[:, names_a.index("ONLY_A")] = rng.choice([0, 900], len(a))                # most variable, but not in b
    stats = GeneStatistics()
    stats.add("A", names_a, sparse.csr_matrix(a))
    stats.add("B", names_b, b)                                                  # dense works too
    assert stats.candidates() == ["BG1", "BG2", "FLAT", "HIGH", "MID", "VAR"]

    # the reference computation: pooled spots, each normalised over its own sample's genes
    common = stats.candidates()
    pooled = np.vstack([_log_normalised(a)[:, [names_a.index(g) for g in common]],
                        _log_normalised(b)[:, [names_b.index(g) for g in common]]])
    hvg, record = rank_genes(stats, parse_gene_choice("hvg:3"))
    assert hvg == [common[i] for i in np.argsort(-pooled.var(0), kind="stable")[:3]] and hvg[0] == "VAR"
    heg, _ = rank_genes(stats, parse_gene_choice("HEG:2"))
    assert heg == [common[i] for i in np.argsort(-pooled.mean(0), kind="stable")[:2]] and heg[0] == "HIGH"
    assert record["spec"] == "hvg:3" and record["samples"] == ["A", "B"] and record["n_spots"] == 70
    assert "3 most variable genes" in record["how"] and "6 genes present in every sample" in record["how"]
    with pytest.raises(NH2STError, match=r"--genes hvg:7: only 6 genes are present \(in all 2 samples and detected "
                                         r"in at least one spot\); ask for at most 6"):
        rank_genes(stats, parse_gene_choice("hvg:7"))


def test_ties_break_by_name_and_repeated_names_count_once():
    stats = GeneStatistics()
    counts = np.array([[1, 1, 5, 1], [1, 1, 5, 1]], dtype=float)
    stats.add("A", ["B2", "A1", "A1", "C3"], counts)          # A1 repeated: its first column counts
    genes, _ = rank_genes(stats, parse_gene_choice("heg:3"))
    assert genes == ["A1", "B2", "C3"]


def test_gene_choice_parsing_and_gene_files(tmp_path):
    assert parse_gene_choice("hvg:250").n == 250 and parse_gene_choice(" heg:10 ").kind == "heg"
    for bad in ("hvg:0", "hvg:x", "heg:-3"):
        with pytest.raises(NH2STError, match="N must be a positive whole number"):
            parse_gene_choice(bad)
    with pytest.raises(NH2STError, match=r"--genes nope.txt: no such file; give FILE"):
        parse_gene_choice("nope.txt")
    path = tmp_path / "genes.txt"
    path.write_text("# my panel\nEPCAM\n\nKRT8  # luminal\n VIM \n")
    assert parse_gene_choice(str(path)).kind == "file" and read_gene_file(path) == ["EPCAM", "KRT8", "VIM"]
    path.write_text("EPCAM\nVIM\nEPCAM\n")
    with pytest.raises(NH2STError, match=r"genes.txt: gene\(s\) listed twice: EPCAM"):
        read_gene_file(path)
    path.write_text("EPCAM,VIM KRT8\n")
    with pytest.raises(NH2STError, match=r"holds more than one name"):
        read_gene_file(path)
    path.write_text("\n# nothing\n")
    with pytest.raises(NH2STError, match="the gene list is empty"):
        read_gene_file(path)


def test_a_list_that_does_not_fit_is_not_offered_zero_filling():
    var_names = ["A", "B", "C", "D"]
    with pytest.raises(NH2STError, match=r"s.h5ad: sample S lacks 1 of the 3 genes \(X\); pass --allow-missing-genes"):
        select_genes(var_names, ["A", "B", "X"], "S", "s.h5ad")
    with pytest.warns(UserWarning, match="1 genes missing, filled with zeros: X"):
        index, missing = select_genes(var_names, ["A", "B", "X"], "S", "s.h5ad", allow_missing_genes=True)
    assert list(index) == [0, 1, -1] and missing == ["X"]
    for allow in (False, True):
        with pytest.raises(NH2STError) as err:
            select_genes(var_names, ["A", "X", "Y", "Z"], "S", "s.h5ad", allow_missing_genes=allow)
        message = str(err.value)
        assert "has only 1 of the 4 genes of the list" in message and "does not fit this data" in message
        assert "--genes hvg:N" in message and "allow-missing" not in message


def _heg_reference(frames, n):
    common = sorted(set.intersection(*(set(f.columns) for f in frames)))
    pooled = np.vstack([_log_normalised(f.to_numpy(np.float64))[:, [list(f.columns).index(g) for g in common]]
                        for f in frames])
    mean = pooled.mean(0)
    return [common[i] for i in sorted(range(len(common)), key=lambda i: (-mean[i], common[i]))[:n]]


def test_the_paper_readers_can_choose_genes_too(tmp_path):
    import pandas as pd

    from legacy_fixtures import mouse_slide, write_legacy_sample, write_stimage_slide
    from nh2st.datasets import get_dataset

    genes = [f"G{i}" for i in range(8)]
    stnet, mouse = get_dataset("stnet"), get_dataset("mouse")
    write_legacy_sample(tmp_path / "stnet", "stnet", "BC23209_C1", genes, seed=1)
    write_legacy_sample(tmp_path / "stnet", "stnet", "BC23270_D2", genes, seed=2)
    ids = ["BC23209_C1", "BC23270_D2"]
    chosen, record = stnet.choose_genes(tmp_path / "stnet", ids, "heg:5", show_progress=False)
    frames = [pd.read_parquet(tmp_path / "stnet" / "ST-cnts" / f"{s}_sub.parquet") for s in ids]
    assert chosen == _heg_reference(frames, 5) and record["samples"] == ids
    with pytest.warns(UserWarning):   # the fixture's spot without counts
        assert stnet.load_sample(tmp_path / "stnet", "BC23270_D2", chosen).meta["patient"] == "BC23270"

    for rep in (1, 2):
        write_stimage_slide(tmp_path / "st", "mouse", mouse_slide(rep), genes, seed=rep)
    slides = [mouse_slide(1), mouse_slide(2)]
    chosen, _ = mouse.choose_genes(tmp_path / "st", slides, "heg:4", show_progress=False)
    frames = [pd.read_csv(tmp_path / "st" / "ST" / "gene_exp" / f"{s}_count.csv", index_col=0) for s in slides]
    assert chosen == _heg_reference(frames, 4)
    assert stnet.choose_genes(tmp_path, ids)[1]["how"] == "the paper's STNet list (nh2st/genes/STNet.txt)"
