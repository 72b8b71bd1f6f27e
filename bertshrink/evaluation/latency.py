"""Latency: seeded batches of real texts, warm-up, fixed threads, p50/p95; several models interleaved.

Two figures per batch: the forward pass alone (``p50_ms``/``p95_ms``: what the model costs), and
text in -> label out (``e2e_p50_ms``/``e2e_p95_ms``: tokenization, forward and argmax, what a
user's service pays), from the same call. Importing this module has no side effects: torch
threads are only changed inside measurements and restored afterwards.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from bertshrink.config.params import EvaluateParams
from bertshrink.config.recipes import EVALUATION_SPLITS
from bertshrink.evaluation.noise import load_window, noise_reasons, noise_summary, round_ratios, rounds_for, spread
from bertshrink.modelfolder.runners import open_model

@contextlib.contextmanager
def fixed_threads(threads: int) -> Iterator[None]:
    """Use ``threads`` intra-op torch threads inside the block, then restore the old count."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _draw(rng: np.random.Generator, texts: Sequence[str], n: int) -> list[str]:
    # Without replacement when there are enough texts, so a batch holds n distinct examples.
    idx = rng.choice(len(texts), size=n, replace=len(texts) < n)
    return [texts[i] for i in idx]


def sample_sequence_lengths(tokenizer, texts: Sequence[str], max_length: int, n: int,
                            seed: int) -> list[int]:
    """Token counts (special tokens included, truncated at ``max_length``) of ``n`` seeded draws."""
    if not texts:
        raise ValueError("no texts to sample sequence lengths from")
    drawn = _draw(np.random.default_rng(seed), list(texts), n)
    ids = tokenizer(drawn, truncation=True, max_length=max_length)["input_ids"]
    return [len(x) for x in ids]


def _encode_batch(runner, tokenizer, texts: Sequence[str], max_length: int):
    return tokenizer(list(texts), truncation=True, max_length=max_length, padding="longest",
                     return_tensors=runner.return_tensors)


def _time_once(runner, tokenizer, texts: Sequence[str], max_length: int) -> tuple[float, float, int]:
    """Milliseconds of the forward pass alone and of text -> label (tokenize, forward, argmax) for
    one batch, and its padded sequence length."""
    start = time.perf_counter()
    encoded = _encode_batch(runner, tokenizer, texts, max_length)
    tokenized = time.perf_counter()
    np.asarray(runner.forward(encoded)).argmax(axis=-1)
    done = time.perf_counter()
    return (done - tokenized) * 1000.0, (done - start) * 1000.0, int(encoded["input_ids"].shape[1])


def time_forward(runner, tokenizer, texts: Sequence[str], batch_size: int, params: EvaluateParams,
                 seed: int) -> tuple[list[float], list[int], list[float]]:
    """Forward-pass times (ms), padded sequence lengths and text -> label times (ms) of seeded
    batches of real texts.

    Each batch is ``batch_size`` texts drawn from ``texts``, truncated at ``params.max_length``
    and padded to its longest member, so sequence lengths follow the real data.
    ``params.warmup_iterations`` batches run untimed first (allocator and kernel warm-up). The
    same seed draws the same batches for every model.
    """
    if not texts:
        raise ValueError("no texts to measure latency on")
    texts = list(texts)
    rng = np.random.default_rng(seed)
    times_ms: list[float] = []
    seq_lens: list[int] = []
    e2e_ms: list[float] = []
    with fixed_threads(params.threads):
        for i in range(params.warmup_iterations + params.timed_iterations):
            forward, text_to_label, seq_len = _time_once(runner, tokenizer, _draw(rng, texts, batch_size),
                                                         params.max_length)
            if i >= params.warmup_iterations:
                times_ms.append(forward)
                seq_lens.append(seq_len)
                e2e_ms.append(text_to_label)
    return times_ms, seq_lens, e2e_ms


def latency_summary(times_ms: Sequence[float], seq_lens: Sequence[int], batch_size: int,
                    e2e_ms: Sequence[float] | None = None) -> dict:
    """p50/p95/mean forward latency, throughput, the mean padded length of timed batches and, given
    ``e2e_ms``, the text -> label p50/p95."""
    mean_ms = float(np.mean(times_ms))
    text_to_label = {"e2e_p50_ms": float(np.percentile(e2e_ms, 50)),
                     "e2e_p95_ms": float(np.percentile(e2e_ms, 95))} if e2e_ms else {}
    return {**text_to_label,
        "batch_size": batch_size,
        "p50_ms": float(np.percentile(times_ms, 50)),
        "p95_ms": float(np.percentile(times_ms, 95)),
        "mean_ms": mean_ms,
        "throughput_eps": batch_size / (mean_ms / 1000.0),
        "mean_seq_len": float(np.mean(seq_lens)),
        "iterations": len(times_ms),
    }


def measure_latency(runner, tokenizer, texts: Sequence[str], batch_size: int,
                    params: EvaluateParams, seed: int) -> dict:
    """Latency of ``runner.forward`` and of text -> label (see ``time_forward``), summarised."""
    times_ms, seq_lens, e2e_ms = time_forward(runner, tokenizer, texts, batch_size, params, seed)
    return latency_summary(times_ms, seq_lens, batch_size, e2e_ms)


@dataclass(frozen=True)
class LatencyComparison:
    """``latency``: ``{name: {"batch_<b>": summary}}``; ``noise``: the guard's record (``noise.noise_summary``)."""

    latency: dict[str, dict]
    noise: dict


def _batches(rng: np.random.Generator, texts: Sequence[str], batch_size: int, params: EvaluateParams,
             rounds: int) -> list[list[str]]:
    """Warm-up batches, then the timed ones: with rounds, the same ``timed_iterations / rounds`` batches
    replayed round after round, so rounds differ by the machine's state, not by their texts."""
    warmup = [_draw(rng, texts, batch_size) for _ in range(params.warmup_iterations)]
    distinct = -(-params.timed_iterations // rounds)
    pool = [_draw(rng, texts, batch_size) for _ in range(distinct)]
    return warmup + (pool * rounds)[:params.timed_iterations]


def _time_interleaved(runners: Mapping[str, Any], batches: Sequence[list[str]], params: EvaluateParams) -> tuple[dict, dict, dict, dict]:
    """Forward ms, sequence lengths and text -> label ms per model for the timed batches (after the
    warm-up), each batch run by every model back to back in an order rotating per batch; and the
    machine's load over the timed part (``noise.load_window``)."""
    names = list(runners)
    times, lens, e2e = ({name: [] for name in names} for _ in range(3))
    load: dict = {}
    with contextlib.ExitStack() as stack:
        for i, batch in enumerate(batches):
            if i == params.warmup_iterations:
                load = stack.enter_context(load_window())
            for k in range(len(names)):
                name = names[(i + k) % len(names)]
                runner = runners[name]
                forward, text_to_label, seq_len = _time_once(runner, runner.tokenizer, batch, params.max_length)
                if i >= params.warmup_iterations:
                    times[name].append(forward)
                    lens[name].append(seq_len)
                    e2e[name].append(text_to_label)
    return times, lens, e2e, load


def _noise_of_attempt(times: Mapping[str, Sequence[float]], summaries: Mapping[str, dict], load: dict,
                      params: EvaluateParams, rounds: int) -> dict:
    """The load, the ratio spreads over rounds and the reasons (if any) this attempt is noisy."""
    reference = next(iter(times))
    per_round = params.timed_iterations // rounds
    by_round = round_ratios(times, reference, rounds, per_round) if rounds > 1 else {}
    spreads = {name: spread(values) for name, values in by_round.items()}
    tails = {name: (s["p50_ms"], s["p95_ms"]) for name, s in summaries.items()}
    reasons = noise_reasons(load["busy_cores_elsewhere"], params.threads, load["usable_cores"], spreads, tails,
                            params.load_tolerance_cores, params.ratio_tolerance, params.max_tail_ratio, reference)
    return {**load, "reference": reference, "rounds": rounds, "ratios_by_round": by_round,
            "ratio_spread": spreads, "reasons": reasons}


def compare_latency(model_dirs: Mapping[str, Path], texts: Sequence[str], params: EvaluateParams,
                    seed: int = 0, runners: Mapping[str, Any] | None = None) -> LatencyComparison:
    """Latency of several models measured interleaved, batch by batch, so they share the machine's state,
    with the noise guard's verdict on how calm the machine was.

    On a shared machine the speed drifts by tens of percent over seconds to minutes; models timed
    one after another absorb that drift into their ratios. Here every drawn batch is run by every
    model, back to back, in an order that rotates with each batch. The first model is the
    reference of the ratios the guard follows over rounds. A batch size whose timing is noisy
    (``noise.noise_reasons``) is timed again, up to ``params.noise_retries`` times; the last
    attempt's figures are kept, and marked noisy if it still was. ``runners`` (name -> runner)
    skips loading, for tests.
    """
    runners = dict(runners) if runners is not None else {
        name: open_model(Path(d), params.threads) for name, d in model_dirs.items()}
    names = list(runners)
    texts = list(texts)
    if not texts:
        raise ValueError("no texts to measure latency on")
    rounds = rounds_for(params.timed_iterations, params.rounds)
    results: dict[str, dict] = {name: {} for name in names}
    batches_noise: dict[str, dict] = {}
    with fixed_threads(params.threads):
        for batch_size in params.batch_sizes:
            key, attempts = f"batch_{batch_size}", []
            for _ in range(params.noise_retries + 1):
                batches = _batches(np.random.default_rng(seed), texts, batch_size, params, rounds)
                times, lens, e2e, load = _time_interleaved(runners, batches, params)
                summaries = {name: latency_summary(times[name], lens[name], batch_size, e2e[name]) for name in names}
                attempts.append(_noise_of_attempt(times, summaries, load, params, rounds))
                if not attempts[-1]["reasons"]:
                    break
            for name in names:
                results[name][key] = summaries[name]
            batches_noise[key] = {"attempts": attempts}
    return LatencyComparison(results, noise_summary(batches_noise, params.threads))


def latency_texts(splits: Mapping[str, pd.DataFrame], eval_splits: Sequence[str] = EVALUATION_SPLITS) -> list[str]:
    # Latency uses the real test texts; fall back to the last evaluated split.
    name = "test" if "test" in splits else eval_splits[-1]
    return splits[name]["text"].astype(str).tolist()


def ratios(name: str, reference: str, latency: dict, sizes: dict) -> dict:
    """``speedup_vs_<reference>`` per batch size and ``smaller_vs_<reference>`` (2.0 = twice as fast / small)."""
    return {f"speedup_vs_{reference}": speedups(latency[name], latency[reference]),
            f"smaller_vs_{reference}": sizes[reference] / sizes[name] if sizes[name] else None}


def speedups(latency: dict, reference: dict) -> dict:
    """Reference p50 / this model's p50 per batch size (2.0 = twice as fast)."""
    return {key: reference[key]["p50_ms"] / value["p50_ms"] for key, value in latency.items()
            if key in reference and value["p50_ms"] > 0}
