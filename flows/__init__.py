"""Prefect flows: one per stage plus ``pipeline``; ``python -m flows.<stage>`` runs one.

This package is the application's entry point, so it is where logging is configured for what it
imports. torchao (imported by transformers whenever it is installed) announces CUDA kernels it
cannot load and torch warns about torchao's enum registration, at import time, before any
message of ours: noise on every CPU run, set to errors only before anything imports them.
"""

import logging

for _noisy in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)
