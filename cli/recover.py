"""`llmprune recover`: federated LoRA recovery of a pruned checkpoint. On this machine it runs
Flower's simulation (one CPU per client); the merged model and metrics.json go to --out, each
round's adapter to OUT.rounds/ (for --resume)."""

from __future__ import annotations

import argparse

from .common import add_push_argument, emit_json

EXAMPLES = """examples:
  # 4 simulated devices, 3 rounds, every device trains LoRA on every layer
  llmprune recover --model pruned-gemma --data ../shared/data/wikitext2/wiki.valid.tokens --out recovered

  # a fleet of devices with memory budgets: rank and depth per device, mixed ranks averaged by HetLoRA
  llmprune recover --model pruned-gemma --data wiki.txt docs/ --out recovered --fleet fleet.toml \\
      --aggregation hetlora --partition domain --rounds 5

  # weak devices train memory-sized submodels, chosen per device by a bandit (FedSpine)
  llmprune recover --model pruned-gemma --data wiki.txt --out recovered --fleet fleet.toml --policy bandit \\
      --aggregation hetlora --client-dtype bfloat16 --client-embedding int8 --eval-data held-out.txt
"""


def add_parser(sub) -> None:
    from llmprune.fedrecover.config import SECTIONS, FleetConfig, RecoverConfig, TrainingConfig
    from llmprune.fedrecover.policies import POLICIES
    from llmprune.options import add_config_arguments, cli_fields, dest_of

    p = sub.add_parser("recover", help="federated LoRA recovery of a pruned model (Flower simulation)",
                       description=__doc__, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    first = p.add_argument_group("the essentials")
    first.add_argument("--model", required=True, help="checkpoint folder (from `llmprune compress`, or any HF model folder)")
    first.add_argument("--data", required=True, nargs="+", help="client data: files, folders or HF datasets; each is a domain")
    first.add_argument("--out", required=True, help="output folder: merged model + metrics.json")
    essentials = ("clients", "rounds")
    for cls in (FleetConfig, TrainingConfig):
        add_config_arguments(first, cls, exclude=tuple(f.name for f in cli_fields(cls) if f.name not in essentials))
    policy = p.add_argument_group("who trains what each round: the policy and its own settings")
    policy.add_argument("--policy", choices=tuple(POLICIES), default=None, metavar="NAME",
                        help="; ".join(f"{name}: {cls.summary}" for name, cls in POLICIES.items()) + " (default: plan)")
    added = {"policy"}
    for name, cls in POLICIES.items():
        fields = [f for f in cli_fields(cls.config_class) if dest_of(f) not in added]
        if fields:
            group = p.add_argument_group(f"--policy {name}")
            add_config_arguments(group, cls.config_class, exclude=tuple(added))
            added.update(dest_of(f) for f in fields)
    for section, cls in SECTIONS.items():
        add_config_arguments(p.add_argument_group(f"{section}: {cls.__doc__.strip().rstrip('.')}"), cls,
                             exclude=essentials if cls in (FleetConfig, TrainingConfig) else ())
    add_config_arguments(p.add_argument_group("reproducibility"), RecoverConfig)
    run_group = p.add_argument_group("the run")
    run_group.add_argument("--resume", action="store_true", help="continue the run whose rounds are in OUT.rounds/")
    run_group.add_argument("--overwrite", action="store_true", help="replace a non-empty --out and earlier rounds")
    run_group.add_argument("--json", action="store_true", help="print metrics as JSON on stdout")
    add_push_argument(p)
    p.set_defaults(run=run)


def config_from_flags(args):
    """The RecoverConfig the flags describe; a setting of a policy other than --policy is refused
    naming the policy it belongs to."""
    from llmprune.errors import LLMPruneError
    from llmprune.fedrecover.config import RecoverConfig, flat_fields
    from llmprune.fedrecover.policies import POLICIES, get_policy
    from llmprune.options import cli_fields, dest_of, flag_of

    chosen = get_policy(args.policy or "plan")
    own = {dest_of(f) for f in cli_fields(chosen.config_class)}
    given = {dest: getattr(args, dest) for dest in own if getattr(args, dest, None) is not None}
    given.update({dest: getattr(args, dest) for dest, (_, f) in flat_fields().items()
                  if f.metadata.get("cli", True) and getattr(args, dest, None) is not None})
    for name, cls in POLICIES.items():
        for f in cli_fields(cls.config_class):
            if dest_of(f) not in own and getattr(args, dest_of(f), None) is not None:
                raise LLMPruneError(f"{flag_of(f)} is a setting of --policy {name}, not of --policy {chosen.name}",
                                    f"add --policy {name}, or leave {flag_of(f)} out")
    return RecoverConfig.of(policy=chosen.name, **given)


def run(args) -> int:
    import contextlib
    import sys

    from llmprune.fedrecover import recover

    config = config_from_flags(args)
    # stdout carries only the result: ray prints notes of its workers there during the run
    with contextlib.redirect_stdout(sys.stderr), _one_interrupt():
        result = recover(args.model, args.data, config, args.out, resume=args.resume, overwrite=args.overwrite,
                         verbose=args.debug)
    metrics = result.metrics
    if args.json:
        emit_json(metrics)
        return 0
    rows = metrics["rounds"]      # each round was logged as it ended
    sys.stdout.write(
        f"recovered {args.model} -> {result.out} in {len(rows)} rounds: eval perplexity "
        f"{metrics['initial_eval_perplexity']} -> {metrics['final_eval_perplexity']}; "
        f"per-client upload {max(r['bytes_up_per_client_max'] for r in rows) / 1e6:.2f} MB/round "
        f"({100 * max(r['bytes_up_per_client_max'] for r in rows) / metrics['model_bytes']:.2f}% of the model)\n")
    for row in metrics.get("refused", []):
        sys.stdout.write(f"left out: {row['reason']}\n")
    peaks = [c for r in rows for c in r.get("clients", []) if c.get("memory_mb")]
    if peaks:
        over = sorted({c["device"] for c in peaks if c["peak_rss_mb"] > c["memory_mb"]})
        sys.stdout.write(f"device peaks: {min(c['peak_rss_mb'] for c in peaks):.0f}-{max(c['peak_rss_mb'] for c in peaks):.0f}"
                         f" MB measured; {'over budget: ' + ', '.join(over) if over else 'every device within its budget'}\n")
    _write_adaptive_summary(metrics)
    return 0


def _write_adaptive_summary(metrics: dict) -> None:
    """Failed device rounds (the bandit learns from them) and prune-tune's steps, when there were any."""
    import collections
    import sys

    failed = collections.Counter(f["failed"] for r in metrics["rounds"] for f in r.get("failures", []))
    if failed:
        sys.stdout.write(f"failed device rounds: {', '.join(f'{n} {why}' for why, n in sorted(failed.items()))}\n")
    steps = (metrics.get("prune_tune") or {}).get("steps") or []
    if steps:
        sys.stdout.write(f"prune-tune: {len(steps)} step(s), decoder ratio {metrics['prune_tune']['start_ratio']:.4f} -> "
                         f"{steps[-1]['ratio_achieved']:.4f} (target {steps[-1]['ratio_target']:.4f})\n")


def _one_interrupt():
    """Ctrl-C ends the run promptly: the first SIGINT interrupts recover() (which shuts Ray down
    and cleans up), later ones are ignored; then the message, the simulation's leftover child
    processes are killed, and the process exits 130 at once — Flower's non-daemon threads would
    otherwise keep the interpreter alive."""
    import contextlib
    import signal
    import threading

    @contextlib.contextmanager
    def guard():
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def first(signum, frame):
            signal.signal(signal.SIGINT, signal.SIG_IGN)   # a second Ctrl-C: no traceback
            raise KeyboardInterrupt

        previous = signal.signal(signal.SIGINT, first)
        try:
            yield
        except KeyboardInterrupt as exc:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            _exit_interrupted(exc)
        finally:
            signal.signal(signal.SIGINT, previous)

    return guard()


def _exit_interrupted(exc: BaseException) -> None:
    import os
    import sys

    from llmprune.fedrecover.pipeline import RecoverInterrupted
    from llmprune.fedrecover.simulation import kill_children

    message = str(exc) if isinstance(exc, RecoverInterrupted) and str(exc) else "interrupted — nothing was written"
    kill_children()
    sys.__stderr__.write(f"\nllmprune recover: {message}\n")   # on its own line, after a progress bar
    sys.__stderr__.flush()
    os._exit(130)
