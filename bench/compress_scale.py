"""Scale benchmark for `--low-memory`: a Llama-2-7B-shaped checkpoint (32 layers, hidden 4096,
MLP 11008, 32 heads, vocab 32000) with random fp16 weights, written one safetensors shard per
layer without ever holding more than one layer, plus a BPE tokenizer trained on local text; then
`llmprune compress --low-memory --ratio 0.2` with 8×128 calibration in a separate process.
Reports the checkpoint size, the compress process's peak RSS (and its share of the checkpoint)
and the time per layer, to bench/results/compress_scale.json and docs/benchmarks.md.

    python bench/compress_scale.py                 # the full 32-layer model (~13 GB on disk)
    python bench/compress_scale.py --layers 4      # same layer shapes, fewer layers (quicker)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, SHARED, run_json, save_results  # noqa: E402

SHAPE = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=[f"<0x{i:02X}>" for i in range(256)], show_progress=False)
    text = (SHARED / "wikitext2/wiki.valid.tokens").read_text()
    tok.train_from_iterator([line for line in text.splitlines() if line.strip()], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(folder)


def write_checkpoint(folder: Path, layers: int, seed: int = 0) -> int:
    """Random fp16 Llama checkpoint, one shard per layer; returns its size in bytes."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    folder.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(num_hidden_layers=layers, max_position_embeddings=4096, dtype="float16", **SHAPE)
    config.save_pretrained(folder)
    gen = torch.Generator().manual_seed(seed)
    h, m, v = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["vocab_size"]

    def rnd(*shape, std=0.02):
        return (torch.randn(*shape, generator=gen) * std).half()

    weight_map, total = {}, 0

    def save(tensors: dict, name: str) -> None:
        nonlocal total
        save_file(tensors, folder / name, metadata={"format": "pt"})
        for k, t in tensors.items():
            weight_map[k] = name
            total += t.numel() * t.element_size()

    save({"model.embed_tokens.weight": rnd(v, h), "model.norm.weight": torch.ones(h, dtype=torch.half),
          "lm_head.weight": rnd(v, h)}, "model-rest.safetensors")
    for i in range(layers):
        p = f"model.layers.{i}."
        save({p + "self_attn.q_proj.weight": rnd(h, h), p + "self_attn.k_proj.weight": rnd(h, h),
              p + "self_attn.v_proj.weight": rnd(h, h), p + "self_attn.o_proj.weight": rnd(h, h),
              p + "mlp.gate_proj.weight": rnd(m, h), p + "mlp.up_proj.weight": rnd(m, h),
              p + "mlp.down_proj.weight": rnd(h, m),
              p + "input_layernorm.weight": torch.ones(h, dtype=torch.half),
              p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.half)}, f"model-layer-{i:05d}.safetensors")
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    write_tokenizer(folder, SHAPE["vocab_size"])
    return total


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--work", type=Path, default=ROOT / "bench/work/scale")
    p.add_argument("--results", type=Path, default=ROOT / "bench/results/compress_scale.json")
    p.add_argument("--keep", action="store_true")
    args = p.parse_args()
    src, out = args.work / "llama7b-shaped", args.work / "pruned"
    start = time.perf_counter()
    size = write_checkpoint(src, args.layers)
    write_seconds = time.perf_counter() - start
    print(f"[scale] wrote {size / 2**30:.2f} GiB in {write_seconds:.0f} s", flush=True)
    report, wall = run_json(["compress", "--model", str(src), "--low-memory", "--ratio", str(args.ratio), "--out", str(out),
                             "--overwrite", "--calib", str(SHARED / "wikitext2/wiki.valid.tokens"),
                             "--calib-samples", "8", "--calib-seq-len", "128", "--layer-share", "0"], args.work / "compress.log")
    rss_bytes = report["peak_rss_mb"] * 2**20
    result = {
        "layers": args.layers, "shape": SHAPE, "checkpoint_bytes": size, "checkpoint_write_seconds": write_seconds,
        "ratio_achieved": report["ratio_achieved"], "peak_rss_mb": report["peak_rss_mb"],
        "peak_rss_share_of_checkpoint": rss_bytes / size, "compress_seconds": report["seconds"], "process_seconds": wall,
        "seconds_per_layer": report["seconds"] / args.layers, "calibration": "8x128 wikitext2/wiki.valid.tokens",
    }
    # What the same peak means for the full 32-layer model (peak memory does not grow with depth).
    full = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096) * 2 + 2 * 32000 * 4096 * 2 + 4096 * 2
    result["full_7b_checkpoint_bytes"] = full
    result["peak_rss_share_of_full_7b"] = rss_bytes / full
    save_results(args.results, result)
    print(json.dumps(result, indent=2))
    from report import render_scale

    render_scale(result, ROOT / "docs")
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
