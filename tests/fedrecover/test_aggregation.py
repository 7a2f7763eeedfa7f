"""Server-side aggregation of LoRA adapters: FedAvg, HetLoRA (zero-pad / truncate), FlexLoRA
(average of B·A, SVD back to each client's rank), per-layer holders, and what each client gets."""

from __future__ import annotations

import numpy as np
import pytest

from llmprune.errors import LLMPruneError
from llmprune.fedrecover import ClientUpdate, aggregate, client_view, fedavg, flexlora, hetlora, lowrank_svd, pad_rank

OUT, IN = 12, 10
MODULES = ("0.self_attn.q_proj", "1.mlp.down_proj")


def adapter(rank: int, seed: int, modules=MODULES, out=OUT, inp=IN) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {}
    for m in modules:
        arrays[f"{m}.A"] = rng.standard_normal((rank, inp)).astype(np.float32)
        arrays[f"{m}.B"] = rng.standard_normal((out, rank)).astype(np.float32)
    return arrays


def product(arrays: dict, module: str) -> np.ndarray:
    return arrays[f"{module}.B"].astype(np.float64) @ arrays[f"{module}.A"].astype(np.float64)


def best_rank(dense: np.ndarray, rank: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(dense)
    return (u[:, :rank] * s[:rank]) @ vt[:rank]


# ---------------------------------------------------------------- fedavg


def test_fedavg_weights_by_examples():
    a, b = adapter(4, 1), adapter(4, 2)
    out = fedavg([ClientUpdate(a, 30), ClientUpdate(b, 10)], previous={})
    for key in a:
        np.testing.assert_allclose(out[key], 0.75 * a[key] + 0.25 * b[key], rtol=1e-6, atol=1e-6)


def test_fedavg_of_identical_clients_is_the_client():
    a = adapter(4, 1)
    out = fedavg([ClientUpdate(a, 3), ClientUpdate({k: v.copy() for k, v in a.items()}, 7)], previous={})
    for key in a:
        np.testing.assert_allclose(out[key], a[key], rtol=1e-6, atol=1e-7)


def test_fedavg_refuses_mixed_ranks():
    with pytest.raises(LLMPruneError, match=r"different LoRA ranks \[2, 4\].*hetlora or flexlora"):
        fedavg([ClientUpdate(adapter(4, 1), 1), ClientUpdate(adapter(2, 2), 1)], previous={})


def test_non_positive_example_count_is_refused():
    with pytest.raises(LLMPruneError, match="non-positive example count"):
        fedavg([ClientUpdate(adapter(4, 1), 0), ClientUpdate(adapter(4, 2), 1)], previous={})


@pytest.mark.parametrize("method", ["fedavg", "hetlora", "flexlora"])
def test_per_layer_holders(method):
    """A module is averaged over the clients that hold it; one nobody sent keeps its value."""
    top, bottom, untouched = "2.self_attn.v_proj", "1.self_attn.v_proj", "0.self_attn.v_proj"
    previous = adapter(4, 0, modules=(top, bottom, untouched))
    deep = adapter(4, 1, modules=(top, bottom))          # holds the top two layers
    shallow = adapter(4, 2, modules=(top,))              # holds the top layer only
    out = aggregate(method, [ClientUpdate(deep, 1), ClientUpdate(shallow, 3)], previous, rank=4)
    # nobody sent layer 0: unchanged
    for part in ("A", "B"):
        np.testing.assert_array_equal(out[f"{untouched}.{part}"], previous[f"{untouched}.{part}"])
    # only `deep` holds layer 1: its product is deep's alone (weight 1, not 1/4)
    np.testing.assert_allclose(product(out, bottom), product(deep, bottom), rtol=1e-5, atol=1e-5)
    # both hold layer 2: weighted 1:3
    if method == "flexlora":
        expected = 0.25 * product(deep, top) + 0.75 * product(shallow, top)
        np.testing.assert_allclose(product(out, top), expected, rtol=1e-5, atol=1e-5)
    else:
        for part in ("A", "B"):
            np.testing.assert_allclose(out[f"{top}.{part}"], 0.25 * deep[f"{top}.{part}"] + 0.75 * shallow[f"{top}.{part}"],
                                       rtol=1e-6, atol=1e-6)


def test_no_updates_keeps_the_previous_adapter():
    previous = adapter(4, 0)
    out = aggregate("fedavg", [], previous, rank=4)
    assert out.keys() == previous.keys()
    for key in previous:
        np.testing.assert_array_equal(out[key], previous[key])


def test_unknown_method_is_refused():
    with pytest.raises(LLMPruneError, match="unknown aggregation 'median'"):
        aggregate("median", [ClientUpdate(adapter(2, 1), 1)], {}, rank=2)


# ---------------------------------------------------------------- hetlora


def test_pad_rank_keeps_the_product_and_pads_with_zeros():
    a = adapter(3, 5)
    pa, pb = pad_rank(a["0.self_attn.q_proj.A"], a["0.self_attn.q_proj.B"], 8)
    assert pa.shape == (8, IN) and pb.shape == (OUT, 8)
    assert not pa[3:].any() and not pb[:, 3:].any()
    np.testing.assert_array_equal(pa[:3], a["0.self_attn.q_proj.A"])
    np.testing.assert_allclose(pb @ pa, a["0.self_attn.q_proj.B"] @ a["0.self_attn.q_proj.A"], rtol=1e-6, atol=1e-6)


def test_pad_rank_refuses_a_rank_above_the_global_rank():
    with pytest.raises(LLMPruneError, match="rank 8, above the global rank 4"):
        pad_rank(np.zeros((8, IN), np.float32), np.zeros((OUT, 8), np.float32), 4)


def test_hetlora_zero_pads_averages_and_truncates_back():
    big, small = adapter(4, 1), adapter(2, 2)
    out = hetlora([ClientUpdate(big, 1), ClientUpdate(small, 1)], previous={}, rank=4)
    m = MODULES[0]
    a, b = out[f"{m}.A"], out[f"{m}.B"]
    assert a.shape == (4, IN) and b.shape == (OUT, 4)
    np.testing.assert_allclose(a[:2], 0.5 * (big[f"{m}.A"][:2] + small[f"{m}.A"]), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(a[2:], 0.5 * big[f"{m}.A"][2:], rtol=1e-6, atol=1e-6)   # small's zero rows
    np.testing.assert_allclose(b[:, 2:], 0.5 * big[f"{m}.B"][:, 2:], rtol=1e-6, atol=1e-6)
    # each client gets its own rank back: the first r rows of A / columns of B
    view = client_view("hetlora", out, [m], 2, init=adapter(4, 9))
    np.testing.assert_array_equal(view[f"{m}.A"], a[:2])
    np.testing.assert_array_equal(view[f"{m}.B"], b[:, :2])


def test_hetlora_of_one_padded_client_truncates_back_exactly():
    small = adapter(2, 3)
    out = hetlora([ClientUpdate(small, 5)], previous={}, rank=8)
    view = client_view("hetlora", out, list(MODULES), 2, init=adapter(8, 9))
    for key in small:
        np.testing.assert_array_equal(view[key], small[key])
    for m in MODULES:
        np.testing.assert_allclose(product(out, m), product(small, m), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- flexlora


def test_flexlora_keeps_the_weighted_average_of_products_exactly():
    ups = [ClientUpdate(adapter(4, 1), 2), ClientUpdate(adapter(2, 2), 5), ClientUpdate(adapter(1, 3), 3)]
    out = flexlora(ups, previous={})
    for m in MODULES:
        assert out[f"{m}.A"].shape == (7, IN) and out[f"{m}.B"].shape == (OUT, 7)   # ranks concatenated
        expected = sum(w * product(u.arrays, m) for w, u in zip((0.2, 0.5, 0.3), ups))
        np.testing.assert_allclose(product(out, m), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["equal-ranks", "one-client", "identical-clients"])
def test_svd_resplit_is_exact_when_the_average_has_rank_at_most_r(case):
    r = 3
    a = adapter(r, 1)
    if case == "equal-ranks":
        # two rank-r clients whose A span the same row space: their average B·A has rank <= r
        other = adapter(r, 7)
        b = {k: (a[k] if k.endswith(".A") else other[k]) for k in a}
        ups = [ClientUpdate(a, 1), ClientUpdate(b, 2)]
    elif case == "one-client":
        ups = [ClientUpdate(a, 4)]
    else:
        ups = [ClientUpdate(a, 1), ClientUpdate({k: v.copy() for k, v in a.items()}, 1)]
    out = flexlora(ups, previous={})
    view = client_view("flexlora", out, list(MODULES), r, init=adapter(r, 9))
    for m in MODULES:
        assert view[f"{m}.A"].shape == (r, IN) and view[f"{m}.B"].shape == (OUT, r)
        np.testing.assert_allclose(product(view, m), product(out, m), rtol=1e-5, atol=1e-5)
    if case != "equal-ranks":
        for m in MODULES:
            np.testing.assert_allclose(product(view, m), product(a, m), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rank", [1, 2, 4])
def test_svd_resplit_is_the_best_rank_r_approximation(rank):
    """Eckart–Young: the client's B·A is the truncated SVD of the dense average."""
    ups = [ClientUpdate(adapter(4, 1), 1), ClientUpdate(adapter(4, 2), 1), ClientUpdate(adapter(2, 3), 2)]
    out = flexlora(ups, previous={})
    view = client_view("flexlora", out, list(MODULES), rank, init=adapter(8, 9))
    for m in MODULES:
        dense = product(out, m)
        assert np.linalg.matrix_rank(dense) > rank
        best = best_rank(dense, rank)
        np.testing.assert_allclose(product(view, m), best, rtol=1e-4, atol=1e-4)
        error = np.linalg.norm(product(view, m) - dense)
        s = np.linalg.svd(dense, compute_uv=False)
        assert error == pytest.approx(np.sqrt((s[rank:] ** 2).sum()), rel=1e-4)


def test_lowrank_svd_matches_numpy_without_the_dense_product():
    rng = np.random.default_rng(0)
    b, a = rng.standard_normal((OUT, 6)), rng.standard_normal((6, IN))
    b_r, a_r, s = lowrank_svd(b, a, 6)
    np.testing.assert_allclose(s, np.linalg.svd(b @ a, compute_uv=False)[:6], rtol=1e-6)
    np.testing.assert_allclose(b_r.astype(np.float64) @ a_r, b @ a, rtol=1e-4, atol=1e-4)
    # the factors are U S and V^T: orthonormal rows of A
    np.testing.assert_allclose(a_r @ a_r.T, np.eye(6), atol=1e-5)


# ---------------------------------------------------------------- client_view


@pytest.mark.parametrize("method", ["fedavg", "hetlora", "flexlora"])
@pytest.mark.parametrize("rank", [1, 2, 4])
def test_client_view_shapes(method, rank):
    global_rank = 4
    init = adapter(global_rank, 9, modules=MODULES)
    if method == "flexlora":
        glob = flexlora([ClientUpdate(adapter(4, 1), 1), ClientUpdate(adapter(2, 2), 1)], previous=init)
    else:
        glob = adapter(global_rank, 1)
    view = client_view(method, glob, [MODULES[1]], rank, init)
    assert set(view) == {f"{MODULES[1]}.A", f"{MODULES[1]}.B"}      # only the modules it holds
    assert view[f"{MODULES[1]}.A"].shape == (rank, IN)
    assert view[f"{MODULES[1]}.B"].shape == (OUT, rank)
    assert all(v.dtype == np.float32 and v.flags["C_CONTIGUOUS"] for v in view.values())


def test_flexlora_client_above_the_available_rank_gets_seeded_components():
    """The average of one rank-2 client has rank 2; a rank-5 client gets its best rank-2 part
    plus the seeded init rows of A (and zero columns of B), so its B·A is the average."""
    init = adapter(5, 9)
    glob = flexlora([ClientUpdate(adapter(2, 1), 3)], previous=init)
    view = client_view("flexlora", glob, list(MODULES), 5, init)
    for m in MODULES:
        a, b = view[f"{m}.A"], view[f"{m}.B"]
        assert a.shape == (5, IN) and b.shape == (OUT, 5)
        np.testing.assert_array_equal(a[2:], init[f"{m}.A"][2:])
        assert not b[:, 2:].any()
        assert np.abs(a).sum(axis=1).min() > 0                 # every component it trains has a non-zero A
        np.testing.assert_allclose(product(view, m), product(glob, m), rtol=1e-5, atol=1e-5)


def test_flexlora_first_round_view_is_the_seeded_init():
    """Before any update B is zero: the client starts from the seeded rank-r init (B = 0)."""
    init = adapter(4, 9)
    init = {k: (np.zeros_like(v) if k.endswith(".B") else v) for k, v in init.items()}
    view = client_view("flexlora", init, list(MODULES), 2, init)
    for m in MODULES:
        np.testing.assert_array_equal(view[f"{m}.A"], init[f"{m}.A"][:2])
        assert view[f"{m}.B"].shape == (OUT, 2) and not view[f"{m}.B"].any()
