"""RecoverConfig: sections and policy configs, validation with one-line errors where each setting is
declared, the small languages parsed once into typed values, the dotted Flower run config round
trip (the same keys in simulation and on a real fleet), and the resume rule declared on the field."""

from __future__ import annotations

import dataclasses
import re

import pytest
import tomllib

from llmprune.errors import LLMPruneError
from llmprune.fedrecover import (
    AGGREGATIONS,
    BanditConfig,
    FleetConfig,
    Partition,
    RecoverConfig,
    RunSettings,
    TrainingConfig,
    parse_run_config,
)
from llmprune.fedrecover.config import SECTIONS
from llmprune.fedrecover.deploy import app_config_toml, app_dir, run_config_defaults
from llmprune.fedrecover.faults import Fault
from llmprune.fedrecover.policies import POLICIES


def one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text and " — " in text, text
    return text


def test_run_config_round_trips_with_dotted_keys_and_typed_values():
    cfg = RecoverConfig.of(clients=5, rounds=2, partition="dirichlet:0.3", aggregation="hetlora", fraction=0.6,
                           min_clients=2, lora_alpha=4.0, target_modules=("q_proj", "v_proj"), max_windows=9,
                           fleet="f.toml", dp_clip=1.0, dp_noise=0.5, inject_faults="crash:1@2,delay:0:1.5",
                           policy="bandit", arm_sizes="0.5,1", arm_ranks="2,4")
    assert cfg.data.partition == Partition("dirichlet", 0.3) and cfg.inject_faults == (
        Fault("crash", 1, round=2), Fault("delay", 0, 1.5))
    assert cfg.policy == BanditConfig(arm_sizes=(0.5, 1.0), arm_ranks=(2, 4)) and cfg.policy.name == "bandit"
    flat = cfg.to_run_config()
    assert flat["training.target-modules"] == "q_proj,v_proj" and flat["privacy.dp-clip"] == 1.0
    assert flat["data.partition"] == "dirichlet:0.3" and flat["policy.bandit.arm-sizes"] == "0.5,1"
    assert flat["data.eval-data"] == "" and flat["policy.name"] == "bandit" and flat["inject-faults"] == "crash:1@2,delay:0:1.5"
    assert all(isinstance(v, (str, int, float, bool)) for v in flat.values())      # TOML scalars only
    back, settings = parse_run_config({**flat, "model": "/m", "out": "/o"})
    assert back == cfg and settings == RunSettings(model="/m", out="/o")
    assert RecoverConfig.from_run_config({**flat, "model": "/m"}) == cfg
    plain = RecoverConfig.from_run_config(RecoverConfig().to_run_config())        # '' comes back as None
    assert plain.fleet.min_clients is None and plain.privacy.dp_clip is None and plain == RecoverConfig()


def test_sections_build_the_same_config_as_flag_names():
    nested = RecoverConfig(training=TrainingConfig(rounds=5, lora_rank=4), fleet=FleetConfig(clients=2))
    assert nested == RecoverConfig.of(rounds=5, lora_rank=4, clients=2)
    assert RecoverConfig.of(lora_rank=8).scale == 2.0 and RecoverConfig.of(lora_rank=8, lora_alpha=4).scale == 0.5
    assert [RecoverConfig().fleet.min_replies(n) for n in (1, 2, 3, 4)] == [1, 1, 2, 2]
    assert RecoverConfig.of(min_clients=3).fleet.min_replies(2) == 2
    assert list(SECTIONS) == ["data", "training", "fleet", "privacy", "distill", "vocab"]


@pytest.mark.parametrize("kwargs, message", [
    ({"clients": 0}, "--clients: 0 must be at least 1"),
    ({"emulate_speed": True}, "--emulate-speed needs --fleet"),
    ({"fraction": 0.0}, "--fraction: 0.0 must be in (0, 1]"),
    ({"partition": "dirichlet:-1"}, "unknown partition 'dirichlet:-1'"),
    ({"partition": "domain:2"}, "unknown partition 'domain:2'"),
    ({"aggregation": "fedprox"}, "unknown aggregation 'fedprox'"),
    ({"seq_len": 4}, "--seq-len: 4 must be 8 or more"),
    ({"client_dtype": "float16"}, "--client-dtype: 'float16' is not one of float32, bfloat16"),
    ({"dp_noise": 1.0}, "--dp-noise needs --dp-clip"),
    ({"secagg": True, "aggregation": "flexlora"}, "--secagg cannot be used with --aggregation flexlora"),
    ({"secagg": True, "dp_clip": 1.0}, "--secagg and --dp-clip together"),
    ({"round_timeout": 0}, "--round-timeout: 0.0 must be positive"),
    ({"inject_faults": "boom:1"}, "bad fault 'boom:1'"),
    ({"learning_rate": 0.1}, "'learning_rate' is not a recover setting"),
    ({"arm_sizes": "0.5,1"}, "it belongs to --policy bandit"),
])
def test_bad_settings_are_one_line_errors(kwargs, message):
    with pytest.raises(LLMPruneError) as err:
        RecoverConfig.of(**kwargs)
    assert message in one_line(err)


@pytest.mark.parametrize("kwargs, message", [
    ({"policy": "submodels"}, "--policy submodels needs --fleet"),
    ({"policy": "bandit", "fleet": "f.toml", "arm_sizes": ""}, "arm grid is empty"),
    ({"policy": "bandit", "fleet": "f.toml", "arm_sizes": "0.5,1.5"}, "--arm-sizes"),
    ({"policy": "bandit", "fleet": "f.toml", "arm_ranks": "2,16", "aggregation": "hetlora"}, "a rank above --lora-rank 8"),
    ({"policy": "bandit", "fleet": "f.toml", "arm_ranks": "2,4", "aggregation": "fedavg"}, "needs an aggregation of mixed ranks"),
    ({"policy": "submodels", "fleet": "f.toml", "submodel_granularity": "block"}, "'block' is not one of layer"),
    ({"policy": "devft"}, "--policy devft needs --devft-stages"),
    ({"policy": "devft", "devft_stages": "2,1"}, "does not grow"),
    ({"policy": "devft", "devft_stages": "grow"}, "is not a layer count"),
    ({"policy": "prune-tune"}, "--policy prune-tune needs --target-ratio"),
    ({"policy": "prune-tune", "target_ratio": 1.5}, "--target-ratio must be in (0, 1)"),
    ({"policy": "prune-tune", "target_ratio": 0.3, "secagg": True}, "cannot be combined with --secagg"),
    ({"policy": "greedy"}, "unknown --policy 'greedy'"),
])
def test_each_policy_validates_its_own_settings(kwargs, message):
    with pytest.raises(LLMPruneError) as err:
        RecoverConfig.of(**kwargs)
    assert message in one_line(err)


def test_run_settings_are_typed_and_bad_values_or_unknown_keys_are_one_line_errors():
    _, settings = parse_run_config({"out": "/o", "resume": "true", "overwrite": False, "data-cache": "/d.npz"})
    assert settings.resume is True and settings.overwrite is False and settings.data_cache == "/d.npz"
    assert str(settings.state_path) == "/o.rounds" and str(RunSettings().out_dir) == "recovered"
    for bad, named in (({"resume": "maybe"}, "'resume'"), ({"training.rounds": "many"}, "'training.rounds'"),
                       ({"training.learning-rate": 0.1}, "unknown run-config key 'training.learning-rate'"),
                       ({"policy.name": "greedy"}, "unknown policy 'greedy'"),
                       ({"policy.bandit.arm-sizes": "0.5"}, "is set, but policy.name is 'plan'")):
        with pytest.raises(LLMPruneError) as err:
            parse_run_config(bad)
        assert named in one_line(err)
    # a device reads no policy setting: an unknown policy (a newer server) is no error there
    cfg, _ = parse_run_config({"policy.name": "greedy", "policy.greedy.x": 1, "training.rounds": 2}, device=True)
    assert cfg.training.rounds == 2 and cfg.policy.name == "plan"


def test_the_resume_rule_is_declared_on_the_field():
    identity = RecoverConfig().resume_identity()
    assert "training.lr" in identity and "fleet.file" in identity and "policy.name" in identity
    assert "training.rounds" not in identity and "data.eval-data" not in identity and "privacy.secagg" not in identity
    devft = RecoverConfig.of(policy="devft", devft_stages="1,all")
    assert devft.policy_class.fixed_rounds and devft.resume_identity()["policy.devft.stages"] == "1,all"
    assert "training.rounds" in devft.resume_identity()          # stages are spread over the rounds


def test_shipped_app_config_equals_the_defaults_and_comments_every_key():
    """One source of defaults: the app's [tool.flwr.app.config] tables are the fields' defaults,
    each key with its help as a comment (regenerate with deploy.app_config_toml() when a field changes)."""
    from flwr.common.config import flatten_dict

    text = (app_dir() / "pyproject.toml").read_text()
    assert flatten_dict(tomllib.loads(text)["tool"]["flwr"]["app"]["config"]) == run_config_defaults()
    table = text[text.index("\n[tool.flwr.app.config]\n") + 1:]
    assert table == app_config_toml()
    commented = len(re.findall(r"^[\w-]+ = .+  # \S", table, re.MULTILINE))
    assert commented == len(run_config_defaults())
    keys = {f"policy.{n}.{f.name.replace('_', '-')}" for n, c in POLICIES.items() for f in dataclasses.fields(c.config_class)}
    assert keys <= set(run_config_defaults())


def test_aggregation_registry_drives_validation():
    assert list(AGGREGATIONS) == ["fedavg", "hetlora", "flexlora"]
    assert [n for n, a in AGGREGATIONS.items() if a.secagg] == ["fedavg", "hetlora"]
    assert [n for n, a in AGGREGATIONS.items() if a.mixed_ranks] == ["hetlora", "flexlora"]
    with pytest.raises(LLMPruneError, match="secure aggregation only sums uploads.*use fedavg or hetlora"):
        RecoverConfig.of(secagg=True, aggregation="flexlora")


def test_a_policys_defaults_combine_and_the_users_flags_win():
    bandit = RecoverConfig.of(policy="bandit", fleet="f.toml")
    assert (bandit.training.aggregation, bandit.fleet.client_dtype, bandit.fleet.client_embedding) == \
        ("hetlora", "bfloat16", "int8")
    sub = RecoverConfig.of(policy="submodels", fleet="f.toml", client_dtype="float32")
    assert (sub.training.aggregation, sub.fleet.client_dtype, sub.fleet.client_embedding) == ("fedavg", "float32", "int8")
    assert RecoverConfig.of().fleet.client_dtype == "float32"
