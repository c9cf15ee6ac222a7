"""Every divergence against a naive float64 reference written out here, plus identities."""

import math

import pytest
import torch

from distill import losses
from distill.config import LossConfig
from distill.losses import IGNORE_INDEX
from distill.objective import Outputs, build_objective


def softmax64(logits, temperature):
    z = logits.double() / temperature
    z = z - z.max(-1, keepdim=True).values
    e = z.exp()
    return e / e.sum(-1, keepdim=True)


def kl64(p, q):
    """sum p * (log p - log q), with 0 log 0 = 0."""
    terms = torch.where(p > 0, p * (p.log() - q.log()), torch.zeros_like(p))
    return terms.sum(-1)


def reference(kind, s, t, temperature, beta=0.5, alpha=0.1):
    p_s, p_t = softmax64(s, temperature), softmax64(t, temperature)
    if kind == "forward_kl":
        return kl64(p_t, p_s)
    if kind == "reverse_kl":
        return kl64(p_s, p_t)
    if kind == "jsd":
        m = beta * p_t + (1 - beta) * p_s
        return beta * kl64(p_t, m) + (1 - beta) * kl64(p_s, m)
    if kind == "skew_forward_kl":
        return kl64(p_t, alpha * p_t + (1 - alpha) * p_s)
    if kind == "skew_reverse_kl":
        return kl64(p_s, alpha * p_s + (1 - alpha) * p_t)
    if kind == "tvd":
        return 0.5 * (p_t - p_s).abs().sum(-1)
    raise AssertionError(kind)


def call(kind, s, t, temperature, beta=0.5, alpha=0.1):
    fn = losses.DIVERGENCES[kind]
    extra = {"jsd": {"beta": beta}, "skew_forward_kl": {"alpha": alpha}, "skew_reverse_kl": {"alpha": alpha}}.get(kind, {})
    return fn(s, t, temperature=temperature, **extra)


KINDS = list(losses.DIVERGENCES)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("scale", [1.0, 30.0])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_matches_float64_reference(kind, scale, temperature):
    g = torch.Generator().manual_seed(hash((kind, scale, temperature)) % 2**31)
    s = torch.randn(3, 5, 50, generator=g) * scale
    t = torch.randn(3, 5, 50, generator=g) * scale
    got = call(kind, s, t, temperature)
    assert got.shape == (3, 5) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), reference(kind, s, t, temperature), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_computed_in_float32(kind, dtype):
    g = torch.Generator().manual_seed(7)
    s = (torch.randn(4, 64, generator=g) * 8).to(dtype)
    t = (torch.randn(4, 64, generator=g) * 8).to(dtype)
    got = call(kind, s, t, 1.0)
    assert got.dtype == torch.float32
    # The reference sees the same rounded inputs, so only float32 arithmetic error remains.
    torch.testing.assert_close(got.double(), reference(kind, s.float(), t.float(), 1.0), rtol=1e-4, atol=1e-5)


def test_large_magnitudes_stay_finite():
    s = torch.tensor([[1e4, -1e4, 0.0]])
    t = torch.tensor([[-1e4, 1e4, 0.0]])
    for kind in KINDS:
        value = call(kind, s, t, 1.0)
        assert torch.isfinite(value).all(), kind


@pytest.mark.parametrize("kind", KINDS)
def test_identical_inputs_give_zero(kind):
    x = torch.randn(2, 7, 33) * 5
    torch.testing.assert_close(call(kind, x, x.clone(), 1.3), torch.zeros(2, 7), atol=1e-6, rtol=0)


def test_jsd_endpoints_equal_the_kls():
    s, t = torch.randn(4, 40) * 3, torch.randn(4, 40) * 3
    torch.testing.assert_close(losses.jsd(s, t, beta=0.0, temperature=2.0), losses.forward_kl(s, t, temperature=2.0))
    torch.testing.assert_close(losses.jsd(s, t, beta=1.0, temperature=2.0), losses.reverse_kl(s, t, temperature=2.0))


def test_jsd_is_bounded_and_symmetric_at_half():
    s, t = torch.randn(8, 40) * 10, torch.randn(8, 40) * 10
    value = losses.jsd(s, t, beta=0.5)
    assert (value <= math.log(2) + 1e-6).all()
    torch.testing.assert_close(value, losses.jsd(t, s, beta=0.5))


def test_skew_zero_equals_plain_kl():
    s, t = torch.randn(4, 40), torch.randn(4, 40)
    torch.testing.assert_close(losses.skew_forward_kl(s, t, alpha=0.0), losses.forward_kl(s, t))
    torch.testing.assert_close(losses.skew_reverse_kl(s, t, alpha=0.0), losses.reverse_kl(s, t))


def masked_reference(s, t, labels, kind):
    mask = labels != IGNORE_INDEX
    kd = (reference(kind, s, t, 1.0) * mask).sum()
    logp = torch.log_softmax(s.double(), -1)
    ce = -(logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask).sum()
    return kd, ce


def kd_and_ce(s, t, labels, kind="forward_kl", chunk_size=1024):
    """The KD and CE sums of the shorthand objective (``loss.kind=KIND``), as the trainer computes them."""
    objective = build_objective(LossConfig(kind=kind, chunk_size=chunk_size))
    kd, ce = objective.sums(Outputs(logits=s), None if t is None else Outputs(logits=t), labels)
    return kd, ce


@pytest.mark.parametrize("kind", ["forward_kl", "jsd", "tvd"])
def test_chunked_equals_unchunked_values_and_gradients(kind):
    g = torch.Generator().manual_seed(3)
    s = (torch.randn(3, 11, 29, generator=g) * 4).requires_grad_()
    t = torch.randn(3, 11, 29, generator=g) * 4
    labels = torch.randint(0, 29, (3, 11), generator=g)
    labels[0, :5] = IGNORE_INDEX
    results = []
    for chunk in (1000, 7, 1):
        s.grad = None
        kd, ce = kd_and_ce(s, t, labels, kind, chunk_size=chunk)
        (kd + 0.5 * ce).backward()
        results.append((kd.detach(), ce.detach(), s.grad.clone()))
    ref_kd, ref_ce = masked_reference(s.detach(), t, labels, kind)
    for kd, ce, grad in results:
        torch.testing.assert_close(kd.double(), ref_kd, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ce.double(), ref_ce, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad, results[0][2], rtol=1e-5, atol=1e-6)


def test_all_masked_gives_zero_without_nan():
    s = torch.randn(2, 4, 10, requires_grad=True)
    t = torch.randn(2, 4, 10)
    labels = torch.full((2, 4), IGNORE_INDEX)
    kd, ce = kd_and_ce(s, t, labels, chunk_size=3)
    assert kd.item() == 0.0 and ce.item() == 0.0
    # Backward must run (every DDP/ZeRO rank has to), and give zero gradients.
    (kd + ce).backward()
    assert s.grad is not None and torch.equal(s.grad, torch.zeros_like(s))


def test_no_teacher_gives_only_cross_entropy():
    s = torch.randn(2, 4, 10)
    labels = torch.randint(0, 10, (2, 4))
    kd, ce = kd_and_ce(s, None, labels)
    assert kd.item() == 0.0
    torch.testing.assert_close(ce, torch.nn.functional.cross_entropy(s.reshape(-1, 10), labels.reshape(-1), reduction="sum"))


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
def test_closed_form_gradients_equal_autograd(temperature):
    """The fused path's closed forms (forward KL, cross-entropy): the same per-token loss as the
    autograd functions and the same gradient with respect to the student's logits."""
    from distill.losses import cross_entropy, cross_entropy_and_grad, forward_kl, forward_kl_and_grad

    g = torch.Generator().manual_seed(3)
    student = (torch.randn(37, 53, generator=g) * 3).requires_grad_()
    teacher = torch.randn(37, 53, generator=g) * 3
    labels = torch.randint(0, 53, (37,), generator=g)
    weights = torch.rand(37, generator=g)  # a gradient that is not all ones
    for fn, closed in ((lambda s: forward_kl(s, teacher, temperature=temperature), lambda s: forward_kl_and_grad(s, teacher, temperature=temperature)),
                       (lambda s: cross_entropy(s, None, labels), lambda s: cross_entropy_and_grad(s, labels))):
        loss = fn(student)
        (expected,) = torch.autograd.grad((loss * weights).sum(), student)
        value, grad = closed(student.detach())
        torch.testing.assert_close(value, loss.detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grad * weights[:, None], expected, rtol=1e-5, atol=1e-6)
