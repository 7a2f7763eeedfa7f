"""A checkpoint whose vocabulary was pruned (compress.vocab: fewer embedding / LM-head rows, a
rebuilt tokenizer, vocabulary.json) exports, quantizes, describes itself for onnxruntime-genai and
generates like any other; `llmprune info` shows how many ids it kept; export reports bits per byte."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from llmprune.testing import TINY_TEXT, tiny_model

from ..cli.test_bad_inputs import run_main
from .conftest import fast_config

PROMPT = "The quick brown fox"
ORIGINAL, KEPT = 320, 280
# The specials sit at the end of the original vocabulary, so trimming moves them: a genai_config
# or generation config read from the original ids would be caught.
PAD, BOS, EOS = ORIGINAL - 3, ORIGINAL - 2, ORIGINAL - 1
RANKING_TEXT = TINY_TEXT * 4


def specials_last_tokenizer():
    """A byte-level BPE tokenizer of ORIGINAL ids whose <pad>, <bos>, <eos> are the last three."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=ORIGINAL - 3, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([TINY_TEXT], trainer)
    assert tok.get_vocab_size() == ORIGINAL - 3
    tok.add_special_tokens(["<pad>", "<bos>", "<eos>"])
    assert [tok.token_to_id(t) for t in ("<pad>", "<bos>", "<eos>")] == [PAD, BOS, EOS]
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                       special_tokens=[("<bos>", BOS)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   model_input_names=["input_ids", "attention_mask"])


def trimmed_checkpoint(folder: Path, arch: str) -> Path:
    """A tiny checkpoint as `llmprune compress --ratio 0 --vocab KEPT` writes it: rows sliced,
    tokenizer rebuilt over the kept ids, config / generation ids remapped, vocabulary.json."""
    import llmprune
    from llmprune.checkpoint import save_pruned
    from llmprune.compress.vocab import VOCAB_FILE, rebuild_tokenizer, save_vocabulary_map, select_vocabulary, slice_vocabulary

    dense = folder.parent / f"{folder.name}-dense"
    tiny_model(arch, vocab_size=ORIGINAL, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS).save_pretrained(dense)
    specials_last_tokenizer().save_pretrained(dense)
    model, tokenizer = llmprune.load(dense)
    selection = select_vocabulary(tokenizer, [RANKING_TEXT], KEPT)
    new_tokenizer = rebuild_tokenizer(tokenizer, selection.kept_ids)
    slice_vocabulary(model, selection.kept_ids)
    vocab_text = save_vocabulary_map(folder.parent, selection, {"data": "tiny.txt"}).read_text()
    return save_pruned(model, new_tokenizer, folder, {}, extra_files={VOCAB_FILE: vocab_text})


@pytest.fixture(scope="module")
def trimmed(tmp_path_factory):
    """Factory: trimmed(arch) -> the folder of a vocabulary-pruned tiny checkpoint (read only)."""
    made: dict[str, Path] = {}

    def make(arch: str) -> Path:
        if arch not in made:
            made[arch] = trimmed_checkpoint(tmp_path_factory.mktemp(f"trimmed-{arch}") / "ckpt", arch)
        return made[arch]

    return make


def test_trimmed_checkpoint_loads_with_remapped_ids(trimmed):
    import llmprune

    model, tokenizer = llmprune.load(trimmed("gemma3_text"))
    new = [KEPT - 3, KEPT - 2, KEPT - 1]  # the specials stay the last three kept ids
    assert model.config.vocab_size == KEPT == len(tokenizer)
    assert model.get_input_embeddings().weight.shape[0] == KEPT
    assert [model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id] == new
    assert [tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id] == new
    assert model.generation_config.eos_token_id == KEPT - 1
    assert tokenizer(PROMPT)["input_ids"][0] == KEPT - 2


def test_info_shows_the_vocabulary(trimmed, capsys):
    folder = trimmed("llama")
    result = run_main(capsys, "info", folder, "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    vocab = info["vocabulary"]
    assert info["vocab_size"] == vocab["kept"] == KEPT and vocab["original"] == ORIGINAL
    assert 0 < vocab["coverage"] < 1.0 and vocab["data_tokens"] >= 1000 and vocab["data"] == "tiny.txt"
    result = run_main(capsys, "info", folder)
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("vocabulary "))
    assert line.startswith(f"vocabulary {KEPT} of {ORIGINAL} ids kept (coverage ")
    assert line.endswith(f"% of {vocab['data_tokens']:,} tokens of tiny.txt)")


def test_info_of_a_whole_vocabulary(checkpoint, capsys):
    result = run_main(capsys, "info", checkpoint("llama"), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["vocabulary"] is None
    result = run_main(capsys, "info", checkpoint("llama"))
    assert "vocabulary " not in result.stdout


@pytest.fixture(scope="module")
def trimmed_export(trimmed, tmp_path_factory):
    """`llmprune export --quantize int8 int4 --genai --ort` of the trimmed tied Gemma-3 (in process)."""
    from llmprune.cli.main import main

    out = tmp_path_factory.mktemp("trimmed-export") / "onnx"
    code = main(["export", "--model", str(trimmed("gemma3_text")), "--out", str(out), "--quantize", "int8", "int4",
                 "--genai", "--ort", "--eval-windows", "2", "--eval-seq-len", "32"])
    return code, out


def test_export_of_a_trimmed_checkpoint(trimmed_export):
    code, out = trimmed_export
    assert code == 0
    report = json.loads((out / "export_report.json").read_text())
    assert report["model"]["vocab_size"] == KEPT
    fp32 = report["variants"]["fp32"]
    assert fp32["logits"]["max_abs_logit_diff"] < 1e-4 and fp32["generation"]["all_equal"]
    assert list(report["variants"]) == ["fp32", "int8", "int4"]
    for name, variant in report["variants"].items():
        assert variant["perplexity"]["bits_per_byte"] > 0, name  # the windows are text
        folder = out if name == "fp32" else out / name
        genai = json.loads((folder / "genai_config.json").read_text())["model"]
        assert genai["vocab_size"] == KEPT
        assert (genai["pad_token_id"], genai["bos_token_id"], genai["eos_token_id"]) == (KEPT - 3, KEPT - 2, KEPT - 1)
        assert json.loads((folder / "config.json").read_text())["vocab_size"] == KEPT
        assert not (folder / "vocabulary.json").exists()  # the export speaks the pruned ids only
        assert (folder / "model.ort").is_file()  # ONNX Runtime Mobile


def _generate(capsys, *args) -> str:
    result = run_main(capsys, "generate", "--prompt", PROMPT, "--max-new-tokens", "12", *args)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(PROMPT)
    return result.stdout


def test_generate_on_a_trimmed_checkpoint(trimmed, trimmed_export, capsys):
    _, out = trimmed_export
    torch_text = _generate(capsys, "--model", trimmed("gemma3_text"))
    assert _generate(capsys, "--onnx", out, "--threads", "1") == torch_text
    int4 = _generate(capsys, "--onnx", out / "int4", "--threads", "1")
    pytest.importorskip("onnxruntime_genai")
    assert _generate(capsys, "--onnx", out / "int4", "--genai") == int4


def test_an_untied_trimmed_checkpoint_exports(trimmed, tmp_path):
    """Llama's separate LM head was sliced with the embedding: fp32 parity and int4 both pass."""
    import llmprune
    from llmprune.export import export_onnx

    model, tokenizer = llmprune.load(trimmed("llama"))
    result = export_onnx(model, fast_config(quantize="int4"), tmp_path / "onnx", tokenizer=tokenizer)
    fp32 = result.report["variants"]["fp32"]
    assert fp32["logits"]["max_abs_logit_diff"] < 1e-4 and fp32["generation"]["all_equal"]
    assert result.report["variants"]["int4"]["perplexity"]["bits_per_byte"] is not None


# ---------------------------------------------------------------- bits per byte in the export report


def test_export_reports_bits_per_byte(pruned_export, tok):
    from llmprune.evaluate import perplexity, text_measures
    from llmprune.export.pipeline import _ParityInputs

    model, result = pruned_export("llama", quantize="int8")
    windows = _ParityInputs.build(model, tok, None, fast_config(quantize="int8")).windows
    n_bytes, _ = text_measures(tok, windows)
    predicted = windows.shape[0] * (windows.shape[1] - 1)
    fp32 = result.report["variants"]["fp32"]["perplexity"]
    assert fp32["bytes"] == n_bytes > 0
    # bits per byte = summed NLL / ln 2 / bytes, with summed NLL = ln(perplexity) · predicted tokens
    for variant in ("fp32", "int8"):
        ppl = result.report["variants"][variant]["perplexity"]
        assert ppl["bits_per_byte"] == pytest.approx(math.log(ppl["onnx"]) * predicted / math.log(2) / n_bytes, rel=1e-6)
    assert fp32["torch_bits_per_byte"] == pytest.approx(perplexity(model, windows, progress=False, tokenizer=tok).bits_per_byte)
    assert fp32["bits_per_byte"] == pytest.approx(fp32["torch_bits_per_byte"], rel=1e-4)


def test_random_windows_have_no_bits_per_byte(tmp_path):
    """Without a tokenizer the export evaluates random ids: no text, so no bits per byte."""
    from llmprune.export import export_onnx

    from .conftest import pruned_tiny_model

    torch.manual_seed(0)
    result = export_onnx(pruned_tiny_model("qwen3"), fast_config(), tmp_path / "onnx")
    ppl = result.report["variants"]["fp32"]["perplexity"]
    assert ppl["onnx"] > 0 and ppl["bits_per_byte"] is None and ppl["torch_bits_per_byte"] is None
    assert ppl["bytes"] is None
