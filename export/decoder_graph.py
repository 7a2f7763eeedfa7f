"""The decoder as the ONNX file presents it, and its trace.

Inputs: input_ids, attention_mask (the 2-D padding mask over past + new tokens), position_ids and
each layer's past key and value (`past_key_values.N.key/value`); outputs: logits and each layer's
present key and value (`present.N.key/value`, past and new concatenated). This is the layout of
optimum's `text-generation-with-past` export, which onnxruntime-genai and optimum's
`ORTModelForCausalLM` read, so folders written before and after this exporter run the same way.

The attention masks are built here from the 2-D mask by plain tensor ops and handed to the model
in the form its forward accepts ready-made (one 4-D additive mask, or one per attention kind for
models with sliding-window layers). transformers builds them otherwise through code that differs
between 4.5x (vmap, which the tracer cannot follow) and 5.x; building them here keeps one trace
valid on both. Fully padded query rows are the only rows where the result differs from
transformers' own masks (their logits are never read).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

SLIDING = "sliding_attention"
FULL = "full_attention"
# The layout's names (genai.py and runtime.py read the same ones).
PAST_NAME = "past_key_values.{}.{}"
PRESENT_NAME = "present.{}.{}"


def attention_masks(config, input_ids: torch.Tensor, attention_mask: torch.Tensor, dtype: torch.dtype):
    """Additive [batch, 1, new, past + new] masks: causal, padding and, where the model has them,
    sliding windows (a key is seen when it lies within `sliding_window` positions of the query, as
    transformers' sliding overlay has it). A dict by attention kind for models whose layers mix
    kinds, else one tensor."""
    total = attention_mask.shape[1]
    new = input_ids.shape[1]
    query = torch.arange(new, device=input_ids.device) + (total - new)  # each new token's cache position
    key = torch.arange(total, device=input_ids.device)
    allowed = (key[None, :] <= query[:, None])[None] & attention_mask[:, None, :].bool()
    window = getattr(config, "sliding_window", None)

    def additive(mask: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, 0.0, torch.finfo(dtype).min).to(dtype)[:, None]

    def windowed() -> torch.Tensor:
        return allowed & (key[None, :] > query[:, None] - window)[None]

    if SLIDING in (getattr(config, "layer_types", None) or ()):
        return {FULL: additive(allowed), SLIDING: additive(windowed())}
    if config.model_type == "mistral" and window:  # Mistral applies its window to every layer
        return additive(windowed())
    return additive(allowed)


def cache_tensors(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's (key, value) of a transformers cache (4.56+ keeps them per layer object)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [(layer.keys, layer.values) for layer in layers]
    return list(zip(cache.key_cache, cache.value_cache))


@contextmanager
def flat_forward(model):
    """The model's forward, for the block, takes and returns flat tensors (the layout above). The
    model itself is traced, not a wrapper module, so the weights keep their own names."""
    from transformers import DynamicCache

    layers = model.config.num_hidden_layers
    original = model.forward

    def forward(input_ids, attention_mask, position_ids, *past):
        cache = DynamicCache()
        for i in range(layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        masks = attention_masks(model.config, input_ids, attention_mask, model.dtype)
        out = original(input_ids=input_ids, attention_mask=masks, position_ids=position_ids,
                       past_key_values=cache, use_cache=True)
        return (out.logits, *[t for pair in cache_tensors(out.past_key_values) for t in pair])

    model.forward = forward
    try:
        yield model
    finally:
        del model.forward  # the class's forward again


def io_names(layers: int) -> tuple[list[str], list[str]]:
    inputs = ["input_ids", "attention_mask", "position_ids"]
    outputs = ["logits"]
    for i in range(layers):
        inputs += [PAST_NAME.format(i, "key"), PAST_NAME.format(i, "value")]
        outputs += [PRESENT_NAME.format(i, "key"), PRESENT_NAME.format(i, "value")]
    return inputs, outputs


def sample_inputs(model, batch: int = 2, past: int = 4, new: int = 3) -> tuple[torch.Tensor, ...]:
    """Inputs to trace with: past keys and values of each layer's own shape (pruned layers keep
    different head counts), taken from a forward pass of the model itself; a padded first row."""
    from transformers import DynamicCache

    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, past + new), generator=generator)
    mask = torch.ones(batch, past + new, dtype=torch.int64)
    mask[0, 0] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(input_ids=ids[:, :past], attention_mask=mask[:, :past], past_key_values=DynamicCache(), use_cache=True)
    flat = [t.detach().clone() for pair in cache_tensors(out.past_key_values) for t in pair]
    return (ids[:, past:], mask, positions[:, past:], *flat)


def trace_to_onnx(model, path: str, opset: int) -> None:
    """Writes the decoder's graph (weights inside) to `path` with dynamic batch and lengths.
    TorchScript's tracer: seconds for a 270M model, and the graph patterns (MatMul on a weight,
    Gather of the table) the quantizers and the tied-weight pass expect."""
    inputs, outputs = io_names(model.config.num_hidden_layers)
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total"},
            "position_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}}
    axes.update({name: {0: "batch", 2: "past"} for name in inputs[3:]})
    axes.update({name: {0: "batch", 2: "total"} for name in outputs[1:]})
    model.eval()
    args = sample_inputs(model)
    # dynamo=False: the dynamo exporter needs onnxscript and took 24 s against 1.6 s on the tiny
    # Gemma; the TorchScript exporter still ships with torch 2.13 and is what optimum-onnx used.
    with flat_forward(model):
        torch.onnx.export(model, args, path, input_names=inputs, output_names=outputs, dynamic_axes=axes,
                          opset_version=opset, do_constant_folding=True, dynamo=False)
