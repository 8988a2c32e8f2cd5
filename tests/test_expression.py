import numpy as np
import pytest

from nh2st.errors import NH2STError
from nh2st.expression import normalize_log, process_expression, select_genes, smooth_grid, take_genes


def test_normalize_log_matches_hand_computed_example():
    counts = np.array([[1, 3, 0, 0], [0, 0, 0, 0], [5, 5, 5, 5]], dtype=np.float32)
    out = normalize_log(counts)
    # spot 0: total 4 -> 2500 and 7500 per 10,000; spot 1: all zero stays zero; spot 2: 2500 each
    expected = np.array([[np.log10(2501), np.log10(7501), 0, 0],
                         [0, 0, 0, 0],
                         [np.log10(2501)] * 4], dtype=np.float32)
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_smooth_grid_uses_existing_3x3_ids_only():
    values = np.array([[1.0], [2.0], [4.0], [8.0]])
    # (0,0) and (1,1) are diagonal neighbours; (2,0) touches (1,1); (5,5) is alone
    grid = np.array([[0, 0], [1, 1], [2, 0], [5, 5]])
    out = smooth_grid(values, grid)
    np.testing.assert_allclose(out[:, 0], [(1 + 2) / 2, (1 + 2 + 4) / 3, (2 + 4) / 2, 8.0])


def test_smooth_grid_on_visium_hex_grid_skips_same_row_neighbours():
    # Visium: columns of one row are 2 apart, so (x±2, y) are not in the 3x3 stencil
    grid = np.array([[0, 0], [2, 0], [1, 1]])
    out = smooth_grid(np.array([[0.0], [6.0], [3.0]]), grid)
    np.testing.assert_allclose(out[:, 0], [1.5, 4.5, 3.0])


def test_smooth_grid_refuses_duplicate_ids():
    with pytest.raises(NH2STError, match="duplicate grid"):
        smooth_grid(np.zeros((2, 1)), np.array([[1, 1], [1, 1]]))


def test_process_expression_is_normalise_then_smooth():
    rng = np.random.default_rng(0)
    counts = rng.poisson(3, size=(6, 5)).astype(np.float32)
    grid = np.array([[0, 0], [1, 1], [2, 2], [0, 2], [4, 4], [3, 3]])
    np.testing.assert_allclose(process_expression(counts, grid), smooth_grid(normalize_log(counts), grid))


def test_select_genes_exact_match_and_missing_gene_errors():
    var = ["A", "B", "HIST2H2AB", "MARC1"]
    index, missing = select_genes(var, ["MARC1", "A"], "S1", "s.h5ad")
    assert index.tolist() == [3, 0] and missing == []
    with pytest.raises(NH2STError, match=r"s\.h5ad.*S1.*MARCHF1"):
        select_genes(var, ["MARCHF1", "A"], "S1", "s.h5ad")
    with pytest.warns(UserWarning, match="MARCHF1"):
        index, missing = select_genes(var, ["MARCHF1", "A"], "S1", "s.h5ad", allow_missing_genes=True)
    assert missing == ["MARCHF1"]
    dense = take_genes(np.arange(8, dtype=np.float32).reshape(2, 4), index)
    np.testing.assert_array_equal(dense, [[0, 0], [0, 4]])


def test_take_genes_accepts_sparse():
    from scipy import sparse
    matrix = sparse.csr_matrix(np.array([[0, 2, 0], [3, 0, 1]], dtype=np.float32))
    np.testing.assert_array_equal(take_genes(matrix, np.array([2, 0])), [[0, 0], [1, 3]])
