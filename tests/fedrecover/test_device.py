"""A device's round (device.py): in simulation it runs in a fresh process of its own, so the peak it
reports is its own — whatever the process that asked for it holds, and whichever device the same
Ray worker simulated before it."""

from __future__ import annotations

import numpy as np
import pytest

from llmprune.fedrecover.device import RoundJob, run_round
from llmprune.fedrecover.messages import TrainInstruction
from llmprune.fedrecover.round_server import RoundServer

from .conftest import SMALL


def job_for(path, windows, arrays, **instruction) -> RoundJob:
    settings = dict(server_round=1, seed=7, local_steps=2, scale=2.0, batch_size=2, lr=2e-4)
    return RoundJob(str(path), TrainInstruction(**{**settings, **instruction}), arrays, windows)


@pytest.fixture(scope="module")
def server():
    with RoundServer() as server:
        yield server


@pytest.fixture(scope="module")
def small_job(pruned_ckpt, tok):
    import llmprune
    from llmprune.fedrecover.lora import init_arrays, module_shapes

    from .conftest import varied_text

    model = llmprune.load_model(pruned_ckpt)
    shapes = module_shapes(model, ("q_proj", "v_proj", "down_proj"))
    windows = llmprune.token_windows(tok, [varied_text(400)], 32, 4)
    return job_for(pruned_ckpt, windows, init_arrays(shapes, list(shapes), 2, 0))


def test_an_isolated_round_trains_exactly_as_in_process_and_reports_its_own_peak(small_job, server):
    here = run_round(small_job)
    alone = server.run(small_job)
    assert here.loss == alone.loss and here.trained.keys() == alone.trained.keys()
    assert all(np.array_equal(here.trained[k], alone.trained[k]) for k in here.trained)
    # the caller grows by 300 MB: a round in its own process does not see it
    ballast = np.ones(300 * 2**20 // 8)
    again = server.run(small_job)
    del ballast
    assert again.memory["peak-rss-mb"] == pytest.approx(alone.memory["peak-rss-mb"], rel=0.05)


def test_an_error_in_the_round_process_comes_back_as_it_was(small_job, server):
    from dataclasses import replace

    from llmprune.fedrecover.device import DeviceEmulation

    with pytest.raises(MemoryError, match="out of memory: training needed .* the device has 1 MB"):
        server.run(replace(small_job, emulation=DeviceEmulation(oom_mb=1)))
    with pytest.raises(RuntimeError, match="LLMPruneError"):
        server.run(replace(small_job, path="/nonexistent/checkpoint"))
    assert server.run(small_job).loss > 0          # the server goes on serving after a failed round


def test_a_simulated_device_measures_what_the_same_round_measures_alone(basic_run, pruned_ckpt, server):
    """basic_run: 3 clients on 2 Ray workers; in round 2 each worker has simulated another device
    before. Each device's round-2 peak equals the same round (same instruction, adapter view and
    windows) run alone, in a process of its own started from this test."""
    from safetensors.numpy import load_file

    from llmprune.fedrecover import state_dir_for
    from llmprune.fedrecover.partition import ClientData

    from .conftest import BASIC

    state = state_dir_for(basic_run.out)
    data = ClientData.load(state / "partitions.npz")
    view = load_file(str(state / "round-001.safetensors"))      # fedavg: every device gets the whole adapter
    settings = {**SMALL, **BASIC}
    row = basic_run.metrics["rounds"][1]
    assert len(row["clients"]) == 2
    for client in row["clients"]:
        pid = client["partition-id"]
        seed = int(np.random.default_rng([0, 2, pid]).integers(2**31))
        job = job_for(pruned_ckpt, data.client_windows(pid), view, server_round=2, seed=seed,
                      local_steps=settings["local_steps"], batch_size=settings["batch_size"], uniform_weights=True)
        alone = server.run(job)
        assert round(alone.loss, 4) == client["train_loss"]            # the very same round
        assert client["peak_rss_mb"] == pytest.approx(alone.memory["peak-rss-mb"], rel=0.05)


def test_the_round_process_keeps_the_order_of_the_adapter_names(small_job, server):
    """Flower's DP clipping mod compares the reply's names with what the device received, in order."""

    here = list(run_round(small_job).trained)
    assert here != sorted(here)             # safetensors alone would hand back the sorted names
    assert list(server.run(small_job).trained) == here
