"""RecoverConfig: validation with one-line errors, and the flat Flower run config round trip
(the same keys in simulation and on a real fleet)."""

from __future__ import annotations

import pytest

import dataclasses
import re
import tomllib

from llmprune.errors import LLMPruneError
from llmprune.fedrecover import AGGREGATIONS, RecoverConfig, RunSettings, parse_run_config
from llmprune.fedrecover.deploy import app_config_toml, app_dir, run_config_defaults


def test_run_config_round_trips():
    cfg = RecoverConfig(clients=5, rounds=2, partition="dirichlet:0.3", aggregation="flexlora", fraction=0.6,
                        min_clients=2, lora_alpha=4.0, target_modules=("q_proj", "v_proj"), max_windows=9,
                        fleet="f.toml", dp_clip=1.0, dp_noise=0.5, inject_faults="crash:1@2")
    flat = cfg.to_run_config()
    assert flat["target-modules"] == "q_proj,v_proj" and flat["dp-clip"] == 1.0 and flat["eval-data"] == ""
    assert all(isinstance(v, (str, int, float, bool)) for v in flat.values())      # TOML scalars only
    back, settings = parse_run_config({**flat, "model": "/m", "out": "/o"})
    assert back.to_dict() == cfg.to_dict() and settings == RunSettings(model="/m", out="/o")
    assert RecoverConfig.from_run_config({**flat, "model": "/m"}) == cfg
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


def test_run_settings_are_typed_and_bad_values_or_unknown_keys_are_one_line_errors():
    _, settings = parse_run_config({"out": "/o", "resume": "true", "overwrite": False, "data-cache": "/d.npz"})
    assert settings.resume is True and settings.overwrite is False and settings.data_cache == "/d.npz"
    assert str(settings.state_path) == "/o.rounds" and str(RunSettings().out_dir) == "recovered"
    for bad, named in ({"resume": "maybe"}, "'resume'"), ({"rounds": "many"}, "'rounds'"), \
            ({"learning-rate": 0.1}, "unknown run-config key 'learning-rate'"):
        with pytest.raises(LLMPruneError) as err:
            parse_run_config(bad)
        assert named in str(err.value) and " — " in str(err.value) and "\n" not in str(err.value)


def test_shipped_app_config_equals_the_defaults_and_comments_every_key():
    """One source of defaults: the app's [tool.flwr.app.config] is the fields' defaults, each key
    with its help as a comment (regenerate with deploy.app_config_toml() when a field changes)."""
    text = (app_dir() / "pyproject.toml").read_text()
    assert tomllib.loads(text)["tool"]["flwr"]["app"]["config"] == run_config_defaults()
    table = text[text.index("\n[tool.flwr.app.config]\n") + 1:]
    commented = {m.group(1) for m in re.finditer(r"^([\w-]+) = .+  # \S", table, re.MULTILINE)}
    fields = {f.name.replace("_", "-") for cls in (RecoverConfig, RunSettings) for f in dataclasses.fields(cls)}
    assert commented == fields == set(run_config_defaults())
    assert table == app_config_toml()


def test_aggregation_registry_drives_validation():
    assert list(AGGREGATIONS) == ["fedavg", "hetlora", "flexlora"]
    assert [n for n, a in AGGREGATIONS.items() if a.secagg] == ["fedavg", "hetlora"]
    assert [n for n, a in AGGREGATIONS.items() if a.mixed_ranks] == ["hetlora", "flexlora"]
    with pytest.raises(LLMPruneError, match="secure aggregation only sums uploads.*use fedavg or hetlora"):
        RecoverConfig(secagg=True, aggregation="flexlora")
