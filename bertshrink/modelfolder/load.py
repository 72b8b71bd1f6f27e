"""Load a classifier: from any model source (to start training), or from one of our folders.

``load_classifier`` restores what a standard config cannot express (pruned heads, FFN widths,
factorised embeddings, torch quantization; see ``structure``). ``load_tokenizer_and_classifier``
resolves a source (packaged, Hub, local folder) and gives it a head for the data's labels.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

from bertshrink.errors import ModelSourceError
from bertshrink.modelfolder.families import family_of, get_path
from bertshrink.modelfolder.files import CONFIG_FILE, SAFETENSORS_FILE, TORCH_WEIGHTS_FILE
from bertshrink.modelfolder.sources import check_family, load_error_hint, require_hub, resolve_model_source
from bertshrink.modelfolder.structure import QUANT_KEY, apply_structure, is_restructured
from bertshrink.modelfolder.torch_quant import prepare_quantized


@contextmanager
def _quiet_load_report() -> Iterator[None]:
    """transformers' load report lists the fresh head a new label set gets: expected, so not shown."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def _corrupt(path: Path, cause: BaseException) -> ModelSourceError:
    """What to do about a weights file that cannot be read: it is truncated or corrupt."""
    return ModelSourceError(
        f"{path} is truncated or corrupt ({type(cause).__name__}: {str(cause).strip()}). Re-download or "
        "re-save the model; if bertshrink wrote this folder, rerun the stage that did (`python -m "
        "flows.teacher` for the teacher, `python -m flows.compress --recipe <name>` for a candidate)."
    )


def check_weight_files(folder) -> None:
    """``ModelSourceError`` naming the file unless every safetensors file in ``folder`` is whole:
    opening one reads its header and checks that the data it declares is all there."""
    for path in sorted(Path(folder).glob("*.safetensors")) if Path(folder).is_dir() else []:
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except SafetensorError as err:
            raise _corrupt(path, err) from None


def _load_state_dict(model_dir: Path) -> dict:
    """All tensors of a (possibly sharded) safetensors checkpoint, or of a quantized
    ``pytorch_model.bin`` (torchao tensors; torchao registers them as safe to unpickle)."""
    check_weight_files(model_dir)
    single = model_dir / SAFETENSORS_FILE
    if single.is_file():
        return load_file(single)
    index = model_dir / "model.safetensors.index.json"
    if not index.is_file() and (model_dir / TORCH_WEIGHTS_FILE).is_file():
        try:
            return torch.load(model_dir / TORCH_WEIGHTS_FILE, map_location="cpu", weights_only=True)
        except RuntimeError as err:
            if "PytorchStreamReader" not in str(err):  # only torch's zip reader failing means a damaged file
                raise
            raise _corrupt(model_dir / TORCH_WEIGHTS_FILE, err) from None
    if not index.is_file():
        raise FileNotFoundError(f"No {SAFETENSORS_FILE} (or index, or {TORCH_WEIGHTS_FILE}) in {model_dir}.")
    state = {}
    for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        state.update(load_file(model_dir / shard))
    return state


def load_classifier(model_dir):
    """A sequence classifier from ``model_dir``, restoring pruned heads / FFN widths /
    factorised embeddings / torch quantization if recorded."""
    model_dir = Path(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    if not is_restructured(config):
        check_weight_files(model_dir)  # transformers' own error names no file
        return AutoModelForSequenceClassification.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_config(config)
    apply_structure(model)
    quantization = getattr(config, QUANT_KEY, None)
    if quantization:
        # Same quantize_ call / cast as when saving, so parameters take the stored types.
        prepare_quantized(model, quantization["mode"])
    state = _load_state_dict(model_dir)
    # Non-persistent buffers (position_ids) are not saved; strict on everything else.
    missing, unexpected = model.load_state_dict(state, strict=False)
    buffers = {name for name, _ in model.named_buffers()}
    missing = [k for k in missing if k not in buffers]
    if missing or unexpected:
        raise RuntimeError(f"Checkpoint in {model_dir} does not match its recorded structure: "
                           f"missing {missing}, unexpected {unexpected}.")
    return model.eval()


def load_tokenizer(model_dir, max_length: int | None = None):
    """The folder's tokenizer; ``max_length`` becomes its ``model_max_length`` (what users truncate at)."""
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if max_length is not None:
        tokenizer.model_max_length = max_length
    return tokenizer


def load_folder(model_dir):
    """(model, tokenizer) of one of our PyTorch folders."""
    return load_classifier(model_dir), load_tokenizer(model_dir)


def is_restructured_folder(location) -> bool:
    """A local folder whose config records pruned heads, FFN widths or factorised embeddings."""
    config = Path(location) / CONFIG_FILE
    return config.is_file() and is_restructured(json.loads(config.read_text()))


def _require_hub_model(spec: str) -> None:
    """No network fails in milliseconds, naming the offline alternatives for a teacher."""
    require_hub(f"model '{spec}'", ModelSourceError, "set teacher.model to a local folder or to packaged:all-MiniLM-L6-v2")


def source_config(spec: str) -> dict:
    """A model source's config, before any work: a folder's ``config.json``, or a Hub id's (a small
    download; without network this fails in milliseconds), its family checked either way."""
    location = resolve_model_source(spec)
    if Path(location).is_dir():
        return json.loads((Path(location) / CONFIG_FILE).read_text())
    _require_hub_model(spec)
    try:
        config = AutoConfig.from_pretrained(location).to_dict()
    except (OSError, ValueError) as err:
        raise ModelSourceError(f"{load_error_hint(spec)}\nCause: {type(err).__name__}: {err}") from None
    check_family(config.get("model_type"), spec)
    return config


def require_classification_head(config: dict, spec: str) -> None:
    """A model taken as it is (``teacher.train: false``) must be a sequence classifier, not a bare encoder."""
    architectures = config.get("architectures") or []
    if not any(name.endswith("ForSequenceClassification") for name in architectures):
        raise ModelSourceError(
            f"{spec} is not a fine-tuned sequence classifier (config.json architectures: {architectures or 'none'}): "
            "with teacher.train: false bertshrink takes a trained classifier as it is. Set teacher.train: true "
            "to fine-tune this encoder on the data, or point teacher.model at a fine-tuned classifier.")


def label_order(model_labels: list[str], data_labels: list[str], spec: str) -> list[int]:
    """For each of the data's labels, the index of the model output with that name; a different set
    of names (or a different count) is a ``ModelSourceError`` that lists both."""
    if sorted(model_labels) != sorted(data_labels):
        raise ModelSourceError(
            f"The labels of {spec} do not match the data's: the model has {len(model_labels)} "
            f"{sorted(model_labels)}, the data {len(data_labels)} {sorted(data_labels)}. A model taken as it is "
            "must name the same classes (config.json id2label); fine-tune it instead (teacher.train: true), "
            "or fix its id2label if only the names differ.")
    return [model_labels.index(name) for name in data_labels]


def reorder_outputs(model, order: list[int], label_names: list[str]) -> None:
    """Permute the classification head's outputs so that output ``j`` is ``label_names[j]``."""
    head = get_path(model, family_of(model).classifier)  # the head's last Linear: a row per label
    with torch.no_grad():
        head.weight.copy_(head.weight[order].clone())
        head.bias.copy_(head.bias[order].clone())
    model.config.id2label = dict(enumerate(label_names))
    model.config.label2id = {name: i for i, name in enumerate(label_names)}
    model.config.problem_type = "single_label_classification"


def load_fine_tuned_classifier(spec: str, label_names: list[str]):
    """Tokenizer and the fine-tuned classifier at ``spec`` as it is, its outputs in the data's label
    order; a bare encoder, a head its weights lack, or other labels are refused."""
    location = resolve_model_source(spec)
    config = source_config(spec)
    require_classification_head(config, spec)
    check_weight_files(location)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
        model, loading = AutoModelForSequenceClassification.from_pretrained(location, output_loading_info=True)
    except (OSError, ValueError) as err:
        raise ModelSourceError(f"{load_error_hint(spec)}\nCause: {type(err).__name__}: {err}") from None
    untrained = [key for key in loading["missing_keys"] if key.startswith(family_of(model).head_prefixes)]
    if untrained:
        raise ModelSourceError(f"{spec} has no weights for its classification head ({', '.join(untrained)}): it is "
                               "not fine-tuned. Set teacher.train: true to fine-tune it on the data.")
    model_labels = [str(model.config.id2label[i]) for i in range(model.config.num_labels)]
    reorder_outputs(model, label_order(model_labels, list(label_names), spec), list(label_names))
    return tokenizer, model.eval()


def load_classifier_with_labels(location, num_labels: int | None = None):
    """A classifier from a folder; a plain one gets a fresh head when ``num_labels`` differs from its own
    (transformers' load report about the new head is expected, so it is quieted)."""
    if is_restructured_folder(location):
        return load_classifier(location)  # head/FFN-pruned: rebuilt from its recorded shapes
    check_weight_files(location)
    kwargs = {"num_labels": num_labels, "ignore_mismatched_sizes": True} if num_labels else {}
    with _quiet_load_report():
        return AutoModelForSequenceClassification.from_pretrained(str(location), **kwargs)


def load_tokenizer_and_classifier(spec: str, label_names: list[str], max_length: int):
    """Tokenizer and a sequence classifier with ``len(label_names)`` outputs from ``spec``.

    A fresh classification head is initialised when the source is a plain encoder (as the
    packaged all-MiniLM-L6-v2 is); that is expected, so transformers' load report is quieted.
    """
    if len(label_names) < 2:
        raise ModelSourceError(f"A classifier needs at least two labels; the data has {len(label_names)} "
                               f"({label_names}). Fix the data source: validation requires two classes.")
    location = resolve_model_source(spec)
    if is_restructured_folder(location):
        return _load_restructured(location, label_names, max_length)
    if not Path(location).is_dir():  # a Hub id
        _require_hub_model(spec)
    check_weight_files(location)
    id2label = dict(enumerate(label_names))
    try:
        with _quiet_load_report():
            tokenizer = AutoTokenizer.from_pretrained(location)
            model = AutoModelForSequenceClassification.from_pretrained(
                location,
                num_labels=len(label_names),
                id2label=id2label,
                label2id={name: i for i, name in id2label.items()},
                # Always a softmax classifier over the data's labels: transformers would otherwise infer
                # regression from the label dtype or a single output.
                problem_type="single_label_classification",
                ignore_mismatched_sizes=True,  # a head fine-tuned for another label set is replaced
            )
    except SafetensorError as err:  # a Hub download in the cache (a local folder was checked above)
        raise ModelSourceError(f"A weights file of model '{spec}' is truncated or corrupt ({err}). Remove it from "
                               f"the Hugging Face cache (`hf cache rm model/{location}`) and load it again.") from None
    except (OSError, ValueError) as err:
        raise ModelSourceError(f"{load_error_hint(spec)}\nCause: {type(err).__name__}: {err}") from None
    check_family(model.config.model_type, spec)  # a Hub id is only known once loaded
    # Downstream users (evaluation, MLflow pipelines) truncate at the length we trained with.
    tokenizer.model_max_length = max_length
    return tokenizer, model


def _load_restructured(location: str, label_names: list[str], max_length: int):
    """A restructured model keeps its head: the label set must be the one it was trained for."""
    model = load_classifier(location)
    if model.config.num_labels != len(label_names):
        raise ModelSourceError(
            f"{location} is a pruned classifier for {model.config.num_labels} labels; the data has "
            f"{len(label_names)}. Start from an unpruned model for a new label set."
        )
    return load_tokenizer(location, max_length), model
