"""A device's split-training jobs (split_device.py): the device's part of the model stays loaded from a
round's first job to its last and gives the same training as a part read afresh per job (a device whose
process starts per message); in simulation each device's jobs run in a session of the round server
that ends with the device's round, with a failure, or with the server."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from llmprune.fedrecover import split_device
from llmprune.fedrecover.device_models import DeviceModel
from llmprune.fedrecover.messages import TrainInstruction
from llmprune.fedrecover.round_server import RoundServer
from llmprune.fedrecover.split import Cut
from llmprune.fedrecover.split_device import SplitJob, holds_part, release_part, run_split_job, start_state

STEPS = 3


@pytest.fixture(scope="module")
def device_round(pruned_ckpt, tok):
    """The first job of a device's round (cut at layer 1 of 3, LoRA on its two layers) and its windows."""
    import llmprune
    import llmprune.fedrecover.policies  # noqa: F401  (registers the `split` device-model kind)
    from llmprune.fedrecover.lora import init_arrays, module_shapes

    from .conftest import varied_text

    model = llmprune.load_model(pruned_ckpt)
    cut = Cut(model.config.num_hidden_layers, 1, model.config.num_hidden_layers - 1)
    shapes = module_shapes(model, ("q_proj", "v_proj", "down_proj"))
    arrays = init_arrays(shapes, cut.device_modules(shapes), 2, 0)
    arrays = {k: (v + 0.01 if k.endswith(".B") else v) for k, v in arrays.items()}   # A gets gradients too
    device_model = DeviceModel("split", cut)
    instruction = TrainInstruction(server_round=1, seed=7, local_steps=STEPS, scale=2.0, batch_size=2, lr=1e-3,
                                   device_model=device_model)
    windows = llmprune.token_windows(tok, [varied_text(600)], 16, 6)
    return SplitJob("front", str(pruned_ckpt), instruction, start_state(device_model.held().to_local(arrays)),
                    windows, 0)


def play_round(first: SplitJob, run, between=lambda: None) -> tuple[list, dict]:
    """A device's whole round, the server's middle stood in for by the identity (the device's features
    come back as the tail's input): front 0, tail 0, front 1 (+ step 0's update), ..., front STEPS.
    Returns each job's outgoing tensor and the final state."""
    from dataclasses import replace

    state, outgoing, gradient = first.state, [], None
    for step in range(STEPS + 1):
        front = run(replace(first, kind="front", state=state, step=step, incoming=gradient))
        state = front.state
        outgoing.append(front.outgoing)
        between()
        if step == STEPS:
            break
        tail = run(replace(first, kind="tail", state=state, step=step, incoming=front.outgoing))
        state, gradient = tail.state, tail.outgoing
        outgoing.append(tail.outgoing)
        between()
    return outgoing, state


def _same(a: tuple[list, dict], b: tuple[list, dict]) -> None:
    for x, y in zip(a[0], b[0], strict=True):
        assert (x is None) == (y is None)
        if x is not None:
            np.testing.assert_array_equal(x, y)
    trained = [k for k in a[1] if k != split_device.STATS]
    assert trained and set(trained) == {k for k in b[1] if k != split_device.STATS}
    for k in trained:
        np.testing.assert_array_equal(a[1][k], b[1][k])


def test_a_part_held_for_the_round_trains_as_a_part_read_per_job(device_round):
    held_between: list[bool] = []
    held = play_round(device_round, run_split_job, lambda: held_between.append(holds_part()))
    assert held_between[:-1] == [True] * (2 * STEPS) and held_between[-1] is False   # freed after the last job
    fresh = play_round(device_round, run_split_job, release_part)
    _same(held, fresh)
    start = split_device.trained_arrays(device_round.state)
    assert any(not np.array_equal(start[k], v) for k, v in split_device.trained_arrays(held[1]).items())


def test_a_failed_job_frees_the_part(device_round):
    from dataclasses import replace

    run_split_job(device_round)
    assert holds_part()
    wrong = np.zeros((1, 2, 3), dtype=np.float32)         # not the features of this step's batch
    with pytest.raises(RuntimeError):
        run_split_job(replace(device_round, kind="tail", incoming=wrong))
    assert not holds_part()


def _children(pid: int) -> set[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return {int(p) for p in f.read().split()}


def _gone(pid: int, wait: float = 10.0) -> bool:
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        with open(f"/proc/{pid}/stat") as f:
            if f.read().split(")")[-1].split()[0] == "Z":      # exited, not yet reaped: gone for the device
                return True
        time.sleep(0.1)
    return False


def test_each_device_has_one_session_for_its_round_with_the_in_process_result(device_round):
    expected = play_round(device_round, run_split_job)
    with RoundServer() as server:
        counts: list[int] = []
        a = play_round(device_round, lambda job: server.run_split(job, "device-a"),
                       lambda: counts.append(len(_children(server.process.pid))))
        assert counts[:-1] == [1] * (2 * STEPS) and counts[-1] == 0     # one process for the round, then none
        _same(a, expected)
        server.run_split(device_round, "device-b")      # a device's round begun and never ended
        (left,) = _children(server.process.pid)
    assert _gone(left), "a session outlived its round server"
