"""Olive's own search, run in its own venv (bench/.venvs/olive): Olive converts the teacher folder to
ONNX, applies its transformer graph optimizations, and searches its quantization pass (dynamic or
static, per-channel, reduce_range, formats, calibration) with Optuna's TPE sampler, keeping candidates
whose accuracy on our validation split stays within ``(1 - min_retention)`` of the teacher's (Olive's
``percent-max-degradation`` goal) and ranking them by latency.

If the search cannot run, it says why in ``peer.json`` and falls back to Olive's non-search dynamic
int8 quantization pass, labelled as such. Standalone: imports nothing from bertshrink.

    python olive_search.py --teacher models/teacher --out /tmp/olive-work --validation val.jsonl --min-retention 0.98
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
import traceback
from importlib.metadata import version
from pathlib import Path

# Offline: no telemetry, and the Hub is never asked for anything (the teacher is a local folder).
os.environ.setdefault("OLIVE_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TOOLS = ("olive-ai", "transformers", "torch", "onnxruntime", "onnx", "optuna")
HERE = Path(__file__).resolve().parent


def data_config(validation: Path, teacher: Path, max_length: int, batch_size: int = 32) -> dict:
    return {"name": "validation", "user_script": str(HERE / "olive_data.py"),
            "load_dataset_config": {"type": "bertshrink_validation",
                                    "params": {"path": str(validation), "teacher": str(teacher),
                                               "max_length": max_length}},
            # every component typed: Olive 0.13 fails on an untyped one ('NoneType' object has no attribute 'lower')
            "pre_process_data_config": {"type": "skip_pre_process"},
            "post_process_data_config": {"type": "text_classification_post_process"},
            "dataloader_config": {"type": "default_dataloader", "params": {"batch_size": batch_size}}}


def evaluator(min_retention: float, num_classes: int) -> dict:
    """Accuracy with our bar as Olive's goal, then batch latency (what the search ranks by)."""
    degradation = round((1.0 - min_retention) * 100, 6)
    return {"metrics": [
        {"name": "accuracy", "type": "accuracy", "data_config": "validation",
         "sub_types": [{"name": "accuracy_score", "priority": 1,
                        "goal": {"type": "percent-max-degradation", "value": degradation},
                        "metric_config": {"task": "multiclass", "num_classes": num_classes}}]},
        {"name": "latency", "type": "latency", "data_config": "validation",
         "sub_types": [{"name": "avg", "priority": 2, "metric_config": {"warmup_num": 2, "repeat_test_num": 10}}]},
    ]}


LOCAL_CPU = {"local": {"type": "LocalSystem",
                       "accelerators": [{"device": "cpu", "execution_providers": ["CPUExecutionProvider"]}]}}


def conversion_workflow(teacher: Path, out: Path) -> dict:
    """Olive's own ONNX conversion of the teacher folder and its transformer graph optimizations (no search):
    the search's input model. Kept out of the searched workflow: in Olive 0.13 a search step whose first pass
    comes from Olive's cache fails ('"FootprintNode" object has no field "model_config"'), which fails every
    step after the first when a pass without search parameters precedes the searched one."""
    return {"input_model": {"type": "HfModel", "model_path": str(teacher), "task": "text-classification"},
            "systems": LOCAL_CPU, "host": "local", "target": "local",
            "passes": {"conversion": {"type": "OnnxConversion", "target_opset": 17},
                       "transformers_optimization": {"type": "OrtTransformersOptimization", "model_type": "bert"}},
            "search_strategy": False, "cache_dir": str(out / "cache"), "output_dir": str(out / "conversion"),
            "log_severity_level": 1}


def workflow(onnx_model: Path, teacher: Path, out: Path, validation: Path, min_retention: float, num_classes: int,
             max_length: int, search: bool, max_samples: int, max_minutes: int = 30) -> dict:
    """On the converted, optimized teacher: Olive's quantization pass, searched or not."""
    # DefaultTensorType FLOAT: on the fused graph ORT's quantizer cannot infer some MatMul outputs' type
    # ("Unable to find data type for weight_name ..."); ours passes the same option (compression/quantize_onnx.py).
    passes = {"quantization": ({"type": "OnnxQuantization", "data_config": "validation",
                                "extra_options": {"DefaultTensorType": 1}} if search else
                               {"type": "OnnxDynamicQuantization", "per_channel": True})}
    config = {"input_model": {"type": "ONNXModel", "model_path": str(onnx_model)},
              "systems": LOCAL_CPU, "data_configs": [data_config(validation, teacher, max_length)],
              "passes": passes, "host": "local", "target": "local",
              "cache_dir": str(out / "cache"), "output_dir": str(out / ("search" if search else "fixed")),
              "log_severity_level": 1}
    if search:
        # typed: an untyped evaluator trips Olive 0.13's resource scan ('NoneType' object has no attribute 'lower')
        config["evaluators"] = {"accuracy_then_latency": {"type": "OnnxEvaluator",
                                                          **evaluator(min_retention, num_classes)}}
        config["evaluator"] = "accuracy_then_latency"
        config["search_strategy"] = {"execution_order": "joint", "sampler": "tpe",
                                     "sampler_config": {"max_samples": max_samples, "seed": 0},
                                     "max_iter": max_samples, "max_time": max_minutes * 60, "output_model_num": 1}
    else:
        config["search_strategy"] = False
    return config


def best_onnx(output) -> tuple[Path, dict | None]:
    """The best candidate's ONNX file and its metrics (Olive ranks them by the objectives' priority)."""
    best = output.get_best_candidate()
    if best is None:
        raise RuntimeError("Olive returned no model (no candidate met the accuracy goal)")
    path = Path(best.model_path)
    if path.is_dir():
        path = next(path.glob("*.onnx"))
    return path, best.metrics_value


def quant_mode(path: Path) -> str:
    """dynamic (activations quantized at run time), static (calibrated QDQ/QOperator) or none."""
    import onnx

    ops = {node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node}
    if "DynamicQuantizeLinear" in ops or "DynamicQuantizeMatMul" in ops:
        return "dynamic"
    return "static" if ops & {"QuantizeLinear", "QLinearMatMul", "QGemm"} else "none"


def run_olive(config: dict):
    from olive.workflows import run as olive_run

    return olive_run(config)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--validation", required=True, type=Path, help="JSON lines: text, label")
    parser.add_argument("--min-retention", required=True, type=float)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--max-samples", type=int, default=12, help="search trials (TPE samples)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    num_classes = len(json.loads((args.teacher / "config.json").read_text()).get("id2label") or {}) or 2
    started = time.perf_counter()
    record = {"tool": "olive-ai", "versions": {t: version(t) for t in TOOLS}, "search": True}
    converted, _ = best_onnx(run_olive(conversion_workflow(args.teacher, args.out)))
    record["seconds_conversion"] = round(time.perf_counter() - started, 2)
    try:
        output = run_olive(workflow(converted, args.teacher, args.out, args.validation, args.min_retention,
                                    num_classes, args.max_length, True, args.max_samples))
        path, metrics = best_onnx(output)
        record["recipe"] = (f"Olive search (TPE, up to {args.max_samples} samples) of OnnxQuantization's space "
                            "(dynamic/static, per-channel, reduce_range, format, calibration) on Olive's "
                            "OnnxConversion + OrtTransformersOptimization; accuracy goal "
                            f"percent-max-degradation {(1 - args.min_retention) * 100:.3g}% on our validation split")
        record["metrics"] = metrics
    except Exception as err:  # noqa: BLE001 - whatever stopped the search is reported, then the fallback runs
        record.update(search=False, search_error=f"{type(err).__name__}: {err}",
                      search_traceback=traceback.format_exc()[-4000:],
                      fallback="non-search OnnxDynamicQuantization pass (the search failed)")
        print(f"olive search failed: {record['search_error']}; running the non-search pass", flush=True)
        output = run_olive(workflow(converted, args.teacher, args.out, args.validation, args.min_retention,
                                    num_classes, args.max_length, False, 0))
        path, _ = best_onnx(output)
        record["recipe"] = ("Olive, no search: OnnxConversion, OrtTransformersOptimization, "
                            "OnnxDynamicQuantization (per-channel)")
    shutil.copyfile(path, args.out / "model.onnx")
    if any(path.parent.glob("*.data")):
        raise SystemExit(f"{path} keeps its weights in external data files; not supported here")
    record["mode"] = quant_mode(args.out / "model.onnx")
    record["seconds"] = {"total": round(time.perf_counter() - started, 2)}
    (args.out / "peer.json").write_text(json.dumps(record, indent=2, default=str))
    print(json.dumps({"peer": "olive", "search": record["search"], "seconds": record["seconds"]}))


if __name__ == "__main__":
    main()
