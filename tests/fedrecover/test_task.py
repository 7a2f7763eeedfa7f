"""Client training: the chunked loss equals plain cross-entropy (softcapping included), and
LoRA training lowers the loss, leaves the base weights alone and is reproducible from its seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import llmprune
from llmprune.fedrecover import TARGET_MODULES, chunked_lm_loss, lora_applied, module_shapes, train_lora
from llmprune.fedrecover.lora import init_arrays, top_layer_modules
from llmprune.fedrecover.task import batch_order
from llmprune.testing import TINY_TEXT, tiny_model


def plain_loss(model, x):
    logits = model(input_ids=x).logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))


def ids(seed=0, length=41):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(3, 320, (2, length), generator=g)
    x[:, 0] = 1
    return x


@pytest.mark.parametrize("arch, overrides", [("llama", {}), ("qwen3", {}), ("gemma3_text", {}),
                                             ("gemma3_text", {"final_logit_softcapping": 3.0})])
@pytest.mark.parametrize("chunk", [7, 64])
def test_chunked_loss_equals_plain_cross_entropy_with_gradients(arch, overrides, chunk):
    model = tiny_model(arch, **overrides)
    assert getattr(model.config, "final_logit_softcapping", None) == overrides.get("final_logit_softcapping")
    x = ids()
    ours = chunked_lm_loss(model, x, chunk=chunk)
    ours.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    ref = plain_loss(model, x)
    ref.backward()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6)


def test_softcapping_changes_the_loss():
    """The softcap branch is taken (the two models differ only by final_logit_softcapping)."""
    x = ids(1)
    with torch.no_grad():
        capped = chunked_lm_loss(tiny_model("gemma3_text", final_logit_softcapping=0.5), x)
        plain = chunked_lm_loss(tiny_model("gemma3_text"), x)
    assert abs(capped.item() - plain.item()) > 1e-3


def test_batch_order_covers_each_window_once_per_epoch():
    steps = batch_order(5, steps=5, batch_size=2, seed=3)
    flat = np.concatenate(steps)
    assert [len(s) for s in steps] == [2] * 5
    assert sorted(flat[:5]) == list(range(5)) and sorted(flat[5:10]) == list(range(5))
    assert all(np.array_equal(a, b) for a, b in zip(steps, batch_order(5, 5, 2, seed=3)))


@pytest.fixture(scope="module")
def setup(pruned_ckpt, tok):
    model = llmprune.load_model(pruned_ckpt)
    windows = llmprune.token_windows(tok, [TINY_TEXT * 4], 32, 6)
    shapes = module_shapes(model, TARGET_MODULES)
    arrays = init_arrays(shapes, top_layer_modules(shapes, 2), 4, seed=0)
    return model, windows, arrays


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_train_lora_lowers_the_loss_and_leaves_the_base_alone(setup):
    model, windows, arrays = setup
    before = _weights(model)
    with torch.no_grad():
        start = chunked_lm_loss(model, windows).item()
    trained, mean_loss = train_lora(model, arrays, windows, scale=2.0, steps=12, batch_size=2, lr=1e-2, seed=0)
    assert trained.keys() == arrays.keys()
    assert all(trained[k].shape == arrays[k].shape for k in arrays)
    assert any(trained[k].any() for k in trained if k.endswith(".B"))  # B left zero
    with torch.no_grad(), lora_applied(model, trained, 2.0):
        end = chunked_lm_loss(model, windows).item()
    assert end < start - 0.2, (start, end)
    assert np.isfinite(mean_loss) and end < mean_loss < start + 1e-4
    after = _weights(model)
    assert after.keys() == before.keys()                       # no peft modules left behind
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not [n for n, _ in model.named_modules() if "lora" in n.lower()]


def test_train_lora_is_deterministic_for_a_seed(setup):
    model, windows, arrays = setup
    def run(seed):
        return train_lora(model, arrays, windows, scale=2.0, steps=3, batch_size=2, lr=1e-3, seed=seed)

    (a1, l1), (a2, l2), (a3, _) = run(1), run(1), run(2)
    assert l1 == l2
    assert all(np.array_equal(a1[k], a2[k]) for k in a1)
    assert not all(np.array_equal(a1[k], a3[k]) for k in a1)
