"""Client data: token windows from one or more sources, split across clients with
flwr-datasets partitioners (IID, Dirichlet over domains, or one domain per client).

A window is BOS + seq_len tokens, the evaluation protocol's unit. Each data source is a domain
(`--data wiki.txt docs/` gives two); partitioning works on window indices, so every client's
share is reproducible from the seed alone."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from llmprune.data import domain_windows, load_texts, token_windows
from llmprune.errors import LLMPruneError

log = logging.getLogger(__name__)
KINDS = ("iid", "dirichlet", "domain")


@dataclass(frozen=True)
class Partition:
    """How the windows are split across clients: `iid`, `domain` (client i draws from domain
    i mod D only) or `dirichlet:ALPHA` (domain shares drawn from a Dirichlet of concentration
    ALPHA). Written as text on the command line and in the run config; parsed once by `parse`."""

    kind: str = "iid"
    alpha: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS or (self.kind == "dirichlet") != (self.alpha is not None) or \
                (self.alpha is not None and not self.alpha > 0):
            raise argparse.ArgumentTypeError(f"unknown partition '{self}' (use iid, domain or dirichlet:ALPHA with "
                                             "ALPHA > 0, e.g. dirichlet:0.5)")

    def __str__(self) -> str:
        if self.alpha is None:
            return self.kind
        return f"{self.kind}:{int(self.alpha) if float(self.alpha).is_integer() else self.alpha!r}"

    @classmethod
    def parse(cls, text: str | Partition) -> Partition:
        """'iid' | 'domain' | 'dirichlet:ALPHA' (or a Partition, returned as it is)."""
        if isinstance(text, Partition):
            return text
        kind, colon, arg = str(text).strip().partition(":")
        try:
            alpha = float(arg) if colon else None
        except ValueError:
            alpha = -1.0
        if colon and kind != "dirichlet":
            alpha = -1.0
        try:
            return cls(kind, alpha)
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"unknown partition '{text}' (use iid, domain or dirichlet:ALPHA with "
                                             "ALPHA > 0, e.g. dirichlet:0.5)") from None


@dataclass
class ClientData:
    """All windows, their domain, each client's window indices, and held-out evaluation windows."""

    windows: torch.Tensor                    # [N, seq_len + 1]
    domains: np.ndarray                      # [N] int, index into `sources`
    sources: list[str]
    partitions: list[np.ndarray]             # client -> window indices
    eval_windows: torch.Tensor | None = None
    stats: list[dict] = field(default_factory=list)

    def client_windows(self, client: int) -> torch.Tensor:
        return self.windows[torch.from_numpy(self.partitions[client])]

    def save(self, path: str | Path) -> None:
        arrays = {"windows": self.windows.numpy(), "domains": self.domains, "sources": np.array(self.sources)}
        for i, part in enumerate(self.partitions):
            arrays[f"client_{i}"] = part
        if self.eval_windows is not None:
            arrays["eval_windows"] = self.eval_windows.numpy()
        np.savez(path, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> ClientData:
        with np.load(path) as z:
            n = sum(1 for k in z.files if k.startswith("client_"))
            return cls(torch.from_numpy(z["windows"]), z["domains"], [str(s) for s in z["sources"]],
                       [z[f"client_{i}"] for i in range(n)],
                       torch.from_numpy(z["eval_windows"]) if "eval_windows" in z.files else None)


def source_windows(tokenizer, specs: list[str], seq_len: int, max_windows: int | None) -> tuple[torch.Tensor, np.ndarray]:
    """Windows of every source, concatenated, with the source index of each window."""
    parts, domains = [], []
    for i, spec in enumerate(specs):
        windows = token_windows(tokenizer, load_texts(spec), seq_len, max_windows)
        parts.append(windows)
        domains.append(np.full(windows.shape[0], i, dtype=np.int64))
        log.info("data %s: %d windows of %d tokens", spec, windows.shape[0], seq_len)
    return torch.cat(parts), np.concatenate(domains)


def split_eval(domains: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices kept for training, and `count` held out for evaluation (the last windows of each
    domain in turn), so evaluation text is never trained on."""
    keep = np.ones(len(domains), dtype=bool)
    per_domain = [list(np.flatnonzero(domains == d)) for d in np.unique(domains)]
    taken = 0
    while taken < count and any(len(p) > 1 for p in per_domain):
        for p in per_domain:
            if taken < count and len(p) > 1:
                keep[p.pop()] = False
                taken += 1
    return np.flatnonzero(keep), np.flatnonzero(~keep)


def partition_indices(domains: np.ndarray, clients: int, partition: Partition | str, seed: int) -> list[np.ndarray]:
    """Window indices per client with a flwr-datasets partitioner."""
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, NaturalIdPartitioner

    try:
        partition = Partition.parse(partition)
    except argparse.ArgumentTypeError as exc:
        raise LLMPruneError(str(exc), "pass --partition iid, domain or dirichlet:ALPHA") from None
    kind = partition.kind
    n = len(domains)
    table = {"index": np.arange(n), "domain": domains}
    if kind == "iid":
        partitioner = IidPartitioner(num_partitions=clients)
        table["index"] = np.random.default_rng(seed).permutation(n)  # IID partitioner cuts in order
        table["domain"] = domains[table["index"]]
    elif kind == "dirichlet":
        partitioner = DirichletPartitioner(num_partitions=clients, partition_by="domain", alpha=partition.alpha,
                                           min_partition_size=1, self_balancing=True, seed=seed)
    elif kind == "domain":
        table["shard"] = _domain_shards(domains, clients, seed)
        partitioner = NaturalIdPartitioner(partition_by="shard")
    partitioner.dataset = Dataset.from_dict(table)
    parts = [np.asarray(partitioner.load_partition(i)["index"], dtype=np.int64) for i in range(clients)]
    return [np.sort(p) for p in parts]


def _domain_shards(domains: np.ndarray, clients: int, seed: int) -> np.ndarray:
    """Client i draws from domain i mod D only; a domain's windows are dealt evenly (shuffled)
    among its clients."""
    labels = np.unique(domains)
    if clients < len(labels):
        raise LLMPruneError(f"--partition domain needs at least one client per domain ({len(labels)} domains, {clients} clients)",
                            "pass more --clients or fewer --data sources")
    rng = np.random.default_rng(seed)
    shard = np.empty(len(domains), dtype=np.int64)
    for d_index, label in enumerate(labels):
        owners = [c for c in range(clients) if c % len(labels) == d_index]
        idx = rng.permutation(np.flatnonzero(domains == label))
        for k, chunk in enumerate(np.array_split(idx, len(owners))):
            shard[chunk] = owners[k]
    return shard


def build_client_data(tokenizer, specs: list[str], clients: int, partition: Partition | str, seq_len: int, seed: int,
                      max_windows: int | None = None, eval_spec: str | None = None, eval_windows: int = 4) -> ClientData:
    """Tokenize the sources, hold out evaluation windows (unless `eval_spec` is given) and
    partition the rest. Too little data for the clients is an error that says how much there is."""
    windows, domains = source_windows(tokenizer, specs, seq_len, max_windows)
    if eval_spec:
        held = domain_windows(tokenizer, eval_spec, seq_len, eval_windows)
        train_idx = np.arange(len(domains))
    else:
        train_idx, eval_idx = split_eval(domains, eval_windows)
        held = windows[torch.from_numpy(eval_idx)] if len(eval_idx) else None
    if len(train_idx) < clients:
        raise LLMPruneError(
            f"data too small for {clients} clients: {len(train_idx)} training windows of {seq_len} tokens",
            "give more text, fewer --clients, or a smaller --seq-len")
    windows, domains = windows[torch.from_numpy(train_idx)], domains[train_idx]
    parts = partition_indices(domains, clients, partition, seed)
    empty = [i for i, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise LLMPruneError(f"partition '{partition}' left client(s) {empty} without data ({len(domains)} windows)",
                            "give more text, fewer --clients, or a larger Dirichlet alpha")
    stats = [{"client": i, "windows": int(len(p)),
              "domains": {specs[d]: int((domains[p] == d).sum()) for d in np.unique(domains[p])}}
             for i, p in enumerate(parts)]
    return ClientData(windows, domains, list(specs), parts, held, stats)
