"""Weights rounded in PyTorch as the export stores them (llmprune/artifact.py's layouts), so a plan
can be measured at the precision it will run at without exporting: the decoder's Linear layers in
blocks of `block` inputs (4 bits with a zero point, or 8 bits symmetric for the `wide` ones), the
vocabulary table in 8-bit symmetric blocks (read by the lookup too when tied), norms and biases
fp32. Blocks are fitted round-to-nearest from their minimum and maximum; the export's default
int4 fit (ONNX Runtime's k_quant) searches each block's scale and does a little better, so this
errs on the side of cost, the same way for every candidate."""

from __future__ import annotations

import torch
from torch import nn

from .arch import adapter_for, base_model


def _blocks(weight: torch.Tensor, block: int) -> tuple[torch.Tensor, int]:
    """[rows, cols] -> [rows, blocks, block] along the columns (the MatMul's inputs), zero-padded."""
    rows, cols = weight.shape
    pad = (-cols) % block
    w = torch.nn.functional.pad(weight.float(), (0, pad)) if pad else weight.float()
    return w.reshape(rows, -1, block), cols


def round_symmetric(weight: torch.Tensor, bits: int, block: int) -> torch.Tensor:
    """Symmetric blocks (implicit zero point): scale = |max| / (2^(bits-1) - 1)."""
    w, cols = _blocks(weight, block)
    top = 2 ** (bits - 1) - 1
    scale = w.abs().amax(dim=-1, keepdim=True) / top
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.clamp(torch.round(w / scale), -top, top) * scale
    return q.reshape(weight.shape[0], -1)[:, :cols].to(weight.dtype)


def round_asymmetric(weight: torch.Tensor, bits: int, block: int) -> torch.Tensor:
    """Blocks with an integer zero point, the range widened to hold 0 (ONNX Runtime's rtn)."""
    w, cols = _blocks(weight, block)
    top = 2 ** bits - 1
    lo = torch.clamp(w.amin(dim=-1, keepdim=True), max=0)
    hi = torch.clamp(w.amax(dim=-1, keepdim=True), min=0)
    scale = (hi - lo) / top
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    zero = torch.clamp(torch.round(-lo / scale), 0, top)
    q = (torch.clamp(torch.round(w / scale) + zero, 0, top) - zero) * scale
    return q.reshape(weight.shape[0], -1)[:, :cols].to(weight.dtype)


@torch.no_grad()
def simulate(model: nn.Module, layout) -> nn.Module:
    """Round `model`'s weights in place as `layout` (an artifact.Layout) stores them; returns it."""
    if not layout.layer_bits and not layout.table_bits:
        return model
    for layer in adapter_for(model).decoder_layers(model):
        for name, module in layer.named_modules():
            if isinstance(module, nn.Linear):
                wide = any(w in name for w in layout.wide)
                bits = layout.wide_bits if wide else layout.layer_bits
                fit = round_asymmetric if layout.zero_points and not wide else round_symmetric
                module.weight.copy_(fit(module.weight, bits, layout.block))
    tables = {id(t): t for t in (base_model(model).get_input_embeddings().weight,
                                 getattr(model.get_output_embeddings(), "weight", None)) if t is not None}
    for table in tables.values() if layout.table_bits else ():    # a tied table once
        table.copy_(round_symmetric(table, layout.table_bits, layout.block))
    return model
