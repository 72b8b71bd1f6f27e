"""The Kubernetes GPU pool: deploy/k8s/gpu-base-job-template.json rendered the way Prefect's worker
renders it, and the prefect.yaml deployment that uses it. No cluster: the worker's own classes build
the Job manifest, and the Kubernetes client's V1Job model reads it back."""

from __future__ import annotations

import asyncio
import copy
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.objects import FlowRun
from prefect.utilities.schema_tools import ValidationError, is_valid_schema, validate
from prefect.utilities.templating import apply_values
from prefect.workers.base import BaseJobConfiguration

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE_FILE = ROOT / "deploy" / "k8s" / "gpu-base-job-template.json"
POOL = "gpu-k8s"
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


class ManifestJobConfiguration(BaseJobConfiguration):
    """Prefect's base job configuration plus the manifest field, for when prefect-kubernetes is absent."""

    job_manifest: dict[str, Any]


def template() -> dict:
    return json.loads(TEMPLATE_FILE.read_text())


def render(values: dict, config_class=None):
    """The worker's path: variable defaults, then job variables, through from_template_and_values.

    The worker passes its own client; this template has no block or variable references, so the
    client is never called. Its address is a closed port so that a call would fail loudly instead
    of starting an ephemeral server."""
    config_class = config_class or kubernetes_configuration_class()

    async def build():
        async with PrefectClient(api="http://127.0.0.1:9/api") as client:
            return await config_class.from_template_and_values(template(), values, client=client)

    return asyncio.run(build())


def kubernetes_configuration_class():
    worker = pytest.importorskip("prefect_kubernetes.worker")
    return worker.KubernetesWorkerJobConfiguration


def pod_spec(manifest: dict) -> dict:
    return manifest["spec"]["template"]["spec"]


def as_v1_job(manifest: dict):
    """The manifest as the Kubernetes client's typed V1Job (what the worker submits)."""
    client = pytest.importorskip("kubernetes_asyncio.client")

    async def read():
        async with client.ApiClient() as api:
            return api._ApiClient__deserialize(manifest, "V1Job")

    return asyncio.run(read())


def pipeline_gpu_deployment() -> dict:
    deployments = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    matches = [d for d in deployments if d["work_pool"]["name"] == POOL]
    assert len(matches) == 1, f"expected one deployment on the {POOL} pool, got {[d['name'] for d in matches]}"
    return matches[0]


@pytest.mark.parametrize("config_class", [ManifestJobConfiguration, "kubernetes"])
def test_gpu_count_lands_in_the_container_limits(config_class):
    if config_class == "kubernetes":
        config_class = kubernetes_configuration_class()
    config = render({"gpu_count": 2, "image": "registry.test/bertshrink:1"}, config_class)
    container = pod_spec(config.job_manifest)["containers"][0]
    # Prefect keeps the variable's type when a value is a whole placeholder; Kubernetes reads
    # a number as a quantity, and its client model turns it into the string "2" (below).
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert container["image"] == "registry.test/bertshrink:1"


def test_the_kubernetes_job_model_reads_the_gpu_limit_node_selector_and_tolerations():
    config = render({"gpu_count": 2, "image": "registry.test/bertshrink:1",
                     "node_selector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                     "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}]})
    config.prepare_for_flow_run(FlowRun(flow_id=uuid.uuid4(), name="calm-otter"))
    job = as_v1_job(config.job_manifest)
    spec = job.spec.template.spec
    assert spec.containers[0].resources.limits["nvidia.com/gpu"] == "2"
    assert spec.node_selector == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert [(t.key, t.operator, t.value, t.effect) for t in spec.tolerations] == [("dedicated", "Equal", "ml", "NoSchedule")]
    assert spec.containers[0].args == ["prefect", "flow-run", "execute"]
    assert spec.containers[0].env_from[0].secret_ref.name == "bertshrink-tracking"
    assert job.spec.backoff_limit == 0


def test_unset_job_variables_give_one_gpu_the_gpu_toleration_and_no_node_selector():
    spec = pod_spec(render({}).job_manifest)
    assert spec["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": 1}
    assert spec["tolerations"] == [GPU_TOLERATION]
    assert "nodeSelector" not in spec
    # Prefect's own defaults are left alone: no CPU or memory limits unless asked for.
    assert spec["containers"][0]["resources"]["requests"] == {}


def test_the_server_accepts_the_variables_schema_and_rejects_a_bad_gpu_count():
    variables = template()["variables"]
    is_valid_schema(variables, preprocess=False)  # what `prefect work-pool create` has the server check

    def check(job_variables):  # how the server validates a deployment's job variables
        validate(job_variables, variables, raise_on_error=True, preprocess=True,
                 ignore_required=True, allow_none_with_default=True)

    check({"gpu_count": 4, "node_selector": {"pool": "gpu"}, "tolerations": []})
    for bad in ({"gpu_count": 0}, {"gpu_count": "two"}, {"node_selector": {"pool": 1}}, {"tolerations": {"key": "x"}}):
        with pytest.raises(ValidationError):
            check(bad)


def test_the_template_is_prefects_default_kubernetes_template_plus_the_gpu_fields():
    """Nothing of prefect-kubernetes' own template is lost (so its worker options keep working)."""
    worker = pytest.importorskip("prefect_kubernetes.worker")
    default = worker.KubernetesWorker.get_default_base_job_template()
    ours = template()
    added = {"gpu_count", "node_selector", "tolerations", "credentials_secret"}
    assert set(ours["variables"]["properties"]) == set(default["variables"]["properties"]) | added
    for name, schema in default["variables"]["properties"].items():
        assert ours["variables"]["properties"][name] == schema, name
    stripped = copy.deepcopy(ours["job_configuration"])
    spec = pod_spec(stripped["job_manifest"])
    del spec["nodeSelector"], spec["tolerations"], spec["containers"][0]["envFrom"]
    del spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    assert stripped == default["job_configuration"]


def test_prefect_yaml_puts_the_gpu_deployment_on_the_pool_with_its_job_variables():
    deployment = pipeline_gpu_deployment()
    job_variables = deployment["work_pool"]["job_variables"]
    assert set(job_variables) >= {"image", "gpu_count", "node_selector", "tolerations"}
    assert job_variables["gpu_count"] == 1
    assert job_variables["image"] == "{{ $BERTSHRINK_IMAGE }}"
    assert GPU_TOLERATION in job_variables["tolerations"]
    assert deployment["entrypoint"] == "flows/pipeline.py:pipeline_flow"
    assert deployment["pull"][0]["prefect.deployments.steps.set_working_directory"]["directory"] == "/opt/bertshrink"
    # The nightly deployment on the process pool is still there.
    names = [d["name"] for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]]
    assert "nightly" in names


def test_the_gpu_deployments_job_variables_render_into_the_pod(monkeypatch):
    """`prefect deploy` fills {{ $BERTSHRINK_IMAGE }} from the environment; the worker does the rest."""
    monkeypatch.setenv("BERTSHRINK_IMAGE", "registry.test/bertshrink:0.1.0")
    job_variables = apply_values(pipeline_gpu_deployment()["work_pool"]["job_variables"], {})
    spec = pod_spec(render(job_variables).job_manifest)
    assert spec["containers"][0]["image"] == "registry.test/bertshrink:0.1.0"
    assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == job_variables["gpu_count"]
    assert spec["nodeSelector"] == job_variables["node_selector"]
    assert spec["tolerations"] == job_variables["tolerations"]
