"""Central differential privacy with client-side clipping, as Flower's
DifferentialPrivacyClientSideFixedClipping does it: each device clips its update to the norm the
instruction carries (Flower's fixedclipping_mod on the client), the server refuses a round in
which a device failed, and adds Gaussian noise of std z * C / (sampled clients) to the average.
The noise is drawn from a generator seeded by (seed, round), never from numpy's global state,
so a resumed run adds what the uninterrupted one would have."""

from __future__ import annotations

import logging

import numpy as np
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, compute_stdv

log = logging.getLogger(__name__)


class CentralDP:
    def __init__(self, clipping_norm: float, noise_multiplier: float, sampled: int, seed: int) -> None:
        self.clipping_norm, self.noise_multiplier, self.sampled, self.seed = clipping_norm, noise_multiplier, sampled, seed

    def instruction_extra(self) -> dict:
        """What every device's instruction carries: the clipping norm its mod applies."""
        return {KEY_CLIPPING_NORM: self.clipping_norm}

    def release(self, server_round: int, average: dict[str, np.ndarray] | None,
                any_failed: bool) -> dict[str, np.ndarray] | None:
        """The noised average, or None when a device failed (Flower's wrapper refuses such a round)."""
        if any_failed:
            log.info("round %d: some clients reported errors: the DP round is not applied", server_round)
            return None
        if average is None:
            return None
        rng = np.random.RandomState(np.random.default_rng([self.seed, server_round, 7]).integers(2**31))
        std = compute_stdv(self.noise_multiplier, self.clipping_norm, self.sampled)
        out = {}
        for name, array in average.items():
            noised = np.array(array, copy=True)
            noised += rng.normal(0, std, noised.shape).astype(noised.dtype)
            out[name] = noised
        log.info("round %d: central DP noise with %.4f stdev added", server_round, std)
        return out
