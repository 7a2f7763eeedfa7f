"""What a device builds in a round, when it is not the whole checkpoint: a registry of kinds, each
with its description (sent as JSON in the round's instruction), the layers it holds (whose LoRA
names go between the global model and the device's stack) and its loader.

`submodel` (FedPruner: held layers or blocks, read without touching the rest) is registered here;
a policy that needs another kind registers it from its own module (DevFT's `stage`), so the client
never asks which policy sent it: it looks the kind up."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llmprune.errors import LLMPruneError

from .client_model import load_submodel
from .submodels import Submodel


@dataclass(frozen=True)
class DeviceModelKind:
    name: str
    parse: Callable[[str], Any]                 # JSON text -> description
    held: Callable[[Any], Submodel]              # description -> the layers the device's stack holds
    load: Callable[..., Any]                     # (folder, description, dtype=, embedding=) -> model


DEVICE_MODELS: dict[str, DeviceModelKind] = {}


def register_device_model(kind: DeviceModelKind) -> DeviceModelKind:
    if kind.name in DEVICE_MODELS:
        raise ValueError(f"device model kind '{kind.name}' is already registered")
    DEVICE_MODELS[kind.name] = kind
    return kind


@dataclass(frozen=True)
class DeviceModel:
    """One device's model of one round: a registered kind and its description."""

    kind: str
    spec: Any

    @property
    def entry(self) -> DeviceModelKind:
        return DEVICE_MODELS[self.kind]

    def held(self) -> Submodel:
        return self.entry.held(self.spec)

    def modules(self, shapes: dict[str, tuple[int, int]]) -> list[str]:
        """The global adapter's modules this device trains."""
        return self.held().modules(shapes)

    def describe(self) -> dict:
        """The device's line in metrics.json: the layers (and blocks) it holds."""
        return self.held().to_dict()

    def to_json(self) -> str:
        return self.spec.to_json()

    def load(self, folder: str | os.PathLike, dtype, embedding: str):
        return self.entry.load(folder, self.spec, dtype=dtype, embedding=embedding)

    @classmethod
    def submodel(cls, submodel: Submodel) -> DeviceModel:
        return cls("submodel", submodel)

    @classmethod
    def from_message(cls, kind: str, text: str) -> DeviceModel:
        if kind not in DEVICE_MODELS:
            raise LLMPruneError(f"the server asked for a device model of unknown kind '{kind}'",
                                "run the same llmprune version on the server and the devices")
        return cls(kind, DEVICE_MODELS[kind].parse(text))


register_device_model(DeviceModelKind("submodel", Submodel.from_json, lambda sub: sub, load_submodel))
