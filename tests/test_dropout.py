"""CPU dropout with cheap masks (tunesmith/dropout.py): the keep rate and scale of dropout, its gradient, a pure
function of torch's seed, and attention equal to torch's scaled_dot_product_attention with the mask off."""
import math

import pytest
import torch
import torch.nn.functional as F

from tunesmith.dropout import CheapDropout, keep_mask


@pytest.mark.parametrize("p", [0.1, 0.5, 0.05])
def test_keep_rate_and_scale(p):
    torch.manual_seed(0)
    x = torch.ones(400_000)
    with CheapDropout():
        y = torch.nn.Dropout(p)(x)
    kept = y != 0
    n, rate = x.numel(), float(kept.float().mean())
    thr = round((1 - p) * 65536)
    assert abs(rate - thr / 65536) < 5 * math.sqrt(p * (1 - p) / n)          # binomial: 5 standard errors
    assert torch.all(y[kept] == 65536 / thr)                                  # kept values scaled, mean kept at 1
    assert abs(float(y.mean()) - 1.0) < 5 * math.sqrt(p / (1 - p) / n)


def test_gradient_is_the_mask_times_the_scale():
    torch.manual_seed(1)
    x = torch.randn(64, 33, requires_grad=True)
    with CheapDropout():
        y = F.dropout(x, 0.3, training=True)
    g = torch.randn_like(y)
    y.backward(g)
    kept = y.detach() != 0
    assert 0.6 < float(kept.float().mean()) < 0.8
    thr = round(0.7 * 65536)
    assert torch.allclose(x.grad, g * kept * (65536 / thr))
    assert torch.allclose(y.detach(), x.detach() * kept * (65536 / thr))


def test_masks_follow_torch_seed():
    def masks(seed):
        torch.manual_seed(seed)
        return [keep_mask(torch.Size([1000]), 0.2)[0] for _ in range(2)]

    a, b = masks(3), masks(3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))               # same seed: same masks (exact resume)
    assert not torch.equal(a[0], a[1])                                 # successive masks differ
    assert not torch.equal(a[0], masks(4)[0])


def test_only_training_dropout_on_cpu_is_replaced():
    x = torch.randn(1000)
    with CheapDropout():
        assert torch.equal(F.dropout(x, 0.5, training=False), x)
        assert torch.equal(F.dropout(x, 0.0, training=True), x)
        torch.manual_seed(0)
        ours = F.dropout(x, 0.5, training=True)
    torch.manual_seed(0)
    theirs = F.dropout(x, 0.5, training=True)
    assert not torch.equal(ours, theirs)                               # the mode did replace torch's masks


@pytest.mark.parametrize("case", ["bool", "additive", "causal", "gqa", "empty_row"])
def test_attention_equals_torch_when_nothing_is_dropped(case):
    """dropout_p 1e-7 rounds to keeping every element; the result must then equal torch's attention without
    dropout, for every mask form transformers passes."""
    torch.manual_seed(0)
    q = torch.randn(2, 4, 7, 8, requires_grad=True)
    hk = 2 if case == "gqa" else 4
    k, v = torch.randn(2, hk, 7, 8), torch.randn(2, hk, 7, 8)
    kw = {}
    if case in ("bool", "empty_row"):
        m = torch.rand(2, 1, 7, 7) > 0.3
        m[..., 0] = True
        if case == "empty_row":
            m[0, 0, 3] = False                                         # a query that may attend to nothing
        kw["attn_mask"] = m
    elif case == "additive":
        kw["attn_mask"] = torch.randn(2, 1, 7, 7)
    elif case == "causal":
        kw["is_causal"] = True
    else:
        kw["enable_gqa"] = True
    want = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, **kw)
    with CheapDropout():
        got = F.scaled_dot_product_attention(q, k, v, dropout_p=1e-7, **kw)
    assert got.grad_fn is not None
    assert torch.allclose(got, want, atol=1e-5)
    if case == "empty_row":
        assert torch.all(got[0, :, 3] == 0) and not torch.isnan(got).any()


def test_attention_dropout_drops_probabilities():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8), torch.eye(16).expand(1, 2, 16, 16)
    with CheapDropout():
        probs = F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)  # v = I: the output is the dropped probs
    dropped = float((probs == 0).float().mean())
    assert 0.35 < dropped < 0.65
    full = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(8), -1)
    kept = probs != 0
    assert torch.allclose(probs[kept], full[kept] * (65536 / 32768), atol=1e-6)


def test_probabilities_that_round_to_zero_or_one():
    x = torch.randn(5000)
    with CheapDropout():
        assert torch.equal(F.dropout(x, 1e-7, training=True), x)                 # keeps all, scale 1
        assert torch.equal(F.dropout(x, 1 - 1e-7, training=True), torch.zeros_like(x))


def test_attention_by_keyword_and_without_safe_softmax(monkeypatch):
    """transformers may pass q, k, v by name; torch 2.4 (allowed by pyproject) has no torch._safe_softmax."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
    m = torch.ones(1, 1, 5, 5, dtype=torch.bool)
    m[0, 0, 2] = False
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
    monkeypatch.delattr(torch, "_safe_softmax")
    with CheapDropout():
        got = F.scaled_dot_product_attention(query=q, key=k, value=v, attn_mask=m, dropout_p=1e-7)
    assert torch.allclose(got, want, atol=1e-6) and torch.all(got[0, :, 2] == 0)


def test_mask_is_applied_without_dtype_copies():
    """The mask is applied as a bool view (torch.where): x * mask with the uint8 mask would first cast both to a
    common dtype, copies of the activation (forward) and of its gradient (backward) that cost ~3x the op itself."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    x = torch.randn(64, 128, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof, CheapDropout():
        y = F.dropout(x, 0.1, training=True)
        y.backward(torch.ones_like(y))
    copies = [(e.name, e.input_shapes) for e in prof.events() if e.name in ("aten::_to_copy", "aten::copy_")
              and any(shape for shape in e.input_shapes)]            # 0-dim ones: the seed's .item(), scalars
    assert "aten::where" in {e.name for e in prof.events()} and not copies, copies
    kept = y.detach() != 0
    assert torch.equal(x.grad, kept * (65536 / round(0.9 * 65536)))
