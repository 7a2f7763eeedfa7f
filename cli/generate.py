"""`llmprune generate`: greedy text from an ONNX export (onnxruntime, KV cache) or from a checkpoint
in PyTorch, streamed token by token."""

from __future__ import annotations

import sys
import time

from .common import positive_int


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text with an ONNX export (onnxruntime) or a checkpoint (PyTorch)",
                       description=__doc__)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--onnx", help="folder written by `llmprune export` (or one of its int8/int4 sub-folders)")
    source.add_argument("--model", help="checkpoint folder, .gguf or 'gemma-3-270m' (PyTorch, for comparison)")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens to generate (64)")
    p.add_argument("--ort-format", action="store_true", help="run model.ort instead of model.onnx")
    p.add_argument("--genai", action="store_true",
                   help="with --onnx: run the folder with onnxruntime-genai (export it with --genai) instead of onnxruntime")
    p.add_argument("--threads", type=positive_int, default=None, help="onnxruntime threads (default: all cores)")
    p.set_defaults(run=run)


def _onnx_tokens(args, tokenizer, ids):
    import json
    from pathlib import Path

    from llmprune.export import OnnxCausalLM

    lm = OnnxCausalLM(args.onnx, threads=args.threads, prefer_ort=args.ort_format)
    eos = None
    for name in ("generation_config.json", "config.json"):
        path = Path(args.onnx) / name
        if path.is_file():
            eos = json.loads(path.read_text()).get("eos_token_id")
            if eos is not None:
                break
    return lm.stream(ids, args.max_new_tokens, eos_token_id=eos)


def _torch_tokens(args, model, ids):
    import torch

    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) or model.config.eos_token_id
    eos = set([eos] if isinstance(eos, int) else (eos or []))
    x = torch.tensor([ids])
    with torch.inference_mode():
        out = model(input_ids=x, use_cache=True)
        for _ in range(args.max_new_tokens):
            token = int(out.logits[0, -1].argmax())
            yield token
            if token in eos:
                return
            out = model(input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)


def context_limit(onnx_folder) -> int | None:
    """The positions an export folder's model takes (config.json's max_position_embeddings)."""
    import json
    from pathlib import Path

    try:
        value = json.loads((Path(onnx_folder) / "config.json").read_text(encoding="utf-8")).get("max_position_embeddings")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def check_context(prompt_tokens: int, max_new_tokens: int, limit: int | None, what: str = "the model") -> None:
    """Refuse a prompt plus --max-new-tokens beyond the model's context, before generating (ONNX
    Runtime would fail with an allocation error, PyTorch with garbage or an index error)."""
    from llmprune.errors import LLMPruneError

    if limit is None or prompt_tokens + max_new_tokens <= limit:
        return
    if prompt_tokens >= limit:
        raise LLMPruneError(
            f"the prompt is {prompt_tokens} tokens, {what}'s context is {limit} tokens",
            f"shorten the prompt to at most {limit - 1} tokens")
    raise LLMPruneError(
        f"--max-new-tokens {max_new_tokens} with a prompt of {prompt_tokens} tokens passes {what}'s context of {limit} tokens",
        f"pass --max-new-tokens {limit - prompt_tokens} or less (or shorten the prompt)")


def _onnx_stream(args):
    """(tokenizer, token iterator) of an ONNX export, after the context check."""
    from pathlib import Path

    from transformers import AutoTokenizer

    from llmprune.errors import LLMPruneError
    from llmprune.export.parity import prompt_ids
    from llmprune.export.runtime import model_file
    from llmprune.models import MODEL_INPUT_NAMES

    model_file(args.onnx, args.ort_format)  # a clear error before loading the tokenizer
    try:  # never code from the folder (a tokenizer auto_map is ignored)
        tokenizer = AutoTokenizer.from_pretrained(str(Path(args.onnx)), trust_remote_code=False,
                                                  model_input_names=list(MODEL_INPUT_NAMES))
    except (OSError, ValueError) as exc:
        raise LLMPruneError(f"no tokenizer in '{args.onnx}'", "export a checkpoint that has tokenizer files") from exc
    if args.genai:
        from llmprune.export.genai import GenaiCausalLM

        lm = GenaiCausalLM(args.onnx)
        ids = lm.encode(args.prompt)  # BOS first: onnxruntime-genai's tokenizer leaves it out
        limits = [n for n in (context_limit(args.onnx), lm.context_length) if n]
        check_context(len(ids), args.max_new_tokens, min(limits) if limits else None, "the export")
        return tokenizer, lm.stream(ids, args.max_new_tokens)
    ids = prompt_ids(tokenizer, args.prompt)
    check_context(len(ids), args.max_new_tokens, context_limit(args.onnx), "the export")
    return tokenizer, _onnx_tokens(args, tokenizer, ids)


def _torch_stream(args):
    """(tokenizer, token iterator) of a PyTorch model; the weights load only after the checks."""
    from llmprune.export.parity import prompt_ids
    from llmprune.models import load_config, load_model, load_tokenizer, resolve_model_spec

    source = resolve_model_spec(args.model)
    config = load_config(source)
    tokenizer = load_tokenizer(source)
    ids = prompt_ids(tokenizer, args.prompt)
    check_context(len(ids), args.max_new_tokens, getattr(config, "max_position_embeddings", None))
    return tokenizer, _torch_tokens(args, load_model(source), ids)


def run(args) -> int:
    from llmprune.errors import LLMPruneError
    from llmprune.export import text_stream
    from llmprune.paths import printable

    if args.genai and not args.onnx:
        raise LLMPruneError("--genai runs an ONNX export", "pass --onnx DIR (a folder exported with --genai)")
    if args.genai and args.ort_format:
        raise LLMPruneError("--genai runs model.onnx, not model.ort", "drop --ort-format")
    tokenizer, tokens = _onnx_stream(args) if args.onnx else _torch_stream(args)
    count = 0
    start = time.perf_counter()

    def counted():
        nonlocal count
        for t in tokens:
            count += 1
            yield t

    sys.stdout.write(printable(args.prompt))
    sys.stdout.flush()
    for piece in text_stream(tokenizer, counted()):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    seconds = time.perf_counter() - start
    sys.stderr.write(f"{count} tokens in {seconds:.2f} s ({count / seconds if seconds else 0:.1f} tokens/s, "
                     f"{'onnxruntime-genai' if args.genai else 'onnxruntime' if args.onnx else 'PyTorch'})\n")
    return 0
