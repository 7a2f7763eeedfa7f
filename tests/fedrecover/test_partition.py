"""Client data: flwr-datasets partitions (iid, Dirichlet over domains, one domain per client)
cover every training window once, are reproducible, and never contain the held-out windows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import llmprune
from llmprune.errors import LLMPruneError
from llmprune.fedrecover import ClientData, build_client_data, partition_indices

from .conftest import varied_text

KINDS = ("iid", "dirichlet:0.5", "domain")


def domains_of(sizes) -> np.ndarray:
    return np.concatenate([np.full(n, d, dtype=np.int64) for d, n in enumerate(sizes)])


def assert_exact_cover(parts, n):
    flat = np.concatenate(parts)
    assert len(flat) == n and len(np.unique(flat)) == n, "windows lost or repeated"
    assert sorted(flat.tolist()) == list(range(n))
    assert all(len(p) > 0 for p in parts)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("clients", [2, 4])
def test_partitions_cover_every_window_once_and_are_reproducible(kind, clients):
    domains = domains_of([60, 40])
    parts = partition_indices(domains, clients, kind, seed=3)
    assert len(parts) == clients
    assert_exact_cover(parts, len(domains))
    again = partition_indices(domains, clients, kind, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


@pytest.mark.parametrize("kind", ["iid", "dirichlet:0.5"])
def test_another_seed_gives_another_partition(kind):
    domains = domains_of([60, 40])
    a, b = partition_indices(domains, 3, kind, seed=0), partition_indices(domains, 3, kind, seed=1)
    assert not all(np.array_equal(x, y) for x, y in zip(a, b))


def test_iid_is_balanced_and_mixed():
    domains = domains_of([50, 50])
    parts = partition_indices(domains, 4, "iid", seed=0)
    assert sorted(len(p) for p in parts) == [25, 25, 25, 25]
    assert all(0 < (domains[p] == 0).mean() < 1 for p in parts)


def test_domain_puts_one_domain_per_client():
    domains = domains_of([30, 20, 10])
    parts = partition_indices(domains, 5, "domain", seed=0)
    assert [set(domains[p].tolist()) for p in parts] == [{0}, {1}, {2}, {0}, {1}]
    assert sorted(len(p) for p in (parts[0], parts[3])) == [15, 15]   # a domain dealt evenly among its clients
    with pytest.raises(LLMPruneError, match=r"at least one client per domain \(3 domains, 2 clients\)"):
        partition_indices(domains, 2, "domain", seed=0)


def _max_share(domains, parts) -> float:
    return float(np.mean([np.bincount(domains[p], minlength=2).max() / len(p) for p in parts]))


@pytest.mark.filterwarnings("ignore:The specified min_partition_size")
def test_dirichlet_at_small_alpha_is_skewed():
    domains = domains_of([100, 100])
    skewed = np.mean([_max_share(domains, partition_indices(domains, 4, "dirichlet:0.05", seed=s)) for s in range(3)])
    mixed = np.mean([_max_share(domains, partition_indices(domains, 4, "dirichlet:100", seed=s)) for s in range(3)])
    iid = _max_share(domains, partition_indices(domains, 4, "iid", seed=0))
    assert skewed > 0.85, skewed
    assert mixed < 0.7 and iid < 0.7, (mixed, iid)


def test_unknown_partition_is_refused():
    with pytest.raises(LLMPruneError, match="unknown partition 'shards'"):
        partition_indices(domains_of([4]), 2, "shards", seed=0)


# ---------------------------------------------------------------- build_client_data


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sources")
    a, b = folder / "a.txt", folder / "b.txt"
    a.write_text(varied_text(1500, seed=10))
    b.write_text(varied_text(800, seed=11))
    return a, b


def _rows(t: torch.Tensor) -> set:
    return {tuple(r.tolist()) for r in t}


@pytest.mark.parametrize("kind", KINDS)
def test_held_out_windows_are_in_no_partition(tok, two_sources, kind, tmp_path):
    a, b = two_sources
    data = build_client_data(tok, [str(a), str(b)], 2, kind, 32, seed=0, eval_windows=4)
    per_source = [llmprune.token_windows(tok, llmprune.load_texts(str(s)), 32) for s in (a, b)]
    every = torch.cat(per_source)
    assert len(_rows(every)) == len(every), "windows should all differ"
    assert data.eval_windows.shape == (4, 33)
    trained = torch.cat([data.client_windows(i) for i in range(2)])
    assert not (_rows(data.eval_windows) & _rows(trained))
    assert _rows(trained) | _rows(data.eval_windows) == _rows(every)       # nothing else dropped
    assert_exact_cover(data.partitions, len(data.windows))
    # the eval windows come from both domains (the last windows of each in turn)
    assert [len(_rows(data.eval_windows) & _rows(w)) for w in per_source] == [2, 2]
    assert _rows(data.eval_windows) == _rows(per_source[0][-2:]) | _rows(per_source[1][-2:])
    assert [s["client"] for s in data.stats] == [0, 1]
    assert sum(s["windows"] for s in data.stats) == len(data.windows)
    if kind == "domain":
        assert [list(s["domains"]) for s in data.stats] == [[str(a)], [str(b)]]
    # the file the simulated clients read back
    data.save(tmp_path / "p.npz")
    back = ClientData.load(tmp_path / "p.npz")
    assert torch.equal(back.windows, data.windows) and torch.equal(back.eval_windows, data.eval_windows)
    assert all(np.array_equal(x, y) for x, y in zip(back.partitions, data.partitions))
    assert back.sources == [str(a), str(b)]


def test_separate_eval_data_keeps_every_window_for_training(tok, two_sources):
    a, b = two_sources
    data = build_client_data(tok, [str(a)], 3, "iid", 32, seed=0, eval_spec=str(b), eval_windows=3)
    n = llmprune.token_windows(tok, llmprune.load_texts(str(a)), 32).shape[0]
    assert len(data.windows) == n and data.eval_windows.shape[0] == 3
    assert_exact_cover(data.partitions, n)


def test_max_windows_caps_each_source(tok, two_sources):
    a, b = two_sources
    data = build_client_data(tok, [str(a), str(b)], 2, "iid", 32, seed=0, max_windows=6, eval_windows=2)
    assert len(data.windows) == 12 - 2


def test_too_little_data_names_the_counts(tok, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text(varied_text(60))
    n = llmprune.token_windows(tok, [short.read_text()], 32).shape[0]
    with pytest.raises(LLMPruneError) as err:
        build_client_data(tok, [str(short)], n + 5, "iid", 32, seed=0, eval_windows=2)
    line = str(err.value)
    assert f"data too small for {n + 5} clients: {n - 2} training windows of 32 tokens" in line
    assert "\n" not in line and "fewer --clients" in line
