"""Per-inference overhead of an ONNX model folder at batch 1: fixed and per-token cost, before and after.

``python benchmarks/overhead.py --model-dir models/candidates/tiny-int8 [--threads 2]``

"Before" is one ONNX Runtime session with ``--threads`` intra-op threads for every input (what the
runner did until issue 15); "after" is the runner's ``SizedSessions`` (one thread for inputs of at
most ``SMALL_INPUT_TOKENS`` tokens). Both run the same inputs of 3, 12, 24 and 48 tokens, interleaved
in rotating order; p50 per length, then a least-squares line: its intercept is the fixed cost, its
slope the cost per token. Prints a Markdown table; run it on an idle machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from the repository root

from bertshrink.modelfolder.files import ONNX_FILE  # noqa: E402
from bertshrink.modelfolder.load import load_tokenizer  # noqa: E402
from bertshrink.modelfolder.onnx_session import SizedSessions, make_session  # noqa: E402

LENGTHS = (3, 12, 24, 48)


def feed_of(tokenizer, session, tokens: int) -> dict[str, np.ndarray]:
    """A batch-1 feed of exactly ``tokens`` tokens (special tokens included) of a common word."""
    text = " ".join(["good"] * (tokens - 2))
    encoded = tokenizer([text], truncation=True, max_length=tokens, padding="max_length", return_tensors="np")
    return {i.name: encoded[i.name].astype(np.int64) for i in session.get_inputs()}


def timed_p50(runs: dict, feeds: dict, rounds: int, warmup: int = 20) -> dict[tuple[str, int], float]:
    """p50 ms of every (variant, length), timed interleaved in rotating order."""
    names, times = list(runs), {(n, L): [] for n in runs for L in feeds}
    for r in range(warmup + rounds):
        for L, feed in feeds.items():
            for k in range(len(names)):
                name = names[(r + k) % len(names)]
                start = time.perf_counter()
                runs[name].run(None, feed)
                if r >= warmup:
                    times[(name, L)].append((time.perf_counter() - start) * 1000.0)
    return {key: float(np.percentile(v, 50)) for key, v in times.items()}


def fixed_and_per_token(p50: dict[int, float]) -> tuple[float, float]:
    """Intercept (ms) and slope (ms per token) of the least-squares line through p50 by length."""
    slope, intercept = np.polyfit(list(p50), list(p50.values()), 1)
    return float(intercept), float(slope)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True, type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args()
    path = args.model_dir / ONNX_FILE
    runs = {"before: one session": make_session(path, args.threads), "after: sized sessions": SizedSessions(path, args.threads)}
    tokenizer = load_tokenizer(args.model_dir)
    feeds = {L: feed_of(tokenizer, runs["before: one session"], L) for L in LENGTHS}
    p50 = timed_p50(runs, feeds, args.rounds)
    print(f"| {args.model_dir.name}, {args.threads} threads | " + " | ".join(f"{L} tokens" for L in LENGTHS)
          + " | fixed ms | ms per token |")
    print("|---" * (len(LENGTHS) + 3) + "|")
    for name in runs:
        by_length = {L: p50[(name, L)] for L in LENGTHS}
        fixed, per_token = fixed_and_per_token(by_length)
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in by_length.values()) + f" | {fixed:.3f} | {per_token:.4f} |")


if __name__ == "__main__":
    main()
