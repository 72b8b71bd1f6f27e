"""Distillation losses, pure torch and usable on their own.

- ``kd_logits_loss``: soft-target KL at a temperature (Hinton et al. 2015, "Distilling the
  Knowledge in a Neural Network"; used by DistilBERT, Sanh et al. 2019).
- ``hidden_mse_loss`` / ``embedding_mse_loss`` / ``attention_loss``: intermediate-layer losses of
  TinyBERT (Jiao et al. 2020, "TinyBERT: Distilling BERT for Natural Language Understanding").
- ``labelled_cross_entropy``: hard-label loss that skips unlabelled (transfer-set) rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def kd_logits_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """Soft-target distillation loss: ``KL(softmax(t/T) || softmax(s/T))``, batchmean, times ``T**2``.

    Hinton et al. (2015); DistilBERT's ``L_ce``. The ``T**2`` factor keeps the gradient scale of
    the soft targets roughly independent of ``T`` so that it can be mixed with the hard-label
    cross-entropy. Computed in float32. The teacher logits are treated as constants (detached).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (got {temperature})")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"logit shapes differ: student {tuple(student_logits.shape)} vs teacher "
                         f"{tuple(teacher_logits.shape)}")
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    return F.kl_div(s, t, reduction="batchmean", log_target=True) * temperature**2


def labelled_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the rows that have a label (``labels >= 0``); 0 when none has.

    Transfer texts carry label -100: a batch of only those has no hard-label loss, not a NaN.
    """
    labelled = labels >= 0
    if not labelled.any():
        return logits.sum() * 0.0  # keeps the graph (and the dtype/device) for backward
    return F.cross_entropy(logits[labelled], labels[labelled])


def _masked_mse(a: torch.Tensor, b: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error over ``[batch, seq, dim]``; with a mask, the mean over real tokens only."""
    sq = (a.float() - b.float()) ** 2
    if attention_mask is None:
        return sq.mean()
    mask = attention_mask.to(sq.dtype).unsqueeze(-1)  # [B, L, 1]
    denom = mask.sum() * sq.shape[-1]
    return (sq * mask).sum() / denom.clamp_min(1.0)


def hidden_mse_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, projection: nn.Module | None = None,
                    attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """TinyBERT's hidden-state loss ``MSE(H_s W_h, H_t)`` for one mapped layer pair.

    ``projection`` (``W_h``, an ``nn.Linear(student_width, teacher_width)``) is needed when the widths
    differ; it is learned together with the student. Inputs are ``[batch, seq, width]``. With
    ``attention_mask`` (``[batch, seq]``, 1 for real tokens) the squared error is averaged over real
    tokens (and all dimensions) only, so padding does not count; without it, over everything.
    """
    if projection is not None:
        student_hidden = projection(student_hidden)
    if student_hidden.shape != teacher_hidden.shape:
        raise ValueError(f"hidden shapes differ: student {tuple(student_hidden.shape)} vs teacher "
                         f"{tuple(teacher_hidden.shape)}; pass a projection when the widths differ")
    return _masked_mse(student_hidden, teacher_hidden.detach(), attention_mask)


def embedding_mse_loss(student_emb: torch.Tensor, teacher_emb: torch.Tensor, projection: nn.Module | None = None,
                       attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """TinyBERT's embedding-layer loss ``MSE(E_s W_e, E_t)``: as ``hidden_mse_loss`` on the
    embedding outputs (``hidden_states[0]``), with its own projection ``W_e``."""
    return hidden_mse_loss(student_emb, teacher_emb, projection, attention_mask)


def attention_loss(student_attn: torch.Tensor, teacher_attn: torch.Tensor,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """MSE between the attention maps ``[batch, heads, q_len, k_len]`` of one mapped layer pair.

    We compare attention *probabilities* (post-softmax), which is what transformers returns with
    ``output_attentions=True`` (eager attention). TinyBERT used the pre-softmax scores, but those
    are not exposed by transformers without patching the attention function, and the
    probabilities carry the same information in a bounded range (no huge values from the
    ``-inf``-like mask), which makes the loss better behaved; the scale of this loss is therefore
    smaller than TinyBERT's, so its weight may need to be larger.

    Head counts must match (no projection exists for heads). With ``attention_mask``
    (``[batch, seq]``), the mean runs over real (query, key) pairs only.
    """
    if student_attn.shape[1] != teacher_attn.shape[1]:
        raise ValueError(f"attention head counts differ: student has {student_attn.shape[1]} heads, "
                         f"teacher has {teacher_attn.shape[1]}; the attention loss needs equal counts")
    if student_attn.shape != teacher_attn.shape:
        raise ValueError(f"attention shapes differ: student {tuple(student_attn.shape)} vs teacher "
                         f"{tuple(teacher_attn.shape)}")
    sq = (student_attn.float() - teacher_attn.detach().float()) ** 2
    if attention_mask is None:
        return sq.mean()
    m = attention_mask.to(sq.dtype)
    pair = m[:, None, :, None] * m[:, None, None, :]  # [B, 1, Lq, Lk]
    denom = pair.sum() * sq.shape[1]
    return (sq * pair).sum() / denom.clamp_min(1.0)
