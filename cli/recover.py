"""`llmprune recover`: federated LoRA recovery of a pruned checkpoint. On this machine it runs
Flower's simulation (one CPU per client); the merged model and metrics.json go to --out, each
round's adapter to OUT.rounds/ (for --resume)."""

from __future__ import annotations

from .common import emit_json, fraction, non_negative_float, positive_float, positive_int


def add_parser(sub) -> None:
    from llmprune.fedrecover.config import AGGREGATIONS

    p = sub.add_parser("recover", help="federated LoRA recovery of a pruned model (Flower simulation)", description=__doc__)
    p.add_argument("--model", required=True, help="checkpoint folder (from `llmprune compress`, or any HF model folder)")
    p.add_argument("--data", required=True, nargs="+", help="client data: files, folders or HF datasets; each is a domain")
    p.add_argument("--out", required=True, help="output folder: merged model + metrics.json")
    p.add_argument("--clients", type=positive_int, default=4, help="simulated devices (4)")
    p.add_argument("--rounds", type=positive_int, default=3, help="federated rounds (3)")
    p.add_argument("--fleet", default=None, help="TOML/JSON file of devices with memory_mb (and speed): rank and depth per device")
    p.add_argument("--partition", default="iid", help="iid | dirichlet:ALPHA | domain (iid)")
    p.add_argument("--aggregation", choices=AGGREGATIONS, default="fedavg", help="fedavg (equal ranks), hetlora or flexlora")
    p.add_argument("--fraction", type=fraction, default=1.0, help="share of clients sampled per round (1.0)")
    p.add_argument("--min-clients", type=positive_int, default=None, help="replies needed to apply a round (half the sampled)")
    p.add_argument("--local-steps", type=positive_int, default=10, help="optimizer steps per client per round (10)")
    p.add_argument("--lora-rank", type=positive_int, default=8, help="LoRA rank; with --fleet the largest rank (8)")
    p.add_argument("--lora-alpha", type=positive_float, default=None, help="LoRA alpha (2 x rank)")
    p.add_argument("--lr", type=positive_float, default=2e-4, help="client learning rate (2e-4)")
    p.add_argument("--batch-size", type=positive_int, default=4, help="windows per step (4)")
    p.add_argument("--seq-len", type=positive_int, default=256, help="tokens per window (256)")
    p.add_argument("--max-windows", type=positive_int, default=None, help="at most this many windows per data source")
    p.add_argument("--eval-data", default=None, help="server-side evaluation text (default: windows held out of --data)")
    p.add_argument("--eval-windows", type=positive_int, default=4, help="evaluation windows (4)")
    p.add_argument("--round-timeout", type=positive_float, default=600.0, help="straggler timeout per round, seconds (600)")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling, partitions, LoRA init and training (0)")
    p.add_argument("--secagg", action="store_true", help="Flower SecAgg+: the server only sees the sum of uploads")
    p.add_argument("--dp-clip", type=positive_float, default=None, help="central DP: clip each client's update to this L2 norm")
    p.add_argument("--dp-noise", type=non_negative_float, default=0.0, help="central DP: noise multiplier z (0)")
    p.add_argument("--resume", action="store_true", help="continue the run whose rounds are in OUT.rounds/")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out and earlier rounds")
    p.add_argument("--json", action="store_true", help="print metrics as JSON on stdout")
    p.set_defaults(run=run)


def run(args) -> int:
    import contextlib
    import logging
    import sys

    from llmprune.fedrecover import RecoverConfig, recover

    config = RecoverConfig(
        clients=args.clients, rounds=args.rounds, partition=args.partition, aggregation=args.aggregation,
        fraction=args.fraction, min_clients=args.min_clients, local_steps=args.local_steps, lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha, lr=args.lr, batch_size=args.batch_size, seq_len=args.seq_len,
        max_windows=args.max_windows, eval_data=args.eval_data, eval_windows=args.eval_windows, fleet=args.fleet,
        round_timeout=args.round_timeout, seed=args.seed, secagg=args.secagg, dp_clip=args.dp_clip,
        dp_noise=args.dp_noise)
    # stdout carries only the result: ray prints notes of its workers there during the run
    with contextlib.redirect_stdout(sys.stderr):
        result = recover(args.model, args.data, config, args.out, resume=args.resume, overwrite=args.overwrite,
                         verbose=args.debug)
    metrics = result.metrics
    if args.json:
        emit_json(metrics)
        return 0
    rows = metrics["rounds"]
    log = logging.getLogger("llmprune.recover")
    for row in rows:
        log.info("round %d: %d/%d clients, loss %s, ppl %s, up %.2f MB", row["round"], row["clients_returned"],
                 row["clients_sampled"], row["train_loss"], row["eval_perplexity"], row["bytes_up"] / 1e6)
    sys.stdout.write(
        f"recovered {args.model} -> {result.out} in {len(rows)} rounds: eval perplexity "
        f"{metrics['initial_eval_perplexity']} -> {metrics['final_eval_perplexity']}; "
        f"per-client upload {max(r['bytes_up_per_client_max'] for r in rows) / 1e6:.2f} MB/round "
        f"({100 * max(r['bytes_up_per_client_max'] for r in rows) / metrics['model_bytes']:.2f}% of the model)\n")
    return 0
