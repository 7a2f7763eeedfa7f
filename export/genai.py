"""`genai_config.json` for onnxruntime-genai, and `.ort` conversion for ONNX Runtime Mobile."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from llmprune.errors import LLMPruneError

from .weights import PROTOBUF_LIMIT

log = logging.getLogger(__name__)

GENAI_FILE = "genai_config.json"
# onnxruntime-genai's model types for the decoder-only families llmprune supports.
GENAI_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3_text"}


def _token_id(value):
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value] if len(value) != 1 else int(value[0])
    return None if value is None else int(value)


def genai_config(config, session_inputs: set[str], filename: str = "model.onnx", context_length: int | None = None,
                 generation_config=None) -> dict:
    """The decoder description onnxruntime-genai reads. The export is optimum's layout (past
    concatenated each step), so the KV buffer is not shared between past and present. Pruned
    query heads do not matter here: genai sizes the cache from the KV heads, which pruning keeps."""
    model_type = GENAI_TYPES.get(config.model_type)
    if model_type is None:
        raise LLMPruneError(f"onnxruntime-genai has no model type for '{config.model_type}'",
                            f"--genai supports {', '.join(GENAI_TYPES)}")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    context = int(context_length or getattr(config, "max_position_embeddings", 2048))
    gen = generation_config
    eos = _token_id(getattr(gen, "eos_token_id", None) if gen is not None else None)
    if eos is None or eos == []:  # (an id of 0 is an id: `or` would skip it)
        eos = _token_id(config.eos_token_id)
    pad = _token_id(getattr(config, "pad_token_id", None))
    if pad is None and eos is not None:
        pad = eos if isinstance(eos, int) else eos[0]
    inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask"}
    if "position_ids" in session_inputs:
        inputs["position_ids"] = "position_ids"
    inputs.update({"past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"})
    return {
        "model": {
            "bos_token_id": _token_id(config.bos_token_id),
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": filename,
                "head_size": int(head_dim),
                "hidden_size": int(config.hidden_size),
                "inputs": inputs,
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"},
                "num_attention_heads": int(config.num_attention_heads),
                "num_hidden_layers": int(config.num_hidden_layers),
                "num_key_value_heads": int(config.num_key_value_heads),
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": model_type,
            "vocab_size": int(config.vocab_size),
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": context, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": False, "repetition_penalty": 1.0,
            "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }


def write_genai_config(folder: Path, config, session_inputs: set[str], context_length: int | None = None,
                       generation_config=None) -> Path:
    path = folder / GENAI_FILE
    path.write_text(json.dumps(genai_config(config, session_inputs, "model.onnx", context_length, generation_config),
                               indent=2) + "\n")
    return path


def convert_to_ort(folder: Path) -> list[Path]:
    """model.onnx -> model.ort beside it (ORT format for ONNX Runtime Mobile): what
    `onnxruntime.tools.convert_onnx_models_to_ort` does for its Fixed style — every graph
    optimization but the x86-only NCHWc layout, QDQ nodes not fused to int8 — without its
    operator-config file and without repacked weights held while the model is saved (the saved
    model is the same; for the fp32 Gemma-3-270M the tool peaked at 3.9 GB, this at 2.2 GB)."""
    import onnxruntime as ort

    src = folder / "model.onnx"
    data = folder / "model.onnx_data"
    if data.exists() and data.stat().st_size >= PROTOBUF_LIMIT:
        raise LLMPruneError("the ORT format cannot hold a model above 2 GB",
                            "quantize (--quantize int8/int4) before --ort")
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(folder / "model.ort")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    for key, value in (("session.save_model_format", "ORT"), ("session.qdqisint8allowed", "0"),
                       ("session.disable_prepacking", "1")):
        options.add_session_config_entry(key, value)
    try:
        ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"], disabled_optimizers=["NchwcTransformer"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        from llmprune.paths import find_write_error

        if find_write_error(exc) is not None:
            raise  # disk full / read-only: export_onnx names the output folder
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LLMPruneError(f".ort conversion of {src} failed ({first[:200]})", "rerun with --debug") from exc
    made = sorted(folder.glob("*.ort"))
    if not made:
        raise LLMPruneError(f".ort conversion of {src} wrote no file", "rerun with --debug")
    return made


class GenaiCausalLM:
    """An export folder run by onnxruntime-genai (needs `genai_config.json`, written by --genai):
    prompt ids with BOS first, greedy generation token by token.

    onnxruntime-genai's tokenizer does not add special tokens unless told to (its `encode` gives
    no `<bos>` whatever the tokenizer files say), and Gemma without `<bos>` first produces
    garbage; so the tokenizer is switched to add them, and BOS is put first if it still is not."""

    def __init__(self, folder: str | Path):
        try:
            import onnxruntime_genai as og
        except ImportError as exc:
            raise LLMPruneError("onnxruntime-genai is not installed", "pip install onnxruntime-genai") from exc
        folder = Path(folder)
        config_path = folder / GENAI_FILE
        if not config_path.is_file():
            raise LLMPruneError(f"'{folder}' holds no {GENAI_FILE}", "export with --genai")
        self._og = og
        try:
            self.model = og.Model(str(folder))
            self.tokenizer = og.Tokenizer(self.model)
        except RuntimeError as exc:       # a damaged graph, weights or config: its own first line
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise LLMPruneError(f"onnxruntime-genai cannot load '{folder}' ({first})",
                                "re-run `llmprune export --genai`") from None
        try:
            self.tokenizer.update_options(add_special_tokens="true")
        except Exception:  # noqa: BLE001 - older releases have no options; BOS is added below
            log.debug("onnxruntime-genai tokenizer takes no add_special_tokens option")
        model = json.loads(config_path.read_text())["model"]
        self.bos_token_id = model.get("bos_token_id")
        eos = model.get("eos_token_id")
        self.eos_token_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.context_length = int(model.get("context_length") or 2048)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` as the model was trained to see them: BOS first when it has one."""
        ids = [int(t) for t in self.tokenizer.encode(text)]
        if self.bos_token_id is not None and (not ids or ids[0] != self.bos_token_id):
            ids = [int(self.bos_token_id)] + ids
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def stream(self, input_ids: list[int], max_new_tokens: int = 32):
        """Greedy decoding (the folder's search options, top_k 1), one token id at a time; stops
        after an EOS id."""
        ids = [int(t) for t in input_ids]
        if not ids:
            raise LLMPruneError("empty prompt", "give a prompt of at least one token")
        params = self._og.GeneratorParams(self.model)
        params.set_search_options(max_length=min(len(ids) + max_new_tokens, self.context_length), do_sample=False)
        generator = self._og.Generator(self.model, params)
        generator.append_tokens(ids)
        for _ in range(max_new_tokens):
            if generator.is_done():
                return
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            yield token
            if token in self.eos_token_ids:
                return

    def generate(self, input_ids: list[int], max_new_tokens: int = 32) -> list[int]:
        return list(self.stream(input_ids, max_new_tokens))
