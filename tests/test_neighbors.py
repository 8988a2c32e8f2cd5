import numpy as np

from nh2st.neighbors import knn_index


def test_knn_self_first_then_by_distance():
    xy = np.array([[0, 0], [10, 0], [3, 0], [0, 5], [100, 100]], dtype=float)
    idx = knn_index(xy, k=3)
    assert idx.dtype == np.int32 and idx.shape == (5, 3)
    assert idx[:, 0].tolist() == [0, 1, 2, 3, 4]
    assert idx[0].tolist() == [0, 2, 3]
    assert idx[1].tolist() == [1, 2, 0]


def test_knn_matches_brute_force_on_random_points_across_blocks():
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 1000, size=(300, 2))
    idx = knn_index(xy, k=9, block=64)
    d = np.linalg.norm(xy[:, None] - xy[None], axis=-1)
    for i in range(len(xy)):
        expected = np.argsort(d[i], kind="stable")[:9]
        assert idx[i, 0] == i
        np.testing.assert_allclose(np.sort(d[i, idx[i]]), d[i, expected])


def test_knn_pads_with_self_when_fewer_spots_than_k():
    idx = knn_index(np.array([[0.0, 0.0], [1.0, 0.0]]), k=4)
    assert idx.tolist() == [[0, 1, 0, 0], [1, 0, 1, 1]]


def test_knn_self_first_even_for_coincident_spots():
    idx = knn_index(np.array([[5.0, 5.0], [5.0, 5.0], [9.0, 9.0]]), k=2)
    assert idx[:, 0].tolist() == [0, 1, 2]


def test_knn_breaks_ties_by_index_like_a_stable_sort():
    rows, cols = np.divmod(np.arange(400), 20)  # a Visium hex grid: every spot has six equidistant neighbours
    xy = np.stack([100.0 * (2 * cols + rows % 2), 173.2 * rows], 1)
    idx = knn_index(xy, k=9, block=96)
    d2 = ((xy[:, None] - xy[None]) ** 2).sum(-1)
    d2[np.arange(len(xy)), np.arange(len(xy))] = -1.0
    np.testing.assert_array_equal(idx, np.argsort(d2, axis=1, kind="stable")[:, :9])


def test_knn_exact_when_ties_outnumber_the_candidates():
    # the 32 lattice points with x^2 + y^2 = 1105 are all equally far from the first spot
    ring = [(x, y) for x in range(-34, 35) for y in range(-34, 35) if x * x + y * y == 1105]
    assert len(ring) == 32
    xy = np.array([(0, 0)] + ring[::-1], dtype=float)
    d2 = ((xy[:, None] - xy[None]) ** 2).sum(-1)
    d2[np.arange(len(xy)), np.arange(len(xy))] = -1.0
    np.testing.assert_array_equal(knn_index(xy, k=9), np.argsort(d2, axis=1, kind="stable")[:, :9])
