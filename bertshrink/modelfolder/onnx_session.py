"""The one place ONNX Runtime sessions are built, so export checks, quantization and latency
measurements all run with the same threading."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort


def make_session(onnx_path: Path, threads: int):
    """An ONNX Runtime CPU session with ``threads`` intra-op threads and no spinning.

    Spinning is off because on a small, shared machine idle ORT workers that spin keep a core
    busy after ``run`` returns and slow down the next model measured interleaved (measured on 2
    cores: int8 batch-1 13.4 ms with spinning vs 9.4 ms without).
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(onnx_path), sess_options=options,
                                providers=["CPUExecutionProvider"])


# Inputs of at most this many tokens (batch x sequence) run on a one-thread session. Without spinning,
# every parallel operator wakes the pool's sleeping threads, a fixed cost per node that small
# inputs pay with no arithmetic to split. Measured on 2 idle cores (benchmarks/overhead.py, an SST-2
# tiny-int8 shape, 3 runs): one thread wins at 3 and 12 tokens in every run, ties at 24, and loses
# at 48 in 2 of 3 (README, "Per-inference overhead").
SMALL_INPUT_TOKENS = 32
# The second session holds its own copy of the weights: only small graphs get one.
SMALL_INPUT_SESSION_MAX_BYTES = 64 * 2**20


class SizedSessions:
    """A model's sessions by input size: one thread for small inputs, ``threads`` for the rest.

    Both stay within the thread budget; ``run`` picks by the tokens in the feed.
    """

    def __init__(self, onnx_path: Path, threads: int):
        self.large = make_session(onnx_path, threads)
        small_enough = Path(onnx_path).stat().st_size <= SMALL_INPUT_SESSION_MAX_BYTES
        self.small = make_session(onnx_path, 1) if threads > 1 and small_enough else None

    def session_for(self, feed: dict[str, np.ndarray]):
        """The one-thread session for a feed of at most ``SMALL_INPUT_TOKENS`` tokens, else the large one."""
        tokens = next(iter(feed.values())).size if feed else 0
        return self.small if self.small is not None and tokens <= SMALL_INPUT_TOKENS else self.large

    def run(self, output_names, feed: dict[str, np.ndarray]):
        return self.session_for(feed).run(output_names, feed)

    def get_inputs(self):
        return self.large.get_inputs()

    def get_outputs(self):
        return self.large.get_outputs()


def session_feed(session, encoded) -> dict[str, np.ndarray]:
    """The inputs ``session`` declares, taken from ``encoded`` and cast to int64."""
    names = [i.name for i in session.get_inputs()]
    missing = [n for n in names if n not in encoded]
    if missing:
        raise ValueError(f"The ONNX graph needs inputs {missing}, which the tokenizer did not produce.")
    return {n: np.asarray(encoded[n], dtype=np.int64) for n in names}
