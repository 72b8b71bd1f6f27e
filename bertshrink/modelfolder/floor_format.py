"""The floor's folder: a fitted TF-IDF + logistic regression pipeline, a small config naming the
labels, and ``bertshrink.json`` like every other model folder.

The pipeline is stored as data only, so loading a folder pulled from a shared registry or DVC
remote never runs code that came with it (a pickle, which joblib writes, can run anything):

- ``floor.npz``: the learned arrays (IDF vector, weights, biases, classes), read with
  ``allow_pickle=False``, so an object array in it is refused instead of unpickled;
- ``floor.json``: the vocabulary (terms in column order) and both steps' hyper-parameters.

``load_floor`` rebuilds the sklearn pipeline from them through sklearn's public API (a fixed
``vocabulary`` and the ``idf_`` setter); predictions equal those of the pipeline that was saved.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import sklearn
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline

from bertshrink.errors import ModelSourceError
from bertshrink.modelfolder.files import CONFIG_FILE, FLOOR_FILE, FLOOR_SPEC_FILE, LEGACY_FLOOR_FILE
from bertshrink.modelfolder.meta import ModelMeta, write_folder

FLOOR_FORMAT_VERSION = 1
ARRAYS = ("idf", "coef", "intercept", "classes")
# dtype is a class in get_params(); only these names are turned back into one.
TFIDF_DTYPES = {"float64": np.float64, "float32": np.float32}
RERUN = "Re-run the floor stage to rewrite it: `dvc repro floor` (or `python -m flows.floor`)."


class PassThroughTokenizer:
    """Hands raw texts to the floor, so its timed forward pass includes the TF-IDF featurisation.

    Transformers are timed without tokenization; for TF-IDF the featurisation is most of the work,
    so leaving it out would flatter the floor. ``input_ids`` only carries the shape (words).
    """

    model_max_length = 1_000_000

    def __call__(self, texts, truncation=True, max_length=None, padding=None, return_tensors=None, **_):
        texts = [str(t) for t in texts]
        longest = max((len(t.split()) for t in texts), default=0)
        return {"texts": texts, "input_ids": np.zeros((len(texts), longest), dtype=np.int64)}


def _plain_params(step: str, params: dict) -> dict:
    """``params`` as JSON values; a callable (a custom tokenizer, say) cannot be stored as data."""
    for name, value in params.items():
        try:
            json.dumps(value)
        except TypeError:
            raise ValueError(f"The floor's {step} parameter {name}={value!r} cannot be saved as data "
                             "(only strings, numbers, lists and None can).") from None
    return params


def floor_spec(pipeline: Pipeline) -> tuple[dict, dict[str, np.ndarray]]:
    """(``floor.json``'s content, ``floor.npz``'s arrays) of a fitted floor pipeline."""
    tfidf, logreg = pipeline.named_steps["tfidf"], pipeline.named_steps["logreg"]
    terms = sorted(tfidf.vocabulary_, key=tfidf.vocabulary_.get)
    tfidf_params = {k: v for k, v in tfidf.get_params().items() if k not in ("vocabulary", "dtype")}
    spec = {
        "format_version": FLOOR_FORMAT_VERSION,
        "sklearn_version": sklearn.__version__,  # for a reader's diagnosis; loading does not require it
        "tfidf": {**_plain_params("tfidf", tfidf_params), "dtype": np.dtype(tfidf.dtype).name},
        "logreg": _plain_params("logreg", logreg.get_params()),
        "vocabulary": terms,
    }
    arrays = {"idf": tfidf.idf_, "coef": logreg.coef_, "intercept": logreg.intercept_,
              "classes": logreg.classes_}
    return spec, arrays


def save_floor_folder(pipeline: Pipeline, label_names: list[str], meta: ModelMeta, target: Path) -> Path:
    """Write the floor's folder atomically: arrays, vocabulary and settings, a config naming the
    labels, the metadata."""
    spec, arrays = floor_spec(pipeline)

    def fill(tmp: Path) -> ModelMeta:
        np.savez(tmp / FLOOR_FILE, **arrays)
        (tmp / FLOOR_SPEC_FILE).write_text(json.dumps(spec))
        (tmp / CONFIG_FILE).write_text(json.dumps({
            "model_type": "tfidf-logistic-regression", "num_labels": len(label_names),
            "id2label": {str(i): n for i, n in enumerate(label_names)},
            "label2id": {n: i for i, n in enumerate(label_names)},
        }, indent=2))
        return meta.updated(kind="floor", format="sklearn", label_names=list(label_names))

    return write_folder(target, fill)


def _refused(path: Path, why: str) -> ModelSourceError:
    return ModelSourceError(f"Cannot load the floor from {path}: {why}. {RERUN}")


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    """The npz's arrays, numbers or strings only; a pickle or object array is refused, not loaded."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [name for name in ARRAYS if name not in npz.files]
            if missing:
                raise _refused(path, f"it lacks the arrays {missing}")
            arrays = {name: npz[name] for name in ARRAYS}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as err:
        why = ("it holds pickled data (a pickle or an object array), which could run code when loaded"
               if "pickle" in str(err) else f"it is not a plain-array npz ({type(err).__name__}: {err})")
        raise _refused(path, why) from None
    for name, array in arrays.items():
        if array.dtype.kind not in ("f" if name != "classes" else "iuU"):
            raise _refused(path, f"array {name!r} has dtype {array.dtype}")
    return arrays


def _read_spec(path: Path) -> dict:
    try:
        spec = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _refused(path, f"it is not readable JSON ({type(err).__name__}: {err})") from None
    if not isinstance(spec, dict) or spec.get("format_version") != FLOOR_FORMAT_VERSION:
        raise _refused(path, f"it is not a version-{FLOOR_FORMAT_VERSION} floor description")
    return spec


def _rebuild(spec: dict, arrays: dict[str, np.ndarray]) -> Pipeline:
    """The sklearn pipeline from data: TF-IDF with a fixed vocabulary and set IDF, then the regression."""
    tfidf_params = dict(spec["tfidf"])
    tfidf_params["dtype"] = TFIDF_DTYPES[tfidf_params["dtype"]]
    tfidf_params["ngram_range"] = tuple(tfidf_params["ngram_range"])
    tfidf = TfidfVectorizer(**tfidf_params, vocabulary=list(spec["vocabulary"]))
    tfidf.idf_ = arrays["idf"]  # the public setter; it checks the length against the vocabulary
    # The regression's settings only shape fitting; predicting uses the arrays alone. So a setting this
    # scikit-learn no longer has (``penalty`` is deprecated in 1.9) is skipped, not an error.
    known = LogisticRegression().get_params()
    logreg = LogisticRegression(**{k: v for k, v in spec["logreg"].items() if k in known})
    logreg.classes_, logreg.coef_, logreg.intercept_ = arrays["classes"], arrays["coef"], arrays["intercept"]
    logreg.n_features_in_ = logreg.coef_.shape[1]
    if logreg.coef_.shape[1] != len(spec["vocabulary"]) or logreg.coef_.shape[0] != len(logreg.intercept_):
        raise ValueError(f"weights of shape {logreg.coef_.shape} do not fit {len(spec['vocabulary'])} "
                         f"terms and {len(logreg.intercept_)} biases")
    pipeline = Pipeline([("tfidf", tfidf), ("logreg", logreg)])
    pipeline.predict_log_proba(["a check that the rebuilt pipeline runs"])
    return pipeline


def load_floor(model_dir: Path) -> Pipeline:
    """The floor's pipeline, rebuilt from plain arrays and JSON: nothing in the folder is executed.

    A folder from before (a joblib pickle) is refused with the fix, never unpickled.
    """
    model_dir = Path(model_dir)
    arrays_path, spec_path = model_dir / FLOOR_FILE, model_dir / FLOOR_SPEC_FILE
    if not arrays_path.is_file() and (model_dir / LEGACY_FLOOR_FILE).is_file():
        raise _refused(model_dir / LEGACY_FLOOR_FILE, "it is a pickle (the old joblib format), and unpickling "
                       f"runs whatever code it holds; the floor is now saved as {FLOOR_FILE} + {FLOOR_SPEC_FILE}")
    for path in (arrays_path, spec_path):
        if not path.is_file():
            raise _refused(path, "it does not exist")
    spec, arrays = _read_spec(spec_path), _read_arrays(arrays_path)
    try:
        return _rebuild(spec, arrays)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as err:
        saved = f", saved with scikit-learn {spec.get('sklearn_version')} (this is {sklearn.__version__})"
        raise _refused(spec_path, f"it does not rebuild into a TF-IDF + logistic regression floor "
                       f"({type(err).__name__}: {err}){saved}") from None


def floor_parameters(pipeline) -> int:
    """Learned values: the logistic regression's weights and biases (the IDF vector counted too)."""
    logreg, tfidf = pipeline.named_steps["logreg"], pipeline.named_steps["tfidf"]
    return int(logreg.coef_.size + logreg.intercept_.size + tfidf.idf_.size)
