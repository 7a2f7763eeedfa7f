"""`llmprune info`: architecture, parameter split and per-layer shapes of a model."""

from __future__ import annotations

from .common import add_model_argument, emit_json, torch_dtype


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="architecture, parameters and layer shapes", description=__doc__)
    add_model_argument(p, positional=True)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(run=run)


def run(args) -> int:
    from llmprune import load_model, model_info
    from llmprune.paths import printable

    info = model_info(load_model(args.model, dtype=torch_dtype(args.dtype)))
    info["model"] = args.model or "gemma-3-270m"
    if args.json:
        emit_json(info)
        return 0
    p = info["parameters"]
    print(f"{printable(info['model'])}: {info['architecture']} ({info['class']}), {info['num_layers']} layers, hidden {info['hidden_size']}, vocab {info['vocab_size']}, {info['dtype']}")
    print(f"parameters {p['total']:,}: embeddings {p['embeddings']:,} | attention {p['attention']:,} | MLP {p['mlp']:,}"
          f" | norms {p['norms']:,} | LM head {p['lm_head']:,}{' (tied to embeddings)' if p['tied_embeddings'] else ''}")
    print(f"{'layer':>5} {'type':<18} {'heads':>5} {'kv':>3} {'head_dim':>8} {'mlp':>6} {'params':>11}")
    for r in info["layers"]:
        print(f"{r['index']:>5} {r['layer_type']:<18} {r['num_heads']:>5} {r['num_kv_heads']:>3} {r['head_dim']:>8} {r['intermediate_size']:>6} {r['params']:>11,}")
    return 0
