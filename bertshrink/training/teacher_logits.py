"""The teacher's logits on the training (and transfer) texts, computed once and reused.

Distillation with only prediction-layer losses (``ce`` + ``kd``) needs nothing from the teacher
but its logits on each training example. The teacher is frozen and in eval mode, so those logits
do not change between epochs, stages or recipes: computing them once removes the teacher's
forward pass from every training step. Intermediate losses (hidden states, attention maps)
still need the teacher live.

A cache folder keeps them across calls, keyed by the teacher folder's content fingerprint, the
tokenized inputs (so data, tokenizer and ``max_length`` are all in the key).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from transformers import DataCollatorWithPadding

LOGITS_COLUMN = "teacher_logits"
# Examples per teacher forward pass, sorted by length so padding stays small.
BATCH_SIZE = 64


def inputs_key(dataset, teacher_fingerprint: str) -> str:
    """Hex key of (teacher, every example's input ids): equal keys mean equal logits."""
    digest = hashlib.sha256(teacher_fingerprint.encode())
    for ids in dataset["input_ids"]:
        digest.update(np.asarray(ids, dtype=np.int64).tobytes() + b"|")
    return digest.hexdigest()[:24]


def compute_teacher_logits(teacher, dataset, tokenizer, device: str = "cpu", batch_size: int = BATCH_SIZE) -> np.ndarray:
    """[examples, labels] float32 logits of ``teacher`` on ``dataset`` (tokenized, unpadded), in
    dataset order; examples are batched by length, which changes nothing but the padding."""
    features = [name for name in tokenizer.model_input_names if name in dataset.column_names]
    collator = DataCollatorWithPadding(tokenizer)
    order = np.argsort([len(ids) for ids in dataset["input_ids"]], kind="stable")
    out = np.zeros((len(dataset), teacher.config.num_labels), dtype=np.float32)
    was_training = teacher.training
    teacher.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                batch = collator([{name: dataset[int(i)][name] for name in features} for i in rows])
                logits = teacher(**{k: v.to(device) for k, v in batch.items()}).logits
                out[rows] = logits.float().cpu().numpy()
    finally:
        teacher.train(was_training)
    return out


def cached_teacher_logits(teacher, teacher_fingerprint: str, dataset, tokenizer, cache_dir: Path | None,
                          device: str = "cpu") -> tuple[np.ndarray, bool]:
    """(logits, whether they came from ``cache_dir``); computed and stored there when absent."""
    path = Path(cache_dir) / f"{inputs_key(dataset, teacher_fingerprint)}.npy" if cache_dir else None
    if path is not None and path.is_file():
        logits = np.load(path)
        if logits.shape == (len(dataset), teacher.config.num_labels):
            return logits, True
    logits = compute_teacher_logits(teacher, dataset, tokenizer, device)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, logits)
        tmp.replace(path)  # a killed write never leaves a half file under the real name
    return logits, False


def with_teacher_logits(dataset, logits: np.ndarray):
    """``dataset`` with a ``teacher_logits`` column (one float list per example)."""
    if LOGITS_COLUMN in dataset.column_names:
        dataset = dataset.remove_columns(LOGITS_COLUMN)
    return dataset.add_column(LOGITS_COLUMN, logits.tolist())
