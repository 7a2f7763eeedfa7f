"""Failure injection for tests and drills: `crash:P` raises in client P, `delay:P:S` makes it S
seconds late, `exit:P` kills its process (a device vanishing mid-round); `@R` limits a fault to
round R. Written as text in the config (`crash:1@2,delay:0:5`), parsed once into Fault values."""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass

KINDS = ("crash", "delay", "exit")
_FORMS = "crash:PID, delay:PID:SECONDS or exit:PID, each with an optional @ROUND"


@dataclass(frozen=True)
class Fault:
    kind: str                   # crash | delay | exit
    partition: int              # the client (partition id) it hits
    seconds: float = 0.0        # delay only
    round: int | None = None    # only this round, else every round

    def __str__(self) -> str:
        text = f"{self.kind}:{self.partition}" + (f":{self.seconds!r}" if self.kind == "delay" else "")
        return text + (f"@{self.round}" if self.round is not None else "")

    def hits(self, partition: int, server_round: int) -> bool:
        return self.partition == partition and self.round in (None, server_round)


def parse_faults(text: str | tuple) -> tuple[Fault, ...]:
    """'crash:1@2,delay:0:5' -> (Fault('crash', 1, round=2), Fault('delay', 0, 5.0)); Fault values pass."""
    if isinstance(text, tuple):
        return tuple(f if isinstance(f, Fault) else _one(str(f)) for f in text)
    return tuple(_one(item) for item in (s.strip() for s in str(text).split(",")) if item)


def _one(item: str) -> Fault:
    body, at, only_round = item.partition("@")
    kind, _, rest = body.partition(":")
    target, _, arg = rest.partition(":")
    try:
        if kind not in KINDS or (kind == "delay") != bool(arg):
            raise ValueError
        return Fault(kind, int(target), float(arg) if arg else 0.0, int(only_round) if at else None)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad fault '{item}' (use {_FORMS})") from None


def inject(faults: tuple[Fault, ...], partition: int, server_round: int) -> None:
    """Play the faults that hit this client in this round."""
    for fault in faults:
        if not fault.hits(partition, server_round):
            continue
        if fault.kind == "crash":
            raise RuntimeError(f"injected crash in client {partition}")
        if fault.kind == "delay":
            time.sleep(fault.seconds)
        if fault.kind == "exit":
            os._exit(17)
