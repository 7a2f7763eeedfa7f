"""A vocabulary the fleet chooses (`recover --vocab K`): before round 1 every device counts the token
ids of its own windows and sends only the counts (masked by SecAgg+ when it is on, noised for
--vocab-epsilon); the server ranks the summed counts and trims the global model with compress's
vocabulary step; the devices then cut the same rows from their own copy of the checkpoint and
re-tokenize their own text with the rebuilt tokenizer. No text leaves a device, and with SecAgg+
no device's counts reach the server in the clear.

The maths of the choice is compress's (`select_from_counts`, `cut_vocabulary`): this module is the
bookkeeping of the fleet — who counts what, the noise, the saved choice a resumed run reuses.

Privacy of the counts (--vocab-epsilon ε): the unit is one window (--seq-len tokens, BOS apart). Laplace
(the default): a window's tokens change the count vector by at most seq-len in L1, so noise of scale
seq-len/ε per id on the sum is ε-DP; each device adds Gamma(1/n, b) - Gamma(1/n, b), whose sum over the
n devices is exactly Laplace(b). Gaussian (--vocab-noise gaussian, (ε, δ)-DP): devices count each id at
most once per window, so a window changes the vector by at most √seq-len in L2; σ is the analytic
Gaussian mechanism's (Balle & Wang 2018), each device adding N(0, σ²/n). The noise is drawn from the
OS's entropy, never from the run's seed, which the server knows."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
from pathlib import Path

import numpy as np
import torch

from llmprune.errors import LLMPruneError

log = logging.getLogger(__name__)
# A device's count of one id is capped here: SecAgg+ sums integers below its modulus (2^32), each
# device's value quantized exactly into [0, 2 x cap]; 2^20 occurrences of one id already rank it.
COUNT_CLIP = 2 ** 20
MAX_SECAGG_DEVICES = 2 ** 32 // (2 * COUNT_CLIP) - 1
STATE_FILE = "vocabulary.json"       # the choice, in the round state's folder: a resumed run reuses it
# With --vocab-epsilon: the chance that an id no device holds is read as seen (about 260 of Gemma's
# 262,144 ids); the threshold it sets is the noise's, not the data's.
NOISE_PASS = 1e-3


# -- on the device ---------------------------------------------------------------------------------
def content_ids(windows: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The ids of the device's text in its windows (the BOS that windowing adds left out)."""
    return windows[:, 1:] if windows.shape[1] == seq_len + 1 else windows


def device_counts(windows: torch.Tensor, seq_len: int, size: int, presence: bool = False) -> np.ndarray:
    """How often each of the `size` ids occurs in this device's text, each capped at COUNT_CLIP;
    `presence`: in how many windows (each id at most once per window)."""
    ids = content_ids(windows, seq_len).numpy()
    if ids.size and (ids.min() < 0 or ids.max() >= size):
        raise LLMPruneError(f"this device's windows hold token ids outside the server's {size}-id vocabulary",
                            "give the device the server's checkpoint (node config model-path)")
    flat = np.concatenate([np.unique(row) for row in ids]) if presence and ids.size else ids.reshape(-1)
    return np.minimum(np.bincount(flat, minlength=size), COUNT_CLIP).astype(np.int64)


def laplace_share(size: int, scale: float, devices: int, rng: np.random.Generator) -> np.ndarray:
    """One device's share of Laplace(scale) noise per id: Laplace is infinitely divisible, and the
    sum over `devices` devices of Gamma(1/n, scale) - Gamma(1/n, scale) is Laplace(scale)."""
    shape = 1.0 / max(devices, 1)
    return rng.gamma(shape, scale, size) - rng.gamma(shape, scale, size)


def analytic_gaussian_sigma(epsilon: float, delta: float, sensitivity: float) -> float:
    """The smallest σ for which Gaussian noise on a query of this L2 sensitivity is (ε, δ)-DP, by the
    exact condition of Balle & Wang (2018), Theorem 8: Φ(Δ/2σ - εσ/Δ) - e^ε Φ(-Δ/2σ - εσ/Δ) ≤ δ
    (the classic √(2 ln(1.25/δ)) Δ/ε holds only for ε < 1)."""
    from scipy.special import log_ndtr

    def leak(sigma: float) -> float:
        a, b = sensitivity / (2 * sigma), epsilon * sigma / sensitivity
        return float(np.exp(log_ndtr(a - b)) - np.exp(epsilon + log_ndtr(-a - b)))

    lo, hi = 1e-6 * sensitivity, 1e6 * sensitivity
    for _ in range(200):                      # leak(σ) falls as σ grows: bisect in log space
        mid = float(np.sqrt(lo * hi))
        lo, hi = (mid, hi) if leak(mid) > delta else (lo, mid)
    return hi


@dataclasses.dataclass(frozen=True)
class CountNoise:
    """The noise on the fleet's summed counts: its mechanism and its per-id scale (Laplace b, or
    Gaussian σ), calibrated by the server and carried by the counting query."""

    mechanism: str
    scale: float

    @classmethod
    def calibrated(cls, mechanism: str, epsilon: float | None, delta: float, seq_len: int) -> CountNoise | None:
        if epsilon is None:
            return None
        if mechanism == "gaussian":
            return cls(mechanism, analytic_gaussian_sigma(epsilon, delta, float(np.sqrt(seq_len))))
        return cls(mechanism, seq_len / epsilon)

    @property
    def presence(self) -> bool:
        """Gaussian counts windows holding an id (bounded L2), Laplace every occurrence."""
        return self.mechanism == "gaussian"

    def share(self, size: int, devices: int, rng: np.random.Generator) -> np.ndarray:
        """One device's share: the n devices' shares sum to the mechanism's noise."""
        if self.mechanism == "gaussian":
            return rng.normal(0.0, self.scale / np.sqrt(max(devices, 1)), size)
        return laplace_share(size, self.scale, devices, rng)

    def threshold(self) -> float:
        """The summed count an id no device holds passes with probability NOISE_PASS."""
        if self.mechanism == "gaussian":
            from scipy.special import ndtri

            return self.scale * float(ndtri(1.0 - NOISE_PASS))
        return self.scale * float(np.log(1.0 / (2.0 * NOISE_PASS)))


def released_counts(counts: np.ndarray, noise: CountNoise | None, devices: int) -> np.ndarray:
    """What a device sends: its counts, plus its share of the noise when there is one (float64)."""
    out = counts.astype(np.float64)
    if noise is not None:
        out += noise.share(out.size, devices, np.random.default_rng(secrets.randbits(128)))
    return out


def coverage(windows: torch.Tensor, seq_len: int, kept_ids: np.ndarray) -> float:
    """Share of this device's tokens (as the checkpoint's tokenizer splits them) the kept ids hold."""
    ids = content_ids(windows, seq_len).reshape(-1).numpy()
    return float(np.isin(ids, kept_ids).mean()) if ids.size else 0.0


def retokenize(windows: torch.Tensor, tokenizer, kept_ids: np.ndarray, seq_len: int,
               max_windows: int | None) -> torch.Tensor:
    """The device's text in windows of the trimmed tokenizer: decoded with the checkpoint's
    tokenizer (the windows are one stream cut in order) and split anew, as the trimmed model reads it."""
    import llmprune

    text = tokenizer.decode(content_ids(windows, seq_len).reshape(-1).tolist(), skip_special_tokens=False,
                            clean_up_tokenization_spaces=False)
    return llmprune.token_windows(trimmed_tokenizer(tokenizer, kept_ids), [text], seq_len, max_windows)


def trimmed_tokenizer(tokenizer, kept_ids: np.ndarray):
    from llmprune.compress import rebuild_tokenizer

    return rebuild_tokenizer(tokenizer, kept_ids)


def trim_model(model, kept_ids: np.ndarray):
    """The device's copy of the checkpoint cut to the kept rows, as the server cut the global one."""
    from llmprune.compress import slice_vocabulary

    slice_vocabulary(model, kept_ids)
    return model


# -- on the server ---------------------------------------------------------------------------------
@dataclasses.dataclass
class FleetVocabulary:
    """The fleet's choice: the kept ids (the checkpoint's ids), vocabulary.json of the output (ids of
    the first vocabulary), the checkpoint's tokenizer (to re-read windows) and the report."""

    kept_ids: np.ndarray
    vocab_json: dict
    original_tokenizer: object
    report: dict

    def windows(self, windows: torch.Tensor, seq_len: int, max_windows: int | None) -> torch.Tensor:
        return retokenize(windows, self.original_tokenizer, self.kept_ids, seq_len, max_windows)

    @property
    def kept_bytes(self) -> bytes:
        """The kept ids as each round's instruction carries them."""
        from .messages import ids_bytes

        return ids_bytes(self.kept_ids)


def rows_of(model) -> int:
    return int(model.get_input_embeddings().weight.shape[0])


def check_vocabulary_request(model_dir: str, size: int | float, model_rows: int) -> None:
    """--vocab K beyond the checkpoint's rows or below what every trimmed vocabulary keeps, or a
    tokenizer vocabulary pruning does not support: refused before anything runs."""
    import llmprune
    from llmprune.compress import smallest_vocabulary

    if isinstance(size, int) and size > model_rows:
        raise LLMPruneError(f"--vocab {size} is more than the checkpoint's {model_rows} vocabulary rows",
                            f"pass at most {model_rows}, or a fraction of the fleet's tokens such as 0.99")
    least = smallest_vocabulary(llmprune.load_tokenizer(model_dir))
    if isinstance(size, int) and size < least:
        raise LLMPruneError(f"--vocab {size} is below the {least} ids every trimmed vocabulary keeps (special and "
                            "byte tokens and the pieces they need)", f"pass at least {least}")


def choose(tokenizer, counts: np.ndarray, size: int | float, noise: CountNoise | None = None):
    """compress's selection from the fleet's summed counts. Noisy counts at or below the noise
    threshold read as 0, so the ids the noise cannot tell from unseen ones are ranked as compress
    ranks unseen ids (alphabet, then merge rank) instead of by their noise: post-processing, no
    privacy cost (measured in bench/recover.py)."""
    from llmprune.compress import MIN_DATA_TOKENS, select_from_counts

    if noise is not None:
        counts = np.where(counts > noise.threshold(), counts, 0)
    counts = np.rint(np.clip(counts, 0, None)).astype(np.int64)
    if counts.sum() < MIN_DATA_TOKENS:
        raise LLMPruneError(f"the fleet counted only {int(counts.sum())} tokens, too few to rank a vocabulary "
                            f"(at least {MIN_DATA_TOKENS})", "give the devices more data, or drop --vocab")
    return select_from_counts(tokenizer, counts, size)


def cut(model, tokenizer, selection, source: str | None) -> tuple[object, dict]:
    """Trim the server's model in place: the new tokenizer and vocabulary.json (compress's step)."""
    from llmprune.compress import cut_vocabulary

    return cut_vocabulary(model, tokenizer, selection, source)


def save_choice(folder: Path, selection, counted: dict) -> None:
    """The choice beside the round state (atomic): a resumed run trims the same rows without recounting."""
    folder.mkdir(parents=True, exist_ok=True)
    fields = {f.name: getattr(selection, f.name) for f in dataclasses.fields(selection)}
    fields["kept_ids"] = [int(i) for i in selection.kept_ids]
    tmp = folder / f".{STATE_FILE}.tmp"
    tmp.write_text(json.dumps({"selection": fields, "counted": counted}, default=float))
    os.replace(tmp, folder / STATE_FILE)


def load_choice(folder: Path, size: int | float):
    """(selection, counted) saved by an earlier run of the same --vocab, or None."""
    from llmprune.compress import VocabularySelection

    path = folder / STATE_FILE
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
        fields = dict(saved["selection"])
        fields["kept_ids"] = np.asarray(fields["kept_ids"], dtype=np.int64)
        selection = VocabularySelection(**fields)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LLMPruneError(f"the saved vocabulary '{path}' is unreadable ({exc})",
                            "start over with --overwrite") from None
    if selection.size_requested != size:
        raise LLMPruneError(f"the saved vocabulary '{path}' was chosen for --vocab {selection.size_requested}",
                            f"resume with --vocab {selection.size_requested}, or start over with --overwrite")
    return selection, saved.get("counted") or {}


def open_fleet_vocabulary(run) -> FleetVocabulary:
    """Before round 1: count on the devices (or reuse the saved choice of the run being resumed),
    choose with compress's ranking, trim the server's model and tokenizer in place, ask each device
    how much of its data the kept ids cover."""
    cfg, settings = run.cfg, run.settings
    saved = load_choice(settings.state_path, cfg.vocab.size) if settings.resume else None
    if saved is None:
        counts, counted = count_fleet_tokens(run)
        selection = choose(run.tokenizer, counts, cfg.vocab.size, fleet_noise(cfg))
        save_choice(settings.state_path, selection, counted)
    else:
        selection, counted = saved
        log.info("the vocabulary of the run being resumed: %d ids", selection.size)
    original = run.tokenizer
    run.tokenizer, vocab_json = cut(run.model, original, selection, settings.model)
    report = {"requested": cfg.vocab.size, "kept": selection.size, "before": int(selection.original_size),
              "counted_coverage": selection.coverage, **counted,
              "coverage_by_device": device_coverage(run, selection.kept_ids)}
    log.info("fleet vocabulary: %d of %d ids kept (%.2f%% of the counted tokens)", selection.size,
             selection.original_size, 100 * selection.coverage)
    return FleetVocabulary(selection.kept_ids, vocab_json, original, report)


def fleet_noise(cfg) -> CountNoise | None:
    v = cfg.vocab
    return CountNoise.calibrated(v.noise, v.epsilon, v.delta, cfg.data.seq_len)


def count_fleet_tokens(run) -> tuple[np.ndarray, dict]:
    """The fleet's summed token counts, plain or under SecAgg+; with ε every device must answer
    (a missing device's share of the noise would be missing from the sum)."""
    from .messages import CountQuery, TokenCounts
    from .transport import send_and_receive

    cfg = run.cfg
    nodes = sorted(run.nodes)
    noise = fleet_noise(cfg)
    query = CountQuery(rows_of(run.model), cfg.data.seq_len, len(nodes), noise and noise.mechanism,
                       noise.scale if noise else 0.0)
    timeout = cfg.fleet.round_deadline(run.simulation)
    if cfg.privacy.secagg:
        from .secagg import run_secagg_counts

        total, answered = run_secagg_counts(run.grid, run.flower, nodes, query.to_config(), COUNT_CLIP,
                                            cfg.fleet.min_replies(len(nodes)), timeout)
    else:
        replies = [r for r in send_and_receive(run.grid, [query.to_message(n) for n in nodes], timeout, run.stop)
                   if not r.has_error()]
        counts = sorted((TokenCounts.from_message(r) for r in replies), key=lambda c: c.partition_id)
        total = np.sum([c.counts for c in counts], axis=0) if counts else None
        answered = len(counts)
    if total is None or answered == 0 or (noise is not None and answered < len(nodes)):
        raise LLMPruneError(f"{answered} of {len(nodes)} devices answered the vocabulary's counting round"
                            + (" (with --vocab-epsilon every device must: the noise is shared)" if noise else ""),
                            "see the devices' logs; rerun when they are up, or drop --vocab")
    privacy = {"epsilon": cfg.vocab.epsilon, "noise": None if noise is None else noise.mechanism,
               "delta": cfg.vocab.delta if noise is not None and noise.presence else None,
               "noise_scale": None if noise is None else round(noise.scale, 4),
               "noise_threshold": None if noise is None else round(noise.threshold(), 3)}
    return total, {"devices_counted": answered, "secagg": cfg.privacy.secagg, **privacy,
                   "tokens_counted": int(np.clip(total, 0, None).sum())}


def device_coverage(run, kept_ids: np.ndarray) -> dict[str, dict]:
    """Per answering device (partition id ->): the share of its own tokens the kept ids hold, and
    its windows before and after re-tokenizing."""
    from .messages import Coverage, CoverageQuery, ids_bytes
    from .transport import send_and_receive

    query = CoverageQuery(ids_bytes(kept_ids), run.cfg.data.seq_len)
    replies = send_and_receive(run.grid, [query.to_message(n) for n in sorted(run.nodes)],
                               run.cfg.fleet.round_deadline(run.simulation), run.stop)
    found = sorted((Coverage.from_message(r) for r in replies if not r.has_error()), key=lambda c: c.partition_id)
    return {str(c.partition_id): {"coverage": round(c.coverage, 6), "windows": [c.windows_before, c.windows_after]}
            for c in found}
