"""RecoverConfig: validation with one-line errors, and the flat Flower run config round trip
(the same keys in simulation and on a real fleet)."""

from __future__ import annotations

import pytest

from llmprune.errors import LLMPruneError
from llmprune.fedrecover import RecoverConfig


def test_run_config_round_trips():
    cfg = RecoverConfig(clients=5, rounds=2, partition="dirichlet:0.3", aggregation="flexlora", fraction=0.6,
                        min_clients=2, lora_alpha=4.0, target_modules=("q_proj", "v_proj"), max_windows=9,
                        fleet="f.toml", dp_clip=1.0, dp_noise=0.5, inject_faults="crash:1@2")
    flat = cfg.to_run_config()
    assert flat["target-modules"] == "q_proj,v_proj" and flat["dp-clip"] == 1.0 and flat["eval-data"] == ""
    assert all(isinstance(v, (str, int, float, bool)) for v in flat.values())      # TOML scalars only
    back = RecoverConfig.from_run_config({**flat, "model": "/m", "out": "/o"})
    assert back.to_dict() == {**cfg.to_dict(), "extra": {"model": "/m", "out": "/o"}}
    # optional settings left empty come back as None
    plain = RecoverConfig.from_run_config(RecoverConfig().to_run_config())
    assert plain.min_clients is None and plain.dp_clip is None and plain.eval_data is None and plain == RecoverConfig()


def test_scale_is_alpha_over_rank_and_min_replies():
    assert RecoverConfig(lora_rank=8).scale == 2.0
    assert RecoverConfig(lora_rank=8, lora_alpha=4).scale == 0.5
    assert [RecoverConfig().min_replies(n) for n in (1, 2, 3, 4)] == [1, 1, 2, 2]
    assert RecoverConfig(min_clients=3).min_replies(2) == 2


@pytest.mark.parametrize("kwargs, message", [
    ({"clients": 0}, "--clients must be at least 1"),
    ({"fraction": 0.0}, "--fraction must be in (0, 1]"),
    ({"partition": "dirichlet:-1"}, "unknown --partition 'dirichlet:-1'"),
    ({"partition": "domain:2"}, "unknown --partition 'domain:2'"),
    ({"aggregation": "fedprox"}, "unknown --aggregation 'fedprox'"),
    ({"seq_len": 4}, "--seq-len at least 8"),
    ({"dp_noise": 1.0}, "--dp-noise needs --dp-clip"),
    ({"secagg": True, "aggregation": "flexlora"}, "--secagg cannot be used with --aggregation flexlora"),
    ({"secagg": True, "dp_clip": 1.0}, "--secagg and --dp-clip together"),
    ({"round_timeout": 0}, "--round-timeout must be positive"),
])
def test_bad_settings_are_one_line_errors(kwargs, message):
    with pytest.raises(LLMPruneError) as err:
        RecoverConfig(**kwargs)
    assert message in str(err.value) and " — " in str(err.value) and "\n" not in str(err.value)
