"""The Flower ServerApp: the whole federated run on the server.

Load the checkpoint, wait for the SuperNodes and ask each which client it is, let the policy open
the run, plan the fleet (the same planner `llmprune recover` runs before Flower starts), start from
round 0 or the saved round, run the strategy's rounds, write the merged model and metrics.json."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from llmprune.errors import LLMPruneError

from .config import RecoverConfig, RunSettings, parse_run_config
from .distill import open_distillation
from .fleet_vocab import open_fleet_vocabulary
from .lora import modules_of
from .messages import Identity, IdentityQuery
from .policies import get_policy
from .state import RoundState, check_policy_state, load_state, save_state
from .strategy import LoraStrategy, RunContext
from .transport import PlainTransport, RunStopped, SecAggTransport, send_and_receive

__all__ = ["SERVER_ROOT_ENV", "build_server_app", "discover", "run_server", "server_paths", "write_recovered"]
log = logging.getLogger(__name__)
# On a fleet the run config comes from whoever can reach the Control API: the server reads and
# writes only inside this folder, which the operator sets on the server machine.
SERVER_ROOT_ENV = "LLMPRUNE_SERVER_ROOT"


def wait_for_nodes(grid: Grid, count: int, timeout: float, stop: threading.Event) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= count:
            return nodes
        if time.monotonic() > deadline:
            raise LLMPruneError(f"only {len(nodes)} of {count} SuperNodes connected within {timeout:.0f} s",
                                "start more flower-supernode processes, or lower --clients")
        if stop.is_set():
            raise RunStopped("interrupted")
        time.sleep(0.5)


def discover(grid: Grid, nodes: list[int], timeout: float | None, stop: threading.Event | None = None) -> dict[int, dict]:
    """Ask every node which client it is (partition id, example count, device name); timeout
    None waits for every answer (simulation)."""
    found = {}
    for reply in send_and_receive(grid, [IdentityQuery().to_message(n) for n in nodes], timeout, stop):
        node = reply.metadata.src_node_id
        if reply.has_error():
            log.warning("node %d failed to identify itself: %s", node, reply.error.reason.splitlines()[-1][:200])
            continue
        identity = Identity.from_message(reply)
        found[node] = {"partition-id": identity.partition_id, "num-examples": identity.num_examples,
                       "device": identity.device}
    if not found:
        raise LLMPruneError("no SuperNode answered", "check the SuperNodes' logs (data or model missing?)")
    return found


def eval_windows(cfg: RecoverConfig, settings: RunSettings, tokenizer, vocabulary=None):
    """The server's evaluation windows, in the tokenizer's ids (a fleet-chosen vocabulary re-reads
    the held-out windows of a simulation's data)."""

    if cfg.data.eval_data:
        from llmprune.data import domain_windows

        return domain_windows(tokenizer, cfg.data.eval_data, cfg.data.seq_len, cfg.data.eval_windows)
    if settings.data_cache:
        from .partition import ClientData

        windows = ClientData.load(settings.data_cache).eval_windows
        return windows if vocabulary is None else vocabulary.windows(windows, cfg.data.seq_len, cfg.data.eval_windows)
    return None


def start_state(run: RunContext) -> RoundState:
    """The saved state to continue with --resume, else round 0 at the seeded initial adapter."""
    init, settings = run.plan.init, run.settings
    if not settings.resume:
        return RoundState(round=0, arrays=init, rounds=[], initial_eval_perplexity=run.evaluate(init))
    state = load_state(settings.state_path, run.cfg, model=settings.model, expected=init)
    log.info("resuming after round %d from %s", state.round, settings.state_path)
    # safetensors gives the names sorted: back to the run's order, in which DP noise is drawn
    state.arrays = {**{k: state.arrays[k] for k in init if k in state.arrays}, **state.arrays}
    return state


def transport_for(run: RunContext, policy):
    """How the rounds travel: SecAgg+ when asked, else plainly, unless the policy carries its rounds
    itself (split training's per-step exchanges)."""
    timeout = run.cfg.fleet.round_deadline(run.simulation)
    if run.cfg.privacy.secagg:
        max_weight = float(max(info["num-examples"] for info in run.nodes.values()) + 1)
        return SecAggTransport(run.grid, run.flower, max_weight, timeout)
    return policy.transport(run, PlainTransport(run.grid, timeout, run.stop), timeout)


def open_run(grid: Grid, context: Context, overrides: dict | None, simulation: bool,
             stop: threading.Event) -> tuple[RunContext, object]:
    """The run's context up to round 1: config, model, nodes, the policy opened, the fleet plan,
    the round state, the policy started (and continued from the saved state)."""
    import llmprune

    cfg, settings = parse_run_config({**dict(context.run_config), **(overrides or {})})
    if not simulation:
        cfg, settings = server_paths(cfg, settings, os.environ.get(SERVER_ROOT_ENV))
    run = RunContext(cfg, settings, grid, context, simulation, stop)
    run.model, run.tokenizer = llmprune.load(settings.model)
    run.model.eval()
    policy = get_policy(cfg.policy.name)(cfg)
    policy.open(run)
    nodes = wait_for_nodes(grid, cfg.fleet.clients, cfg.fleet.node_timeout, stop)
    # a client's first answer waits for its process to start and load data: the connect timeout,
    # not the (possibly short) round timeout; in simulation, for every client
    deadline = cfg.fleet.round_deadline(simulation)
    run.nodes = discover(grid, nodes, None if deadline is None else max(cfg.fleet.node_timeout, deadline), stop)
    run.replan(policy)
    if cfg.vocab.size is not None:        # before round 1 the fleet counts, the server trims (fleet_vocab.py)
        run.vocabulary = open_fleet_vocabulary(run)
    run.windows = eval_windows(cfg, settings, run.tokenizer, run.vocabulary)
    run.distillation = open_distillation(cfg, settings.model, run.tokenizer, run.windows)
    run.state = start_state(run)
    if settings.resume:
        check_policy_state(policy, run.state, run.model, settings.state_path)
    policy.start(run)
    policy.load_state_dict(run.state.policy or {})
    return run, policy


def run_server(grid: Grid, context: Context, overrides: dict | None = None, *, simulation: bool = False,
               stop: threading.Event | None = None) -> None:
    """The whole federated run (the ServerApp's main). `simulation` (set by `llmprune recover`,
    never by a run config): the local user's paths are taken as given, and rounds wait for every
    sampled client unless --round-timeout is given."""
    from tqdm import tqdm

    from llmprune.memory import peak_rss_mb

    started = time.perf_counter()
    run, policy = open_run(grid, context, overrides, simulation, stop or threading.Event())
    cfg, settings = run.cfg, run.settings
    model_bytes = int(sum(p.numel() * p.element_size() for p in run.model.parameters()))
    strategy = LoraStrategy(run, policy, transport_for(run, policy),
                            checkpoint=lambda state: save_state(settings.state_path, state, cfg, model=settings.model))
    done, total = run.state.round, cfg.training.rounds
    # a fleet's console is `flwr log`, read line by line: the round lines, not a redrawn bar
    strategy.run_rounds(range(done + 1, total + 1), lambda it: tqdm(it, desc="rounds", unit="round", initial=done,
                                                                    total=total, disable=not simulation))
    state = run.state
    check_some_round_applied(state.rounds, cfg.fleet.round_deadline(simulation), settings.state_path)
    metrics = {
        "rounds": state.rounds, "devices": run.plan.devices, "refused": run.plan.refused,
        "submodels": None, "prune_tune": None, **policy.report(),
        "initial_eval_perplexity": state.initial_eval_perplexity,
        "final_eval_perplexity": state.rounds[-1]["eval_perplexity"] if state.rounds else state.initial_eval_perplexity,
        "model_bytes": model_bytes, "adapter_bytes": int(sum(a.nbytes for a in state.arrays.values())),
        "aggregation": cfg.training.aggregation, "policy": cfg.policy.name,
        "distill": run.distillation.report() if run.distillation is not None else None,
        "vocabulary": run.vocabulary.report if run.vocabulary is not None else None,
        "config": {**cfg.to_run_config(), **settings.to_run_config()},
        "server_seconds": round(time.perf_counter() - started, 2), "server_peak_rss_mb": round(peak_rss_mb(), 1),
    }
    write_recovered(run.model, run.tokenizer, state.arrays, cfg.scale, settings.out_dir, metrics,
                    run.model_path or settings.model, overwrite=settings.overwrite, rows=state.rows,
                    vocabulary=run.vocabulary.vocab_json if run.vocabulary is not None else None)
    context.state["metrics"] = ConfigRecord({"json": json.dumps(metrics, default=str)})


def server_paths(cfg: RecoverConfig, settings: RunSettings, root: str | None) -> tuple[RecoverConfig, RunSettings]:
    """On a fleet, the server-side paths of a run config (model, out, state-dir, fleet, eval-data,
    a teacher folder, distill data)
    resolved inside the operator's root (LLMPRUNE_SERVER_ROOT; relative paths are relative to it);
    anything outside it, a data-cache, or an overwrite of a folder that is not an earlier output
    is refused with one line."""
    from dataclasses import replace

    if not root:
        raise LLMPruneError(f"this server has no {SERVER_ROOT_ENV}: a run config may not choose server paths",
                            f"set {SERVER_ROOT_ENV}=/srv/llmprune (the folder runs may read and write) in the "
                            "environment of flower-superlink, and restart it")
    base = Path(root).resolve()
    if not base.is_dir():
        raise LLMPruneError(f"{SERVER_ROOT_ENV} '{root}' is not a folder", f"create it or point {SERVER_ROOT_ENV} at one")
    if settings.data_cache:
        raise LLMPruneError("run-config key 'data-cache' is for the simulation only", "leave data-cache empty on a fleet")

    def inside(key: str, value: str, output: bool = False) -> str:
        path = (base / value).resolve()        # an absolute value stays absolute; symlinks and .. are resolved
        # an output must lie below the root, not be it: its temporary and .rounds siblings go beside it
        if not path.is_relative_to(base) or (output and path == base):
            where = "the server root itself" if path == base else "outside the server root"
            raise LLMPruneError(f"run-config key '{key}' = '{value}' is {where} '{base}'",
                                f"use a path inside {SERVER_ROOT_ENV} ('{base}'), e.g. a relative one")
        return str(path)

    settings = replace(settings, model=inside("model", settings.model or "."),
                       out=inside("out", settings.out or "recovered", output=True),
                       state_dir=inside("state-dir", settings.state_dir, output=True) if settings.state_dir else "")
    fleet = replace(cfg.fleet, file=inside("fleet.file", cfg.fleet.file) if cfg.fleet.file else None)
    data = replace(cfg.data, eval_data=inside("data.eval-data", cfg.data.eval_data) if cfg.data.eval_data else None)
    teacher = cfg.distill.teacher
    if teacher is not None and not _names_no_server_path(teacher, base):
        teacher = inside("distill.teacher", teacher)
    distill = replace(cfg.distill, teacher=teacher,
                      data=inside("distill.data", cfg.distill.data) if cfg.distill.data else None)
    cfg = replace(cfg, fleet=fleet, data=data, distill=distill)
    out = settings.out_dir
    if settings.overwrite and out.exists() and any(out.iterdir()) and not (out / "metrics.json").is_file():
        raise LLMPruneError(f"overwrite=true would replace '{out}', which is not an output of llmprune recover",
                            "choose another out, or remove that folder on the server yourself")
    return cfg, settings


def _names_no_server_path(teacher: str, base: Path) -> bool:
    """A teacher spec that is not a path on the server: 'source' (the checkpoint names it), a
    packaged model, or a hub id (org/name) that is no folder under the root."""
    from llmprune.models import PACKAGED_MODELS

    from .distill import SOURCE

    if teacher == SOURCE or teacher in PACKAGED_MODELS:
        return True
    return teacher.count("/") == 1 and not teacher.startswith((".", "/", "~")) and not (base / teacher).exists()


def check_some_round_applied(rows: list[dict], timeout: float | None, state_path: Path) -> None:
    """A run in which no round changed the adapter would write the input model as "recovered":
    refuse with one line (the per-round warnings above say what failed)."""
    if any(row["applied"] for row in rows):
        return
    got = ", ".join(f"{row['clients_returned']}/{row['clients_sampled']}" for row in rows)
    waited = "" if timeout is None else f" within the {timeout:.0f} s round timeout"
    raise LLMPruneError(f"no round was applied (clients returned{waited} per round: {got}), so no recovered model "
                        "was written", "see the warnings above for why clients failed; on a fleet raise round-timeout "
                        f"or lower min-clients; the rounds are in '{state_path}' (start over with --overwrite)")


def write_recovered(model, tokenizer, arrays, scale: float, out: Path, metrics: dict, source: str, overwrite: bool,
                    rows: dict | None = None, vocabulary: dict | None = None) -> None:
    """Fold the adapter (and the trained embedding rows) into the weights and write a checkpoint
    like compress's, with metrics.json (and the fleet's vocabulary.json when it chose one)."""
    from llmprune.checkpoint import REPORT_FILE, VOCAB_FILE, carried_files, save_pruned

    from .lora import merge_lora
    from .rows import set_rows

    set_rows(model, rows)
    merge_lora(model, arrays, scale)
    report_path = Path(source) / REPORT_FILE
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    report["recovery"] = {k: metrics[k] for k in ("initial_eval_perplexity", "final_eval_perplexity", "aggregation")}
    report["recovery"].update(source=str(source), rounds=len(metrics["rounds"]),
                              modules=len(modules_of(arrays)), config=metrics.get("config"))
    files = {"metrics.json": json.dumps(metrics, indent=2, default=str), **carried_files(source)}
    if vocabulary is not None:
        files[VOCAB_FILE] = json.dumps(vocabulary, indent=1) + "\n"
    save_pruned(model, tokenizer, out, report=report, overwrite=overwrite, extra_files=files)


def log_to_console() -> None:
    """On a fleet the ServerApp runs in Flower's process, where `flwr log` shows what it writes to
    its console: llmprune's INFO lines (planning, each round) go there unless the host process set
    up logging itself."""
    import sys

    package = logging.getLogger("llmprune")
    if logging.getLogger().handlers or package.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    package.addHandler(handler)
    package.setLevel(logging.INFO)


def build_server_app(overrides: dict | None = None, *, simulation: bool = False,
                     stop: threading.Event | None = None) -> ServerApp:
    """The ServerApp; `stop` (a simulation's) ends its waits when the run is interrupted."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if not simulation:
            log_to_console()
        run_server(grid, context, overrides, simulation=simulation, stop=stop)

    return app


app = build_server_app()
