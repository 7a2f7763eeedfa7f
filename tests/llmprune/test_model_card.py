"""The model card every output folder carries: its fields come from the folder's report."""

from __future__ import annotations

from llmprune.model_card import CARD_FILE, card_text, source_licence

COMPRESS = {"model": "gemma-3-270m", "method": "comp", "ratio_achieved": 0.2, "layers_dropped": [],
            "params_before": {"total": 268098176}, "params_after": {"total": 248032256},
            "calibration_loss": {"dense": 3.7629, "pruned": 3.9341}, "config": {"ratio": 0.2},
            "vocabulary": {"kept": 64000, "original": 262144, "coverage": 0.9991}}


def test_a_pruned_checkpoints_card_says_what_it_is_what_it_measured_and_its_licence(tmp_path):
    card = card_text(COMPRESS, tmp_path / "pruned-gemma")
    assert card.startswith("---\nlicense: gemma\nbase_model: gemma-3-270m\n")
    assert "# pruned-gemma" in card and "`gemma-3-270m` pruned by `llmprune compress` (comp, 20.0% of the decoder" in card
    assert "| parameters | 248,032,256 of 268,098,176 (7.5% fewer) |" in card
    assert "| vocabulary | 64,000 of 262,144 ids (covering 99.91% of the ranking text) |" in card
    assert "| calibration loss (held-out windows) | 3.9341 (dense 3.7629) |" in card
    assert 'llmprune.load("pruned-gemma")' in card and "https://ai.google.dev/gemma/terms" in card


def test_a_recovered_checkpoints_card_has_the_recovery_and_its_run_config(tmp_path):
    recovered = {**COMPRESS, "recovery": {"source": "pruned-gemma", "rounds": 3, "initial_eval_perplexity": 51.79,
                                          "final_eval_perplexity": 30.5, "config": {"training.rounds": 3}}}
    card = card_text(recovered, tmp_path / "recovered")
    assert "then recovered by `llmprune recover` (federated LoRA, 3 rounds)" in card
    assert "| recovery: evaluation perplexity | 30.5 (before recovery 51.79) |" in card
    assert '"training.rounds": 3' in card and "- federated-lora" in card


def test_an_exports_card_lists_every_variant_and_inherits_the_licence_of_its_source(tmp_path):
    source = tmp_path / "pruned-gemma"
    source.mkdir()
    (source / CARD_FILE).write_text(card_text(COMPRESS, source))
    assert source_licence(str(source))[0] == "gemma"           # through the pruned checkpoint's own card
    report = {"source": str(source), "variants": {
        "fp32": {"sizes": {"onnx_bytes": 992e6}, "perplexity": {"onnx": 38.9, "bits_per_byte": 1.19},
                 "logits": {"max_abs_logit_diff": 2e-5}},
        "int4": {"sizes": {"onnx_bytes": 300e6}, "perplexity": {"onnx": 42.4, "bits_per_byte": 1.23}}}}
    card = card_text(report, tmp_path / "onnx")
    assert card.startswith("---\nlicense: gemma\n")
    assert "| fp32 | 992.0 | 38.90 | 1.1900 | 2.00e-05 |" in card and "| int4 | 300.0 | 42.40 | 1.2300 | — |" in card
    assert "llmprune generate --onnx onnx" in card


def test_a_source_without_a_known_licence_says_so():
    assert source_licence(None)[0] == "unknown" and source_licence("/nowhere")[0] == "unknown"


def test_a_model_loaded_from_the_packaged_cache_folder_has_the_packaged_licence(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMPRUNE_CACHE_DIR", str(tmp_path))
    assert source_licence(str(tmp_path / "models" / "gemma-3-270m"))[0] == "gemma"
    assert source_licence(str(tmp_path / "models" / "other"))[0] == "unknown"
