"""Olive data component (Olive's ``user_script``): our validation split, read from the JSON lines that
benchmarks/peers.py writes, tokenized with the teacher's tokenizer. Nothing is downloaded."""

from __future__ import annotations

import json

import torch
from olive.data.registry import Registry
from transformers import AutoTokenizer


class TokenizedTexts(torch.utils.data.Dataset):
    """(inputs, label) pairs, each padded to ``max_length`` so Olive's default dataloader can batch them."""

    def __init__(self, path: str, teacher: str, max_length: int):
        rows = [json.loads(line) for line in open(path)]
        tokenizer = AutoTokenizer.from_pretrained(teacher)
        encoded = tokenizer([r["text"] for r in rows], truncation=True, max_length=max_length,
                            padding="max_length", return_tensors="pt")
        self.inputs = {k: encoded[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded}
        self.labels = torch.tensor([int(r["label"]) for r in rows])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return {k: v[index] for k, v in self.inputs.items()}, self.labels[index]


@Registry.register_dataset()
def bertshrink_validation(data_dir=None, path: str = "", teacher: str = "", max_length: int = 64, **kwargs):
    return TokenizedTexts(path, teacher, max_length)
