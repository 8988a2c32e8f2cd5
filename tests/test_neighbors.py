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
