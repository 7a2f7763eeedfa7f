"""The model card (README.md) every output folder carries, generated from the folder's report: what
the model is and where it came from, the command that made it, the quality and size measured on
the way, how to load it, and the licence of the source model (a derived model stays under it).

One generator for the three reports: compress's pruning report, the same report with a
`recovery` entry after `recover`, and export's report (it has `variants`)."""

from __future__ import annotations

import json
import shlex
from contextvars import ContextVar
from pathlib import Path

CARD_FILE = "README.md"
# The command line that is running (set by the CLI): a card says how to make the folder again.
COMMAND: ContextVar[str | None] = ContextVar("llmprune_command", default=None)
# Licences of the packaged models (the name -> the licence and where its terms are).
PACKAGED_LICENCES = {"gemma-3-270m": ("gemma", "https://ai.google.dev/gemma/terms")}


def set_command(argv: list[str]) -> None:
    COMMAND.set(shlex.join(["llmprune", *argv]))


def source_licence(source: str | None) -> tuple[str, str]:
    """(licence id, where its terms are) of a source model: a packaged model's, else the `license:`
    of the source folder's own card (ours or the model's publisher's), else unknown."""
    if source in PACKAGED_LICENCES:
        return PACKAGED_LICENCES[source]
    packaged = _packaged_name(source)
    if packaged:                             # the packaged model's converted cache folder
        return PACKAGED_LICENCES[packaged]
    if source and (Path(source) / CARD_FILE).is_file():
        for line in (Path(source) / CARD_FILE).read_text(encoding="utf-8", errors="replace").splitlines()[:30]:
            if line.startswith("license:"):
                value = line.split(":", 1)[1].strip()
                return value, f"the card of the source model ({source})"
    return "unknown", f"the source model's own licence ({source or 'not recorded'}) applies"


def _packaged_name(source: str | None) -> str | None:
    from .models import cache_dir

    if not source:
        return None
    for name in PACKAGED_LICENCES:
        try:
            if Path(source).resolve() == (cache_dir() / "models" / name).resolve():
                return name
        except OSError:
            return None
    return None


def card_text(report: dict, folder: str | Path) -> str:
    """README.md for an output folder from its report."""
    if "variants" in report:
        return _export_card(report, Path(folder))
    return _checkpoint_card(report, Path(folder))


def _front_matter(licence: str, source: str | None, tags: list[str]) -> list[str]:
    lines = ["---", f"license: {licence}"]
    if source:
        lines.append(f"base_model: {source}")
    return lines + ["tags:", *[f"- {t}" for t in tags], "---", ""]


def _command_lines(report: dict) -> list[str]:
    recovery = report.get("recovery")
    if recovery and recovery.get("config"):     # written by the ServerApp: its run config says how
        return ["## How it was made", "", f"`llmprune recover` of `{recovery.get('source')}` with the run config:", "",
                "```json", json.dumps(recovery["config"], indent=1, default=str), "```", ""]
    command = COMMAND.get()
    if command:
        return ["## How it was made", "", "```bash", command, "```", ""]
    return ["## How it was made", "", "With the Python API; its settings:", "", "```json",
            json.dumps(report.get("config", {}), indent=1, default=str), "```", ""]


def _checkpoint_card(report: dict, folder: Path) -> str:
    source = report.get("model")
    licence, terms = source_licence(source)
    before, after = report.get("params_before") or {}, report.get("params_after") or {}
    recovery = report.get("recovery")
    what = (f"`{source}` pruned by `llmprune compress` ({report.get('method', '?')}, "
            f"{100 * (report.get('ratio_achieved') or 0):.1f}% of the decoder removed)")
    if recovery:
        what += f", then recovered by `llmprune recover` (federated LoRA, {recovery.get('rounds')} rounds)"
    rows = ["| | value |", "|---|---|"]
    if before.get("total") and after.get("total"):
        rows.append(f"| parameters | {after['total']:,} of {before['total']:,} "
                    f"({100 * (1 - after['total'] / before['total']):.1f}% fewer) |")
    if report.get("layers_dropped") is not None:
        rows.append(f"| decoder layers dropped | {report['layers_dropped'] or 'none'} |")
    vocab = report.get("vocabulary")
    if vocab:
        rows.append(f"| vocabulary | {vocab.get('kept'):,} of {vocab.get('original'):,} ids "
                    f"(covering {100 * (vocab.get('coverage') or 0):.2f}% of the ranking text) |")
    target = report.get("target") or {}
    if target.get("predicted"):
        rows.append(f"| export size (`{target.get('export')}`), predicted | "
                    f"{target['predicted']['total'] / 1e6:.1f} MB for a {target.get('mb'):g} MB target |")
    loss = report.get("calibration_loss") or {}
    if loss.get("dense") is not None and loss.get("pruned") is not None:
        rows.append(f"| calibration loss (held-out windows) | {loss['pruned']:.4f} (dense {loss['dense']:.4f}) |")
    if recovery:
        rows.append(f"| recovery: evaluation perplexity | {recovery.get('final_eval_perplexity')} "
                    f"(before recovery {recovery.get('initial_eval_perplexity')}) |")
    lines = [*_front_matter(licence, source, ["llmprune", "pruned"] + (["federated-lora"] if recovery else [])),
             f"# {folder.name}", "", f"{what}.", "", *_command_lines(report), "## Measured", "", *rows, "",
             "Details: `pruning_report.json`" + (" and `metrics.json`." if recovery else "."), "",
             "## Load it", "", "```python", "import llmprune", "", f'model, tokenizer = llmprune.load("{folder.name}")',
             "```", "", "Or with stock transformers after `llmprune.register_pruned_classes()`. No code in this folder "
             "is ever run.", "", "## Licence", "",
             f"A derivative of `{source}`: its licence applies ({licence}; see {terms})."]
    return "\n".join(lines) + "\n"


def _export_card(report: dict, folder: Path) -> str:
    source = (report.get("source") or {}).get("model") if isinstance(report.get("source"), dict) else report.get("source")
    licence, terms = source_licence(source)
    rows = ["| variant | files (MB) | perplexity | bits per byte | largest logit difference vs PyTorch |",
            "|---|---|---|---|---|"]
    for name, v in report["variants"].items():
        ppl = v.get("perplexity") or {}
        logits = (v.get("logits") or {}).get("max_abs_logit_diff")
        rows.append(f"| {name} | {v.get('sizes', {}).get('onnx_bytes', 0) / 1e6:.1f} | {_num(ppl.get('onnx'))} | "
                    f"{_num(ppl.get('bits_per_byte'), '.4f')} | {_num(logits, '.2e')} |")
    lines = [*_front_matter(licence, source, ["llmprune", "onnx"]), f"# {folder.name}", "",
             f"ONNX export (KV cache) of `{source or 'a causal LM'}` by `llmprune export`, parity-checked against "
             "PyTorch.", "", *_command_lines(report), "## Measured", "", *rows, "", "Details: `export_report.json`.",
             "", "## Run it", "", "```bash", f'llmprune generate --onnx {folder.name} --prompt "..."', "```", "",
             "## Licence", "", f"Derived from `{source}`: its licence applies ({licence}; see {terms})."]
    return "\n".join(lines) + "\n"


def _num(value, spec: str = ".2f") -> str:
    return "—" if value is None else format(value, spec)
