"""Fixtures of the fedrecover tests: a tiny pruned checkpoint (a dropped layer, pruned heads,
narrowed MLPs), text whose windows are all different, and federated runs in Flower's simulation
shared by several tests (each run costs 10-20 s, mostly ray's start-up)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from llmprune.testing import TINY_TEXT, tiny_model, tiny_tokenizer

# Small federated settings: every simulation in these tests uses them unless it says otherwise.
SMALL = dict(clients=2, rounds=1, local_steps=2, seq_len=32, batch_size=2, lora_rank=4)
# The shared run: DP clipping norm and noise multiplier small enough to keep training meaningful.
DP_CLIP, DP_NOISE = 1e-4, 1.0
BASIC = dict(clients=3, fraction=0.67, rounds=2, dp_clip=DP_CLIP, dp_noise=DP_NOISE)


def varied_text(words: int = 3000, seed: int = 0) -> str:
    """The tiny tokenizer's words in a seeded random order: no two 32-token windows alike."""
    vocab = TINY_TEXT.split()
    rng = np.random.default_rng(seed)
    return " ".join(vocab[i] for i in rng.integers(len(vocab), size=words))


@pytest.fixture(scope="session")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def pruned_ckpt(tmp_path_factory) -> Path:
    """A tiny llama pruned by compress: 3 of 4 layers left, half the query heads, per-layer MLP widths."""
    import torch

    from llmprune.compress import CompressConfig, compress

    out = tmp_path_factory.mktemp("fedrecover") / "pruned"
    cfg = CompressConfig(ratio=0.4, of="decoder", layer_share=0.7, prune_heads=True, head_ratio=0.5, intercept=True,
                         calib_samples=4, calib_seq_len=32, loss_windows=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)        # the checkpoint scripts/pin_recover.py pinned (recover_pins.json)
    try:
        compress(tiny_model("llama"), cfg, tokenizer=tiny_tokenizer(), calib=[varied_text(4000, seed=1)], out=out)
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="session")
def dense_ckpt(tmp_path_factory) -> Path:
    """The tiny llama `pruned_ckpt` was pruned from, saved: the teacher of the distillation tests."""
    out = tmp_path_factory.mktemp("fedrecover") / "dense"
    tiny_model("llama").save_pretrained(out)
    tiny_tokenizer().save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fedrecover-data") / "client_text.txt"
    path.write_text(varied_text(), encoding="utf-8")
    return path


def run_recover(model_dir, data, out, **overrides):
    """`recover()` with the small settings (overrides win; flag names, `policy` by name)."""
    import torch

    from llmprune.fedrecover import RecoverConfig, recover

    resume, overwrite = overrides.pop("resume", False), overrides.pop("overwrite", False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # the server's own maths (evaluation, pruning steps) the same in every fixture and test
    try:
        return recover(model_dir, [str(d) for d in data], RecoverConfig.of(**{**SMALL, **overrides}), out,
                       resume=resume, overwrite=overwrite)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def basic_run(pruned_ckpt, text_file, tmp_path_factory):
    """FedAvg with central DP, 3 clients of which 2 are sampled each round, 2 rounds: the
    end-to-end run, and the reference of the resume test."""
    out = tmp_path_factory.mktemp("basic") / "recovered"
    return run_recover(pruned_ckpt, [text_file], out, **BASIC)


def cut_back_to(out, done: int) -> None:
    """The round checkpoint as a run interrupted after round `done` leaves it (what came after is gone)."""
    import shutil

    from llmprune.fedrecover import state_dir_for

    state = state_dir_for(out)
    meta = json.loads((state / "state.json").read_text())
    meta["round"], meta["rounds"] = done, meta["rounds"][:done]
    (state / "state.json").write_text(json.dumps(meta))
    for path in state.iterdir():
        number = path.name.removeprefix("round-").removeprefix("pruned-r").split(".")[0]
        if number.isdigit() and int(number) > done:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    shutil.rmtree(out)


def resumed_after(ref, done: int, model_dir, data, out, **overrides):
    """A copy of the finished run `ref` cut back to round `done`, then resumed with these settings."""
    copy_run(ref, out)
    cut_back_to(out, done)
    return run_recover(model_dir, data, out, resume=True, **overrides)


def assert_resumed_equal(ref, got) -> None:
    from safetensors.numpy import load_file

    from llmprune.fedrecover import state_dir_for

    keys = ("round", "train_loss", "eval_perplexity", "bytes_up", "bytes_down")
    assert [{k: r[k] for k in keys} for r in got.metrics["rounds"]] == [{k: r[k] for k in keys} for r in ref.metrics["rounds"]]
    last = len(ref.metrics["rounds"])
    a = load_file(str(state_dir_for(ref.out) / f"round-{last:03d}.safetensors"))
    b = load_file(str(state_dir_for(got.out) / f"round-{last:03d}.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def copy_run(ref, out) -> None:
    """A copy of a finished run's output and rounds at `out` (to cut back and resume)."""
    import shutil

    from llmprune.fedrecover import state_dir_for

    shutil.copytree(state_dir_for(ref.out), state_dir_for(out))
    shutil.copytree(ref.out, out)


# Float results differ in the last bits between CPU kernels (torch picks AVX-512 or AVX2 code): the
# pins of each CPU capability torch reports, recorded with scripts/pin_recover.py. recover_pins.json
# was recorded before the reshaping on an AVX-512 machine; the AVX2 file by today's code, which gave
# that file's results bit for bit there (their norms agree to 2e-6 here). Two CPUs of one capability
# can still differ in the last bits (an AMD EPYC gives 3 of the AVX-512 file's cases off by float noise):
# assert_pinned then holds the run to the pins within that noise.
PINS = {"AVX512": "recover_pins.json", "AVX2": "recover_pins.avx2.json"}


def pins_file() -> Path:
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in PINS:
        pytest.skip(f"no recorded pins for this CPU ({capability}): record them with scripts/pin_recover.py")
    return Path(__file__).with_name(PINS[capability])


def assert_pinned(run, case: str) -> None:
    """The run's final adapter and merged model are bit for bit those scripts/pin_recover.py recorded
    for `case` before fedrecover's reshaping (tests/fedrecover/recover_pins.json): the same settings,
    the same seed, the same result. Where this CPU's kernels round differently from the recording
    machine's (two AVX-512 CPUs need not agree in the last bits: oneDNN and MKL pick kernels per CPU
    model), the hashes cannot agree, and the run must instead agree with the pins within float noise:
    see `pinned_differences`."""
    import json

    from safetensors.numpy import load_file

    from llmprune.fedrecover import state_dir_for

    pins = json.loads(pins_file().read_text())[case]
    last = len(run.metrics["rounds"])
    adapter = load_file(str(state_dir_for(run.out) / f"round-{last:03d}.safetensors"))
    weights = {}
    for path in sorted(Path(run.out).glob("*.safetensors")):
        weights.update(load_file(str(path)))
    if (array_sha(adapter), array_sha(weights)) == (pins["adapter"], pins["merged"]):
        assert [r["eval_perplexity"] for r in run.metrics["rounds"]] == [r["eval_perplexity"] for r in pins["rounds"]]
        return
    differences = pinned_differences(run.metrics, adapter, pins)
    assert not differences, f"{case}: " + "; ".join(differences)


def array_sha(arrays: dict) -> str:
    import hashlib

    h = hashlib.sha256()
    for k in sorted(arrays):
        h.update(k.encode())
        h.update(np.ascontiguousarray(arrays[k]).tobytes())
    return h.hexdigest()[:16]


def adapter_norm(arrays: dict) -> float:
    """The L2 norm of all of an adapter's values (float64), as the pins record it."""
    return float(np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in arrays.values())))


# Float noise between CPU kernels, measured against the AVX-512 pins on an AMD EPYC (AVX-512): adapter norms
# and train losses agree to < 5e-7 relative, perplexities to their last written digit; a run with another
# seed moves the plan_dp adapter norm by 2.6e-3. Perplexities are written to 4 decimals, norms to 6.
PIN_RTOL = 1e-5
ROUNDING = {"perplexity": 1.5e-4, "norm": 1.5e-6, "loss": 0.0}


def pinned_differences(metrics: dict, adapter: dict, pins: dict, rtol: float = PIN_RTOL) -> list[str]:
    """What of a run differs from its pins by more than float noise: the final adapter's norm, the
    perplexity before and after each round, each round's train loss and the devices it sampled."""
    if len(metrics["rounds"]) != len(pins["rounds"]):
        return [f"{len(metrics['rounds'])} rounds, pinned {len(pins['rounds'])}"]
    got = [("adapter norm", adapter_norm(adapter), pins["adapter_norm"]),
           ("initial perplexity", metrics["initial_eval_perplexity"], pins["initial_eval_perplexity"])]
    out = []
    for i, (row, pin) in enumerate(zip(metrics["rounds"], pins["rounds"]), 1):
        got += [(f"round {i} perplexity", row["eval_perplexity"], pin["eval_perplexity"]),
                (f"round {i} train loss", row["train_loss"], pin["train_loss"])]
        sampled = [c.get("partition-id") for c in row["clients"]]
        if sampled != [c["partition-id"] for c in pin["clients"]]:
            out.append(f"round {i} sampled {sampled}, pinned {[c['partition-id'] for c in pin['clients']]}")
    out += [f"{name} {value!r}, pinned {pinned!r}" for name, value, pinned in got
            if abs(value - pinned) > rtol * abs(pinned) + ROUNDING[name.rsplit(" ", 1)[-1]]]
    return out
