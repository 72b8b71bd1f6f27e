"""Training-time quantization of the encoder's Linear layers: Q8BERT-style QAT and Quant-Noise.

Both are context managers, like ``training.layer_drop``: while inside, every encoder Linear
(attention query/key/value/output and the two FFN layers) computes with quantized weights; on exit
every parametrization and hook is removed and the model is a plain transformers model again, with
the same ``state_dict`` keys and the latent full-precision weights, ready for ``save_pretrained``
and for a post-training int8 exporter (``quantize_torch``, ONNX) that quantizes them for real.

- ``quantization_aware``: Q8BERT (Zafrir et al. 2019, "Q8BERT: Quantized 8Bit BERT"). Symmetric
  linear fake quantization of weights and (optionally) Linear inputs in every forward pass, with a
  straight-through estimator (STE) so gradients update the fp32 weights.
- ``quant_noise``: Quant-Noise (Fan et al. 2020, "Training with Quantization Noise for Extreme
  Model Compression"). Only a random subset of weight blocks is quantized in each training
  forward pass, so the other weights get unbiased gradients.

The classifier head and the embeddings are left in full precision: they are not quantized by the
exporters either (the head is tiny; embedding lookups are not matmuls).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from bertshrink.errors import QuantizationError
from bertshrink.modelfolder.structure import encoder_linear_modules

# Q8BERT's reference implementation (Intel NLP Architect) tracks activation ranges with this decay.
DEFAULT_EMA_DECAY = 0.9999


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 2 <= bits <= 16:
        raise QuantizationError(f"bits must be an integer between 2 and 16 (8 for int8, 4 for int4), got {bits!r}.")


def _qmax(bits: int) -> int:
    """Largest level of symmetric ``bits``-bit quantization: levels are -qmax..qmax (Q8BERT)."""
    return 2 ** (bits - 1) - 1


def quantize_dequantize(w: torch.Tensor, bits: int = 8, per_channel: bool = True) -> torch.Tensor:
    """``w`` rounded to its symmetric ``bits``-bit grid and scaled back (no gradient trick).

    scale = max|w| / (2^(bits-1) - 1), per output row (dim 0) when ``per_channel``, else per
    tensor. An all-zero row keeps scale 1 so it stays zero instead of dividing by zero.
    """
    _check_bits(bits)
    qmax = _qmax(bits)
    w = w.detach()
    if per_channel and w.dim() > 1:
        max_abs = w.abs().amax(dim=tuple(range(1, w.dim())), keepdim=True)
    else:
        max_abs = w.abs().amax()
    scale = torch.where(max_abs > 0, max_abs / qmax, torch.ones_like(max_abs))
    return (w / scale).round().clamp(-qmax, qmax) * scale


def _straight_through(x: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """``quantized`` in the forward pass, identity gradient to ``x`` in the backward pass."""
    return x + (quantized - x).detach()


def fake_quantize(w: torch.Tensor, bits: int = 8, per_channel: bool = True) -> torch.Tensor:
    """Symmetric linear fake quantization with a straight-through estimator (Q8BERT).

    The value is ``quantize_dequantize(w)``; the gradient with respect to ``w`` is the identity.
    """
    return _straight_through(w, quantize_dequantize(w, bits, per_channel))


# --------------------------------------------------------------------------- which layers


def _check_not_parametrized(linears: dict[str, nn.Linear]) -> None:
    # Stacking two weight quantizers (e.g. nesting both contexts) would quantize twice; refuse it.
    busy = [name for name, module in linears.items() if parametrize.is_parametrized(module, "weight")]
    if busy:
        raise QuantizationError(f"{busy[0]} (and {len(busy) - 1} more) already have a weight parametrization; "
                         "leave the other quantization/pruning context before entering this one.")


@contextmanager
def _weight_parametrized(linears: dict[str, nn.Linear], make_parametrization):
    """Register ``make_parametrization()`` on each Linear's weight; remove them (latent weights kept) on exit."""
    _check_not_parametrized(linears)
    done = []
    try:
        for module in linears.values():
            order = list(module._parameters)
            # unsafe=True skips a consistency probe call that would draw random noise masks.
            parametrize.register_parametrization(module, "weight", make_parametrization(), unsafe=True)
            done.append((module, order))
        yield
    finally:
        for module, order in done:
            # leave_parametrized=False restores the original fp32 Parameter object (optimizers
            # keep pointing at it); the quantized view is dropped.
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
            _restore_parameter_order(module, order)


def _restore_parameter_order(module: nn.Module, order: list[str]) -> None:
    """Put ``weight`` back before ``bias``: removal re-registers it last, which would reorder
    ``state_dict`` keys (harmless for loading, but the model should be exactly as it was)."""
    params = module._parameters
    ordered = {name: params[name] for name in order if name in params}
    ordered.update(params)  # anything registered meanwhile keeps its place at the end
    params.clear()
    params.update(ordered)


# --------------------------------------------------------------------------- Q8BERT QAT


class _FakeQuantWeight(nn.Module):
    """Parametrization: the weight as the forward pass sees it under QAT."""

    def __init__(self, bits: int, per_channel: bool):
        super().__init__()
        self.bits, self.per_channel = bits, per_channel

    def forward(self, weight):
        return fake_quantize(weight, self.bits, self.per_channel)


@dataclass
class ActivationRanges:
    """EMA of max|x| of each quantized Linear's input (bias-corrected, as NLP Architect does)."""

    decay: float = DEFAULT_EMA_DECAY
    biased: dict[str, float] = field(default_factory=dict)
    steps: dict[str, int] = field(default_factory=dict)

    def update(self, name: str, value: float) -> None:
        self.steps[name] = self.steps.get(name, 0) + 1
        self.biased[name] = self.biased.get(name, 0.0) * self.decay + (1 - self.decay) * value

    def get(self, name: str) -> float | None:
        """The tracked range, or None before the first training-mode forward pass."""
        if name not in self.steps:
            return None
        return self.biased[name] / (1 - self.decay ** self.steps[name])

    def as_dict(self) -> dict[str, float]:
        return {name: self.get(name) for name in self.steps}


def _fake_quantize_input(x: torch.Tensor, max_abs: float, bits: int) -> torch.Tensor:
    """Per-tensor symmetric fake quantization of an activation with a given range, STE gradient."""
    if max_abs <= 0:
        return x
    scale = max_abs / _qmax(bits)
    quantized = (x.detach() / scale).round().clamp(-_qmax(bits), _qmax(bits)) * scale
    return _straight_through(x, quantized)


def _input_quantizer(name: str, ranges: ActivationRanges, bits: int):
    """Forward pre-hook: update the range in training mode, fake-quantize the input with it."""

    def hook(module, args):
        x = args[0]
        current = float(x.detach().abs().max())
        if module.training:
            ranges.update(name, current)
        # Eval before any training step has no tracked range yet: use this batch's (dynamic).
        tracked = ranges.get(name)
        return (_fake_quantize_input(x, current if tracked is None else tracked, bits), *args[1:])

    return hook


@contextmanager
def _input_hooks(linears: dict[str, nn.Linear], ranges: ActivationRanges, bits: int):
    handles = []
    try:
        for name, module in linears.items():
            handles.append(module.register_forward_pre_hook(_input_quantizer(name, ranges, bits)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def quantization_aware(model, bits: int = 8, per_channel: bool = True, quantize_activations: bool = True,
                       ema_decay: float = DEFAULT_EMA_DECAY):
    """Q8BERT quantization-aware training of the encoder Linears while inside.

    Weights are fake-quantized in every forward pass (training and eval), symmetric, per output
    channel by default (Q8BERT used per tensor: ``per_channel=False``). With
    ``quantize_activations`` each Linear's input is fake-quantized per tensor with a range that
    is an EMA of max|x| in training mode and used as is in eval mode. Gradients pass straight
    through. Yields the ``ActivationRanges`` (``.as_dict()``), which are not saved with the model:
    int8 exporters here use dynamic activation ranges.
    """
    _check_bits(bits)
    if not 0 < ema_decay < 1:
        raise QuantizationError(f"ema_decay must be in (0, 1), got {ema_decay}.")
    linears = encoder_linear_modules(model)
    ranges = ActivationRanges(decay=ema_decay)
    with _weight_parametrized(linears, lambda: _FakeQuantWeight(bits, per_channel)):
        if quantize_activations:
            with _input_hooks(linears, ranges, bits):
                yield ranges
        else:
            yield ranges


# --------------------------------------------------------------------------- Quant-Noise


def _block_mask(weight: torch.Tensor, p: float, block_size: int) -> torch.Tensor:
    """Boolean mask, True on the blocks to quantize: each block is ``block_size`` consecutive
    input columns of one output row, chosen with probability ``p``. A last, narrower block covers
    the remainder when ``block_size`` does not divide the number of columns."""
    rows, cols = weight.shape[0], weight[0].numel()
    n_blocks = math.ceil(cols / block_size)
    chosen = torch.rand(rows, n_blocks, device=weight.device) < p
    return chosen.repeat_interleave(block_size, dim=1)[:, :cols].reshape(weight.shape)


class _QuantNoiseWeight(nn.Module):
    """Parametrization: in training mode, a random subset of blocks is replaced by its quantized value."""

    def __init__(self, p: float, block_size: int, bits: int):
        super().__init__()
        self.p, self.block_size, self.bits = p, block_size, bits

    def forward(self, weight):
        # Parametrizations are submodules of the Linear, so model.train()/eval() reaches them.
        if not self.training or self.p == 0:
            return weight
        quantized = quantize_dequantize(weight, self.bits, per_channel=True)
        mask = _block_mask(weight, self.p, self.block_size)
        # Noise only on the chosen blocks; STE: the gradient reaches every fp32 weight unchanged.
        noise = torch.where(mask, quantized - weight.detach(), torch.zeros_like(quantized))
        return weight + noise


@contextmanager
def quant_noise(model, p: float = 0.1, block_size: int = 8, bits: int = 8):
    """Quant-Noise (Fan et al. 2020) on the encoder Linears while inside.

    In training mode, in every forward pass, each block of a weight is replaced by its ``bits``-bit
    symmetric quantization (scale per output row, computed on the whole row) with probability
    ``p``; other blocks stay full precision. A block is ``block_size`` consecutive input columns
    of one output row, the block shape of fairseq's reference ``quant_noise`` for Linear layers
    (the paper's blocks of columns); ``block_size=1`` quantizes single weights, as fairseq's
    scalar intN layers do. The remainder of a row narrower than ``block_size`` is one more block.
    Gradients use the STE. In eval mode no noise is applied. ``p=1`` is full fake quantization
    of the weights (QAT without activation quantization).
    """
    if not 0 <= p <= 1:
        raise QuantizationError(f"Quant-Noise probability p must be in [0, 1], got {p}.")
    if not isinstance(block_size, int) or block_size < 1:
        raise QuantizationError(f"block_size must be a positive integer (columns per block), got {block_size!r}.")
    _check_bits(bits)
    linears = encoder_linear_modules(model)
    with _weight_parametrized(linears, lambda: _QuantNoiseWeight(p, block_size, bits)):
        yield


# --------------------------------------------------------------------------- diagnostics


@torch.no_grad()
def round_weights_(model, bits: int, per_channel: bool = True) -> int:
    """Replace every encoder Linear weight by its ``bits``-bit symmetric quantization, in place.

    Simulates a fully quantized scalar model in PyTorch (the paper's evaluation of Quant-Noise)
    for bit widths no runtime here executes. Returns the number of layers rounded.
    """
    _check_bits(bits)
    linears = encoder_linear_modules(model)
    _check_not_parametrized(linears)
    for module in linears.values():
        module.weight.copy_(quantize_dequantize(module.weight, bits, per_channel))
    return len(linears)


def weight_quantization_error(model, bits: int = 8, per_channel: bool = True) -> float:
    """Mean over encoder Linears of ||w - q(w)|| / ||w||: how much ``bits``-bit quantization
    would change the weights (compare plain, QAT and Quant-Noise trained models)."""
    errors = []
    for module in encoder_linear_modules(model).values():
        w = module.weight.detach().float()
        norm = w.norm()
        if norm > 0:
            errors.append(float((w - quantize_dequantize(w, bits, per_channel)).norm() / norm))
    if not errors:
        raise QuantizationError("The model has no encoder Linear layers with non-zero weights to measure.")
    return sum(errors) / len(errors)
