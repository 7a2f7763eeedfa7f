"""Deploying federated recovery on a real fleet (see docs/fleet.md).

The Flower app project that `flwr run` takes ships inside the package: `app_dir()` is the folder
holding its `pyproject.toml` (`[tool.flwr.app]`: the ServerApp/ClientApp references and every
run-config key with its default). On an installed package:

    flwr run "$(python -c 'import llmprune.fedrecover.deploy as d; print(d.app_dir())')" my-superlink \\
        --run-config "model='/srv/pruned' out='/srv/recovered' clients=2 rounds=3"

Helpers here build the pieces the commands take: the run-config defaults (which the shipped
pyproject.toml must equal), `--run-config` / `--node-config` strings, and a SuperLink connection
for the Flower configuration file."""

from __future__ import annotations

import logging
from pathlib import Path

from .config import RecoverConfig, RunSettings

log = logging.getLogger(__name__)

APP_DIR = Path(__file__).resolve().parent / "app"

def app_dir() -> Path:
    """The Flower app project folder (`flwr run APP_DIR SUPERLINK`)."""
    return APP_DIR


def run_config_defaults() -> dict:
    """Every run-config key the apps read, with its default: what `[tool.flwr.app.config]` in
    the app's pyproject.toml holds once Flower flattens its tables (a test checks they agree):
    the sections' keys, every registered policy's keys (`policy.bandit.arm-sizes`), the run's."""
    from .policies import POLICIES

    out = {**RecoverConfig().to_run_config(), **RunSettings().to_run_config()}
    for cls in POLICIES.values():
        out.update(_policy_defaults(cls))
    return out


def _policy_defaults(policy_cls) -> dict:
    """A policy's run-config keys with their defaults (its config built without validation: some
    policies require a setting that has no default)."""
    import dataclasses

    from .config import run_config_value

    out = {}
    for f in dataclasses.fields(policy_cls.config_class):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        out[f"policy.{policy_cls.name}.{f.name.replace('_', '-')}"] = run_config_value(default)
    return out


def app_config_toml() -> str:
    """The `[tool.flwr.app.config]` tables of the app's pyproject.toml, generated from the fields:
    every key with its default and its help (and what '' stands for) as a comment. Flower flattens
    the tables into the dotted keys the apps read (`[...config.training] rounds = 3` is `training.rounds`)."""
    import dataclasses

    from .config import SECTIONS, RecoverConfig
    from .policies import POLICIES

    def lines_of(obj_cls, values: dict, prefix: str) -> list[str]:
        out = []
        for f in dataclasses.fields(obj_cls):
            if obj_cls is RecoverConfig and f.name in (*SECTIONS, "policy"):
                continue
            key = f.name.replace("_", "-")
            value = values[f"{prefix}{key}"]
            note = f.metadata.get("default_text")
            comment = f.metadata["help"] + (f" ('' = {note})" if note and value == "" else "")
            out.append(f"{key} = {_toml_value(value)}  # {comment}")
        return out

    values = run_config_defaults()
    lines = ["[tool.flwr.app.config]"]
    lines += lines_of(RecoverConfig, values, "") + lines_of(RunSettings, values, "")
    for section, cls in SECTIONS.items():
        lines += ["", f"[tool.flwr.app.config.{section}]"] + lines_of(cls, values, f"{section}.")
    lines += ["", "[tool.flwr.app.config.policy]",
              f"name = 'plan'  # who trains what each round: {', '.join(POLICIES)} (docs/recover.md)"]
    for name, cls in POLICIES.items():
        body = lines_of(cls.config_class, values, f"policy.{name}.")
        if body:
            lines += ["", f"[tool.flwr.app.config.policy.{name}]"] + body
    return "\n".join(lines) + "\n"


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    if "'" in text:
        if '"' in text or "\\" in text:
            raise ValueError(f"cannot quote {text!r} for a Flower config string")
        return f'"{text}"'
    return f"'{text}'"


def config_string(values: dict) -> str:
    """`key=value` pairs as `flwr run --run-config` and `flower-supernode --node-config` parse
    them: space-separated, strings quoted (TOML literal strings, so paths keep backslashes)."""
    return " ".join(f"{key}={_toml_value(value)}" for key, value in values.items())


def run_config_overrides(model: str | Path, out: str | Path, config: RecoverConfig | None = None, **extra) -> str:
    """The `--run-config` string for a fleet run: the checkpoint on the server, the output
    folder, and the RecoverConfig fields that differ from the defaults (`extra` adds keys such
    as resume=True; underscores become dashes)."""
    defaults = run_config_defaults()
    chosen = (config or RecoverConfig()).to_run_config()
    values = {"model": str(model), "out": str(out)}
    values.update({k: v for k, v in chosen.items() if k in defaults and v != defaults[k]})
    values.update({k.replace("_", "-"): v for k, v in extra.items()})
    unknown = set(values) - set(run_config_defaults())
    if unknown:
        raise ValueError(f"not run-config keys of the app: {', '.join(sorted(unknown))}")
    return config_string(values)


def node_config(partition_id: int, num_partitions: int, data_path: str | Path, *,
                model_path: str | Path | None = None, device: str | None = None) -> str:
    """The `--node-config` string of one SuperNode: which client it is and where its own data
    (and optionally its copy of the checkpoint, and its fleet-file device name) live."""
    values: dict = {"partition-id": partition_id, "num-partitions": num_partitions, "data-path": str(data_path)}
    if model_path is not None:
        values["model-path"] = str(model_path)
    if device is not None:
        values["device"] = device
    return config_string(values)


def superlink_connection_toml(name: str, address: str, *, root_certificates: str | Path | None = None) -> str:
    """A `[superlink.NAME]` table for the Flower configuration file ($FLWR_HOME/config.toml,
    ~/.flwr/config.toml by default) that `flwr run APP NAME` and `flwr supernode register` read.
    Without root certificates the connection is insecure (no TLS)."""
    lines = [f"[superlink.{name}]", f"address = {_toml_value(address)}"]
    if root_certificates is None:
        lines.append("insecure = true")
    else:
        lines.append(f"root-certificates = {_toml_value(str(Path(root_certificates).resolve()))}")
    return "\n".join(lines) + "\n"
