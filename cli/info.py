"""`llmprune info`: architecture, parameter split and per-layer shapes of a model (and, for a
checkpoint whose vocabulary was pruned, how many token ids it kept of how many)."""

from __future__ import annotations

import json
from pathlib import Path

from .common import add_model_argument, emit_json, torch_dtype


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="architecture, parameters and layer shapes", description=__doc__)
    add_model_argument(p, positional=True)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(run=run)


def vocabulary_info(folder: str | Path) -> dict | None:
    """The vocabulary a checkpoint kept (its vocabulary.json, checked), or None when it is whole:
    kept and original id counts, the share of the ranking data's tokens the kept ids cover."""
    from llmprune.checkpoint import load_vocabulary_map

    data = load_vocabulary_map(folder)
    if data is None:
        return None
    kept = len(data["kept_ids"])
    source = data.get("data")
    if source is None:  # the compress run's --vocab-data, when its report names it
        try:
            report = json.loads((Path(folder) / "pruning_report.json").read_text(encoding="utf-8"))
            source = ((report or {}).get("config") or {}).get("vocab_data")
        except (OSError, ValueError, AttributeError):
            source = None
    return {"kept": kept, "original": data.get("original_vocab_size"), "coverage": data.get("coverage"),
            "data_tokens": data.get("data_tokens"), "distinct_in_data": data.get("distinct_in_data"),
            "forced": data.get("forced"), "requested": data.get("size_requested"), "data": source}


def vocabulary_line(v: dict) -> str:
    """`vocabulary 32,000 of 262,144 ids kept (coverage 99.1% of 1,234 tokens of wiki.txt)`."""
    from llmprune.paths import printable

    original = f"{v['original']:,}" if isinstance(v["original"], int) else "?"
    line = f"vocabulary {v['kept']:,} of {original} ids kept"
    if isinstance(v["coverage"], (int, float)):
        of = f"{v['data_tokens']:,} tokens" if isinstance(v["data_tokens"], int) else "the tokens"
        if v["data"]:
            of += f" of {printable(str(v['data']))}"
        line += f" (coverage {100 * v['coverage']:.1f}% of {of})"
    return line


def run(args) -> int:
    from llmprune import load_model, model_info
    from llmprune.models import has_tokenizer_files, load_tokenizer, resolve_model_spec
    from llmprune.paths import printable

    source = resolve_model_spec(args.model)
    info = model_info(load_model(source, dtype=torch_dtype(args.dtype)))
    if source.kind == "folder" and has_tokenizer_files(source.path):
        load_tokenizer(source)  # refuses a tokenizer with more ids than the embedding has rows
    info["model"] = args.model or "gemma-3-270m"
    info["vocabulary"] = vocabulary_info(source.path) if source.kind == "folder" else None
    if args.json:
        emit_json(info)
        return 0
    p = info["parameters"]
    print(f"{printable(info['model'])}: {info['architecture']} ({info['class']}), {info['num_layers']} layers, "
          f"hidden {info['hidden_size']}, vocab {info['vocab_size']}, {info['dtype']}")
    print(f"parameters {p['total']:,}: embeddings {p['embeddings']:,} | attention {p['attention']:,} | MLP {p['mlp']:,}"
          f" | norms {p['norms']:,} | LM head {p['lm_head']:,}{' (tied to embeddings)' if p['tied_embeddings'] else ''}")
    if info["vocabulary"] is not None:
        print(vocabulary_line(info["vocabulary"]))
    print(f"{'layer':>5} {'type':<18} {'heads':>5} {'kv':>3} {'head_dim':>8} {'mlp':>6} {'params':>11}")
    for r in info["layers"]:
        print(f"{r['index']:>5} {r['layer_type']:<18} {r['num_heads']:>5} {r['num_kv_heads']:>3} {r['head_dim']:>8} "
              f"{r['intermediate_size']:>6} {r['params']:>11,}")
    return 0
