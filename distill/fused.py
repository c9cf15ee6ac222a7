"""Logit terms from the output layer's inputs: never a ``[tokens, vocab]`` tensor, forward or backward.

The student's forward stops before its output layer (:func:`head_bypassed`), and the objective
computes its logit terms chunk by chunk from the final hidden states and the output layer's weight:
per chunk, the student's and teacher's logits, the per-token losses of :mod:`distill.losses`
(unchanged: the same float32 divergences, temperature and masking), and at once the gradient of
the weighted total with respect to the chunk's logits, which two matmuls turn into the gradients
of the hidden states and of the weight. Backward then only scales those by the incoming
gradient, so no logits are kept or recomputed (Liger's fused linear losses do the same on GPU).

Only target rows (labels != IGNORE_INDEX) are computed at all: a masked prompt costs nothing.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from distill.losses import IGNORE_INDEX, log_probs

HEAD_INPUTS = "head_inputs"  # what a fused objective asks a model for instead of logits


def _identity(x, *args, **kwargs):
    return x


@contextlib.contextmanager
def head_bypassed(model):
    """Within the context, ``model(...)`` returns the output layer's *inputs* as its ``logits``.

    Works for any model whose output layer is ``get_output_embeddings()`` (Llama, GPT-2, Qwen2,
    BERT's MLM decoder after its transform), wrapped by peft or not. Yields that layer.
    """
    head = model.get_output_embeddings()
    head.forward = _identity  # an instance attribute shadows the class's forward; hooks still run
    try:
        yield head
    finally:
        del head.forward


def plain_linear(head) -> bool:
    """Whether ``head`` is a plain ``nn.Linear`` whose weight the fused path may use directly
    (not a LoRA-wrapped or quantized layer, whose effective weight is not ``head.weight``)."""
    return type(head) is nn.Linear


def chunk_rows(vocab: int) -> int:
    """Rows per chunk that keep one chunk of logits near 4M values (16 MB in float32)."""
    return max(16, 2**22 // vocab)


def target_rows(labels: torch.Tensor) -> torch.Tensor:
    """``[N]`` flat indices of the unmasked targets of ``labels`` (any shape)."""
    return (labels.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)


def at_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``[len(rows), x.shape[-1]]``: the flattened rows ``rows`` of ``x``; no copy when they are all of them (every position a target)."""
    flat = x.reshape(-1, x.shape[-1])
    return flat if rows.numel() == flat.shape[0] else flat.index_select(0, rows)


TeacherChunk = Callable[[int, int], "torch.Tensor | None"]


class _HeadSums(torch.autograd.Function):
    """``[n_terms]`` float32 sums over rows of ``fn(hidden @ weight[:vocab].T + bias, teacher, labels)``.

    The gradients are those of ``sum_i term_weights[i] * sums[i]`` (the objective's total), computed
    in forward; backward accepts only an incoming gradient proportional to ``term_weights``
    (``Objective.total(sums) * c``, which is what the training step backpropagates).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, teacher: TeacherChunk, terms, vocab: int, chunk_size: int):
        w = weight[:vocab].detach()
        b = None if bias is None else bias[:vocab].detach()
        need_h, need_w, need_b = hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad
        grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
        grad_b = torch.zeros(b.shape, dtype=torch.float32, device=b.device) if need_b else None
        tw = torch.tensor([weight for _, _, weight in terms], dtype=torch.float32, device=hidden.device)
        sums = torch.zeros(len(terms), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            stop = min(start + chunk_size, hidden.shape[0])
            h = hidden[start:stop].detach()
            values, grad_logits = _chunk_terms(F.linear(h, w, b), teacher(start, stop), labels[start:stop], terms,
                                               need_grad=need_h or need_w or need_b)
            sums += values
            if grad_logits is None:
                continue
            if need_h:
                grad_h[start:stop] = grad_logits @ w.float()
            if need_w:
                grad_w.addmm_(grad_logits.T, h.float())
            if need_b:
                grad_b += grad_logits.sum(0)
        ctx.save_for_backward(tw, *(g if g is not None else torch.empty(0) for g in (grad_h, grad_w, grad_b)))
        ctx.present = (need_h, need_w, need_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.full = (weight.shape[0], None if bias is None else bias.shape[0])
        return sums

    @staticmethod
    def backward(ctx, grad_sums):
        tw, *grads = ctx.saved_tensors
        norm = (tw * tw).sum()
        scale = (grad_sums.float() * tw).sum() / norm if norm > 0 else grad_sums.new_zeros((), dtype=torch.float32)
        if not torch.allclose(grad_sums.float(), scale * tw, rtol=1e-4, atol=1e-6 * float(grad_sums.abs().max())):
            raise RuntimeError("the fused loss's gradient is that of the objective's weighted total: backpropagate Objective.total(sums)")
        out = []
        for g, present, dtype, full in zip(grads, ctx.present, ctx.dtypes, (None, *ctx.full)):
            if not present:
                out.append(None)
                continue
            g = g.mul_(scale).to(dtype)  # in place: the float32 buffer itself becomes the gradient
            if full is not None and full > g.shape[0]:  # the weight beyond the shared vocabulary gets no gradient
                g = torch.cat([g, g.new_zeros((full - g.shape[0], *g.shape[1:]))])
            out.append(g)
        return out[0], out[1], out[2], None, None, None, None, None


def _chunk_terms(logits: torch.Tensor, teacher_logits, labels: torch.Tensor, terms, *, need_grad: bool):
    """(``[n_terms]`` float32 sums of the terms over one chunk's rows, the gradient of their weighted
    total with respect to ``logits``, or None when nothing is trained on).

    A term with a closed-form gradient (:meth:`distill.objective.Term.closed_form`: forward KL and
    cross-entropy on dense logits) gives it directly, sharing the student's log-probabilities per
    temperature; the others are differentiated by autograd; a zero-weight term is only evaluated.
    """
    cache = {}

    def student_log_probs(temperature: float) -> torch.Tensor:
        if temperature not in cache:
            cache[temperature] = log_probs(logits, temperature)
        return cache[temperature]

    values, grad, traced = [], None, []
    for i, (fn, closed_form, weight) in enumerate(terms):
        closed = closed_form(teacher_logits) if need_grad and weight else None
        if not (need_grad and weight):  # only evaluated
            values.append(fn(logits, teacher_logits, labels).sum())
        elif closed is None:  # differentiated below, with the others like it
            values.append(None)
            traced.append(i)
        else:
            value, g = closed(logits, teacher_logits, labels, student_log_probs)
            values.append(value.sum())
            grad = g.mul_(weight) if grad is None else grad.add_(g, alpha=weight)
    if traced:
        with torch.enable_grad():
            leaf = logits.detach().requires_grad_()
            per_term = {i: terms[i][0](leaf, teacher_logits, labels).sum() for i in traced}
            total = sum(value * terms[i][2] for i, value in per_term.items())
            g = torch.autograd.grad(total, leaf)[0].float() if total.requires_grad else None
        for i, value in per_term.items():
            values[i] = value.detach()
        if g is not None:
            grad = g if grad is None else grad.add_(g)
    return torch.stack([v.float() for v in values]), grad


def head_sums(features: torch.Tensor, head: nn.Linear, teacher: TeacherChunk, labels: torch.Tensor, terms: list, *,
              vocab: int, chunk_size: int) -> torch.Tensor:
    """``[len(terms)]`` sums of per-token losses over the unmasked targets, from the student's output-layer inputs.

    Args:
        features: ``[..., H]`` the student's output-layer inputs at the target positions.
        head: the student's output layer (a plain ``nn.Linear``; under ZeRO-3 its weight is
            partitioned: reading ``head.weight`` inside the prepared module's forward makes
            DeepSpeed gather it and register it as an external parameter of that module, so it
            stays gathered through the module's backward and its gradient is reduced and
            partitioned like any other).
        teacher: ``fn(start, stop)`` the teacher's ``[stop - start, vocab]`` logits of those target rows, or None.
        labels: ``[...]`` targets, ``IGNORE_INDEX`` where masked; only unmasked rows are computed.
        terms: ``(fn, closed_form, weight)`` per term: ``fn`` a per-token function as in
            :func:`distill.losses.term_sums`; ``closed_form(teacher_logits)`` its loss-and-gradient
            function or None (:meth:`distill.objective.Term.closed_form`); ``weight`` its weight in
            the total that will be backpropagated.
    """
    rows = target_rows(labels)
    hidden = at_rows(features, rows)
    weight, bias = head.weight, head.bias
    if rows.numel() == 0:  # zeros that keep every input in the graph (DDP, ZeRO); with rows, _HeadSums has them (a slice
        # of the weight here would cost a [vocab, H] zero gradient in backward)
        return (hidden.sum() + weight[:0].sum()) * torch.zeros(len(terms), device=features.device)
    return _HeadSums.apply(hidden, weight, bias, at_rows(labels.unsqueeze(-1), rows).squeeze(-1), teacher, tuple(terms), vocab, chunk_size)


def teacher_chunks(teacher, labels: torch.Tensor, vocab: int) -> TeacherChunk:
    """``fn(start, stop)`` giving the teacher's logits for target rows ``start:stop`` (see :func:`head_sums`).

    From dense logits, a slice; from output-layer inputs, the teacher's own output layer applied to
    those rows only (quantized or not: it is called as a module, without autograd).
    """
    if teacher is None:
        return lambda start, stop: None
    if teacher.sparse is not None:  # a store's targets: already one row per unmasked target
        return lambda start, stop: teacher.sparse[start:stop]
    rows = target_rows(labels)
    if teacher.logits is not None:
        flat = at_rows(teacher.logits, rows)
        return lambda start, stop: flat[start:stop]
    features = at_rows(teacher.features, rows)

    def chunk(start, stop):
        with torch.no_grad():
            return teacher.head(features[start:stop])[..., :vocab]

    return chunk
