"""What a model folder weighs: bytes a user would ship, and parameter counts."""

from __future__ import annotations

import hashlib
from pathlib import Path

from bertshrink.modelfolder.files import CONFIG_FILE, FLOOR_SPEC_FILE, META_FILE

# Weight files a user ships; ``*.onnx.data`` / ``*.onnx_data`` hold external ONNX tensors.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".onnx", ".onnx.data", ".onnx_data", ".npz")
CONFIG_FILES = frozenset({CONFIG_FILE, FLOOR_SPEC_FILE, "generation_config.json", "model.safetensors.index.json",
                          "pytorch_model.bin.index.json"})
TOKENIZER_FILES = frozenset({
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model",
})
# Training leftovers that match a weight suffix or sit next to the model but are never shipped.
NOT_SHIPPED_FILES = frozenset({
    "training_args.bin", "optimizer.pt", "optimizer.bin", "scheduler.pt", "scaler.pt",
    "trainer_state.json", META_FILE,
})
NOT_SHIPPED_DIRS = frozenset({"checkpoints", "runs", "logs", "mlruns", ".ipynb_checkpoints"})


def _is_shipped(rel: Path) -> bool:
    if any(d in NOT_SHIPPED_DIRS or d.startswith("checkpoint-") for d in rel.parts[:-1]):
        return False
    name = rel.name
    if name in NOT_SHIPPED_FILES or name.startswith("rng_state"):
        return False
    return name.endswith(WEIGHT_SUFFIXES) or name in CONFIG_FILES or name in TOKENIZER_FILES


def size_on_disk(model_dir: Path) -> dict:
    """Bytes of what a user would ship: weights, config and tokenizer files (no training state)."""
    model_dir = Path(model_dir)
    files: dict[str, int] = {}
    for path in sorted(model_dir.rglob("*")):
        rel = path.relative_to(model_dir)
        if path.is_file() and _is_shipped(rel):
            files[rel.as_posix()] = path.stat().st_size
    weights = sum(b for name, b in files.items() if name.endswith(WEIGHT_SUFFIXES))
    return {"total_bytes": sum(files.values()), "weights_bytes": weights, "files": files}


def count_parameters(model) -> int:
    """Number of parameter values (tied weights are counted once, as torch lists them once)."""
    return sum(p.numel() for p in model.parameters())


def content_fingerprint(model_dir: Path) -> str:
    """sha256 of what the folder ships (weights, config, tokenizer; not its metadata file, whose
    ``created_at`` changes on every write): the same model gives the same fingerprint."""
    model_dir = Path(model_dir)
    digest = hashlib.sha256()
    for name in size_on_disk(model_dir)["files"]:
        digest.update(name.encode() + b"\0")
        with open(model_dir / name, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
