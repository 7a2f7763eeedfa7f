"""SecAgg+ rounds (Flower's SecAggPlusWorkflow and secaggplus_mod): the server learns only the
weighted sum of the clients' uploads, never one client's adapter.

Secure aggregation can only add vectors of one layout, so in a SecAgg+ round every client
uploads the global layout: for every module any client trains, A and B zero-padded to the global
rank (zeros for modules it does not hold) and a one-element holder flag. The unmasked sum,
divided by the summed holder flags, is exactly the per-module, example-weighted HetLoRA/FedAvg
average of the clients that hold the module. (flexlora averages products B·A, which a sum of
factors cannot give: config validation refuses that combination.)

Flower's SecAgg+ workflow speaks the legacy fit protocol, so the round is driven through a
LegacyContext with a small legacy strategy that turns our per-client views into FitIns."""

from __future__ import annotations

import json
import logging

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.server.strategy import Strategy as LegacyStrategy

log = logging.getLogger(__name__)
HOLDER = "holder"


def upload_layout(global_arrays: dict[str, np.ndarray]) -> list[tuple[str, int, int]]:
    """(module, out, in) of every module of the global adapter, in a fixed order."""
    from .lora import modules_of

    return [(m, global_arrays[f"{m}.B"].shape[0], global_arrays[f"{m}.A"].shape[1]) for m in modules_of(global_arrays)]


def padded_upload(trained: dict[str, np.ndarray], layout: list[tuple[str, int, int]], rank: int) -> list[np.ndarray]:
    """A client's adapter in the global layout: per module A [rank, in], B [out, rank], holder [1]."""
    from .aggregation import pad_rank

    out = []
    for module, out_f, in_f in layout:
        if f"{module}.A" in trained:
            a, b = pad_rank(trained[f"{module}.A"], trained[f"{module}.B"], rank)
            held = 1.0
        else:
            a, b, held = np.zeros((rank, in_f), np.float32), np.zeros((out_f, rank), np.float32), 0.0
        out += [a, b, np.array([held], np.float32)]
    return out


def unpack_average(vectors: list[np.ndarray], layout: list[tuple[str, int, int]],
                   previous: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The weighted average per module from the securely aggregated (weighted-mean) vectors."""
    out = dict(previous)
    for i, (module, _, _) in enumerate(layout):
        a, b, held = vectors[3 * i], vectors[3 * i + 1], float(vectors[3 * i + 2][0])
        if held > 1e-6:  # the held share of the total weight; below it nobody held the module
            out[f"{module}.A"] = (a / held).astype(np.float32)
            out[f"{module}.B"] = (b / held).astype(np.float32)
    return out


class _LegacyRound(LegacyStrategy):
    def __init__(self, views: dict[int, dict[str, np.ndarray]], configs: dict[int, dict], layout, rank: int) -> None:
        self.views, self.configs, self.layout, self.rank = views, configs, layout, rank
        self.vectors: list[np.ndarray] | None = None
        self.client_metrics: list[dict] = []

    def initialize_parameters(self, client_manager):
        return None

    def configure_fit(self, server_round, parameters, client_manager):
        from flwr.common import FitIns, ndarrays_to_parameters

        proxies = client_manager.all()
        out = []
        for node, view in self.views.items():
            names = sorted(view)
            config = dict(self.configs[node])
            config.update({"names": ",".join(names), "layout": json.dumps(self.layout), "global-rank": self.rank})
            out.append((proxies[str(node)], FitIns(ndarrays_to_parameters([view[n] for n in names]), config)))
        return out

    def aggregate_fit(self, server_round, results, failures):
        from flwr.common import parameters_to_ndarrays

        if results:
            self.vectors = parameters_to_ndarrays(results[0][1].parameters)
            self.client_metrics = [dict(res.metrics, **{"num-examples": res.num_examples}) for _, res in results]
        return None, {}

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


def run_secagg_round(grid, context: Context, messages: list[Message], global_arrays: dict[str, np.ndarray], rank: int,
                     threshold: int, max_weight: float, timeout: float):
    """One SecAgg+ round over the nodes `messages` address (the plain round's per-client views
    and configs). Returns (new global arrays or None, per-client metrics, bytes uploaded)."""
    from .messages import TrainInstruction

    layout = upload_layout(global_arrays)
    sent = {m.metadata.dst_node_id: TrainInstruction.from_message(m) for m in messages}
    views = {node: arrays for node, (_, arrays) in sent.items()}
    configs = {node: instruction.to_config() for node, (instruction, _) in sent.items()}
    strategy = _LegacyRound(views, configs, layout, rank)
    server_round = next(iter(sent.values()))[0].server_round
    workflow_round(grid, context, strategy, list(views), server_round, threshold, max_weight, timeout)
    if strategy.vectors is None:
        return None, strategy.client_metrics, 0
    per_client = sum(v.size for v in strategy.vectors) * 4
    average = unpack_average(strategy.vectors, layout, global_arrays)
    return average, strategy.client_metrics, per_client * len(strategy.client_metrics)


class _LegacyCounts(_LegacyRound):
    """The counting round of a fleet-chosen vocabulary as a legacy fit: no parameters down, the
    count vector up (weight 1 each, so the masked mean times the devices is the exact sum)."""

    def __init__(self, nodes: list[int], config: dict) -> None:
        super().__init__({node: {} for node in nodes}, {node: config for node in nodes}, [], 0)

    def configure_fit(self, server_round, parameters, client_manager):
        from flwr.common import FitIns, ndarrays_to_parameters

        proxies = client_manager.all()
        return [(proxies[str(node)], FitIns(ndarrays_to_parameters([]), dict(self.configs[node]))) for node in self.views]


def run_secagg_counts(grid, context: Context, nodes: list[int], config: dict, clip: int, threshold: int,
                      timeout: float | None) -> tuple[np.ndarray | None, int]:
    """The devices' count vectors summed under SecAgg+ (the server sees the sum only). Counts are
    integers in [-clip, clip]: with clipping range `clip` and a quantization range of 2 x clip each
    quantizes to itself, so the sum is exact. Returns (the sum or None, devices summed)."""
    strategy = _LegacyCounts(nodes, config)
    workflow_round(grid, context, strategy, nodes, 0, threshold=threshold, max_weight=1.0, timeout=timeout,
                   clipping_range=float(clip), quantization_range=2 * clip)
    if strategy.vectors is None:
        return None, 0
    answered = len(strategy.client_metrics)
    return np.rint(strategy.vectors[0] * answered), answered


def workflow_round(grid, context: Context, strategy: _LegacyRound, nodes, server_round: int, threshold: int,
                   max_weight: float, timeout: float | None, **ranges) -> None:
    """One round of Flower's SecAggPlusWorkflow over `nodes`, driving `strategy`."""
    from flwr.server import ServerConfig
    from flwr.server.client_manager import SimpleClientManager
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.workflow import SecAggPlusWorkflow

    manager = SimpleClientManager()
    for node in nodes:
        manager.register(GridClientProxy(node_id=node, grid=grid, run_id=grid.run.run_id))
    legacy = LegacyContext(context, config=ServerConfig(num_rounds=1), strategy=strategy, client_manager=manager)
    legacy.state.config_records["config"] = ConfigRecord({"current_round": server_round})
    legacy.state.array_records["parameters"] = ArrayRecord()
    # num_shares as a fraction: every sampled client shares its mask keys with all the others.
    workflow = SecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=max(2, threshold),
                                  max_weight=max_weight, timeout=timeout, **ranges)
    workflow(grid, legacy)


# -- client side ---------------------------------------------------------------------------------
def is_legacy_fit(msg: Message) -> bool:
    return "fitins.config" in msg.content.config_records


def fit_config(msg: Message) -> dict:
    """The flat config of a SecAgg+ round's fit message."""
    import flwr.compat.common.recorddict_compat as compat

    return dict(compat.recorddict_to_fitins(msg.content, keep_input=True).config)


def secagg_counts(msg: Message, count_fn) -> Message:
    """Answer a SecAgg+ counting round: `count_fn(config) -> (partition id, counts)`; the counts go
    up as the one parameter of a FitRes of weight 1 (secaggplus_mod masks them before they leave)."""
    import flwr.compat.common.recorddict_compat as compat
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

    pid, counts = count_fn(fit_config(msg))
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([counts]), 1, {"partition-id": pid})
    return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)


def secagg_train(msg: Message, train_fn) -> Message:
    """Answer a SecAgg+ fit: decode the named view and the instruction, train with
    `train_fn(instruction, arrays) -> TrainReply`, reply with the padded global layout as FitRes
    (secaggplus_mod masks it before it leaves)."""
    import flwr.compat.common.recorddict_compat as compat
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

    from .messages import TrainInstruction

    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    config = dict(fitins.config)
    arrays = dict(zip(str(config["names"]).split(","), parameters_to_ndarrays(fitins.parameters)))
    reply = train_fn(TrainInstruction.from_config(config), arrays)
    layout = [tuple(x) for x in json.loads(str(config["layout"]))]
    upload = padded_upload(reply.arrays, layout, int(config["global-rank"]))
    metrics = reply.to_metrics()
    examples = int(metrics.pop("num-examples"))
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(upload), examples, metrics)
    return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)
