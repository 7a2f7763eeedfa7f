"""`llmprune eval`: perplexity (and optional zero-shot tasks) of a model on text."""

from __future__ import annotations

import logging

from .common import add_model_argument, emit_json, positive_int, torch_dtype

log = logging.getLogger("llmprune.cli")


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="perplexity of a model on text", description=__doc__)
    add_model_argument(p)
    p.add_argument("--data", required=True, help=".txt/.jsonl file, folder, HF dataset name[:config][:split], or 'self'")
    p.add_argument("--seq-len", type=positive_int, default=512, help="tokens per window, BOS not counted (512)")
    p.add_argument("--max-windows", type=positive_int, default=None, help="use the first N windows (all)")
    p.add_argument("--batch-size", type=positive_int, default=1, help="windows per forward pass (1)")
    p.add_argument("--tasks", default=None, help="comma-separated lm-evaluation-harness tasks (needs llmprune[eval])")
    p.add_argument("--seed", type=int, default=0, help="seed for --data self (0)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(run=run)


def run(args) -> int:
    from llmprune import LLMPruneError, load_model, load_texts, load_tokenizer, perplexity, resolve_model_spec, token_windows
    from llmprune.evaluate import check_seq_len, zero_shot

    source = resolve_model_spec(args.model)
    if args.tasks:
        zero_shot.require()
    model = load_model(source, dtype=torch_dtype(args.dtype))
    tokenizer = load_tokenizer(source)
    check_seq_len(model.config, args.seq_len)
    texts = load_texts(args.data, model=model, tokenizer=tokenizer, seed=args.seed)
    windows = token_windows(tokenizer, texts, args.seq_len, args.max_windows)
    result = perplexity(model, windows, batch_size=args.batch_size, tokenizer=tokenizer).to_dict()
    result.update(model=args.model or "gemma-3-270m", data=args.data, seq_len=args.seq_len)
    if args.tasks:
        result["tasks"] = zero_shot.run(model, tokenizer, [t for t in args.tasks.split(",") if t])
    if args.json:
        emit_json(result)
    else:
        text = "" if result["bits_per_byte"] is None else f" | {result['bits_per_byte']:.4f} bits/byte"
        if result["word_perplexity"] is not None:
            text += f" | word perplexity {result['word_perplexity']:.2f}"
        print(
            f"perplexity {result['perplexity']:.3f} on {result['tokens']} tokens ({result['windows']} windows"
            f" × {args.seq_len}){text} | {result['tokens_per_s']:.1f} tokens/s | {result['seconds']:.1f} s"
            f" | peak RSS {result['peak_rss_mb']:.0f} MiB"
        )
        for task, score in result.get("tasks", {}).items():
            print(f"{task}: {score}")
    if not result["perplexity"] < float("inf"):
        raise LLMPruneError("perplexity is not finite", "the model's weights may be broken; check the checkpoint")
    return 0
