"""The cluster kit's files are what the tools they are for accept.

- ``cluster/aws/gpu.yaml`` against Ray's own cluster-config schema (``ray up`` runs the same check);
- ``cluster/kuberay/*.yaml`` offline against ``cluster/kuberay/kuberay-v1.schema.yaml`` (KubeRay's fields, closed)
  with the pod templates and services inside checked by the Kubernetes schemas of the ``kubernetes-validate``
  package (strict: unknown fields fail), and the RayService's ``serveConfigV2`` against Ray Serve's
  ``ServeDeploySchema`` and the app's settings parser;
- ``cluster/runtime_env.yaml`` by Ray's ``RuntimeEnv``, and ``cluster/docker/Dockerfile`` for the Ray version and
  the files it copies.

Each check also has a negative control: a misspelled field or a wrong type must fail it.
"""

from __future__ import annotations

import copy
import json
import re
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
K8S_SCHEMA_VERSION = "1.37.0"  # the Kubernetes API the pinned KubeRay CRDs embed (ConfigMap volume defaultUser)


def _load(path: Path):
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _ray_pin() -> str:
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.startswith("ray=="):
            return line.split("==", 1)[1].strip()
    raise AssertionError("constraints.txt pins no ray version")


# ---------------------------------------------------------------- ray up


def _validate_ray_up(config: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_aws_launch_config_passes_rays_schema():
    config = _load(CLUSTER / "aws" / "gpu.yaml")
    _validate_ray_up(config)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "no work may land on the head"
    gpu = types["gpu_worker"]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1
    assert gpu["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert config["idle_timeout_minutes"] > 0
    assert config["docker"]["image"].startswith("instdiff:")


@pytest.mark.parametrize(
    "mutate",
    [
        lambda c: c.update(idle_timeout_minute=5),  # misspelled top-level key
        lambda c: c["available_node_types"]["gpu_worker"].update(min_worker=0),  # misspelled node-type key
        lambda c: c.update(max_workers="eight"),  # wrong type
    ],
    ids=["top-level-typo", "node-type-typo", "wrong-type"],
)
def test_aws_launch_config_schema_catches_mistakes(mutate):
    import jsonschema

    config = _load(CLUSTER / "aws" / "gpu.yaml")
    mutate(config)
    with pytest.raises(jsonschema.ValidationError):
        _validate_ray_up(config)


# ---------------------------------------------------------------- KubeRay


KUBERAY_SCHEMA = CLUSTER / "kuberay" / "kuberay-v1.schema.yaml"


@pytest.fixture(scope="module")
def kuberay_validator():
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="test extra kubernetes-validate")
    import jsonschema
    from referencing import Registry, Resource

    defs_path = (
        Path(kubernetes_validate.__file__).parent
        / "kubernetes-json-schema"
        / f"v{K8S_SCHEMA_VERSION}-local-strict"
        / "_definitions.json"
    )
    k8s = Resource.from_contents(json.loads(defs_path.read_text()))
    schema = _load(KUBERAY_SCHEMA)
    assert schema["x-kubernetes-version"] == f"v{K8S_SCHEMA_VERSION}"
    jsonschema.Draft202012Validator.check_schema(schema)
    registry = Registry().with_resource("https://kubernetes.io/api/_definitions.json", k8s)
    return jsonschema.Draft202012Validator(schema, registry=registry)


def _errors(validator, doc) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def test_kuberay_schema_names_the_crd_commit_it_was_checked_against():
    schema = _load(KUBERAY_SCHEMA)
    commit = schema["x-kuberay-commit"]
    assert re.fullmatch(r"[0-9a-f]{40}", commit)
    header = KUBERAY_SCHEMA.read_text(encoding="utf-8").split("\n$schema:", 1)[0]
    assert commit in header and schema["x-kuberay-checked"] in header


@pytest.mark.parametrize("name", ["rayjob-batch.yaml", "rayservice.yaml"])
def test_kuberay_manifests_pass_the_pinned_schemas(kuberay_validator, name):
    doc = _load(CLUSTER / "kuberay" / name)
    assert _errors(kuberay_validator, doc) == []


def _field_docs():
    return list(yaml.safe_load_all((ROOT / "tests" / "kuberay_crd_fields.yaml").read_text(encoding="utf-8")))


@pytest.mark.parametrize("index", range(3), ids=["rayjob-new-fields", "rayjob-legacy-deletion", "rayservice"])
def test_kuberay_schema_accepts_fields_of_the_pinned_crds(kuberay_validator, index):
    # fields the first hand-written schema refused (unknown, or an enum narrower than the CRD's plain string)
    assert _errors(kuberay_validator, _field_docs()[index]) == []


def _rayjob():
    return _load(CLUSTER / "kuberay" / "rayjob-batch.yaml")


def _rayservice():
    return _load(CLUSTER / "kuberay" / "rayservice.yaml")


def _cluster(doc):
    return doc["spec"].get("rayClusterSpec") or doc["spec"]["rayClusterConfig"]


def _head_container(doc):
    return _cluster(doc)["headGroupSpec"]["template"]["spec"]["containers"][0]


def _worker(doc):
    return _cluster(doc)["workerGroupSpecs"][0]


# (make the document, mutate it, JSON-Schema keyword that must fail, instance path that must fail, text in message)
_MISTAKES = {
    "spec-typo": (
        _rayjob,
        lambda d: d["spec"].update(shutdownAfterJobFinish=True),
        "additionalProperties",
        "spec",
        "shutdownAfterJobFinish",
    ),
    "wrong-type": (
        _rayjob,
        lambda d: d["spec"].update(entrypointNumCpus="one"),
        "type",
        "spec/entrypointNumCpus",
        "number",
    ),
    "worker-typo": (
        _rayjob,
        lambda d: _worker(d).update(maxReplica=3),
        "additionalProperties",
        "rayClusterSpec/workerGroupSpecs/0",
        "maxReplica",
    ),
    "container-typo": (
        _rayjob,
        lambda d: _head_container(d).update(imagee="instdiff:0.1.0"),
        "additionalProperties",
        "template/spec/containers/0",
        "imagee",
    ),
    "resources-typo": (
        _rayjob,
        lambda d: _head_container(d)["resources"].update(request={"cpu": "1"}),
        "additionalProperties",
        "containers/0/resources",
        "request",
    ),
    "bad-enum": (
        _rayjob,
        lambda d: _cluster(d)["autoscalerOptions"].update(upscalingMode="Fast"),
        "enum",
        "autoscalerOptions/upscalingMode",
        "Fast",
    ),
    "worker-without-minReplicas": (
        _rayjob,
        lambda d: _worker(d).pop("minReplicas"),
        "required",
        "workerGroupSpecs/0",
        "minReplicas",
    ),
    "rayservice-without-cluster": (
        _rayservice,
        lambda d: d["spec"].pop("rayClusterConfig"),
        "required",
        "spec",
        "rayClusterConfig",
    ),
    "managedBy-value": (_rayjob, lambda d: d["spec"].update(managedBy="me"), "enum", "spec/managedBy", "me"),
    "template-metadata-field": (
        _rayjob,
        lambda d: _worker(d)["template"].update(metadata={"generateName": "w-"}),
        "additionalProperties",
        "template/metadata",
        "generateName",
    ),
    "deletion-legacy-and-rules": (
        _rayjob,
        lambda d: d["spec"].update(
            deletionStrategy={
                "onSuccess": {"policy": "DeleteCluster"},
                "onFailure": {"policy": "DeleteCluster"},
                "deletionRules": [{"policy": "DeleteCluster", "condition": {"jobStatus": "FAILED"}}],
            }
        ),
        "not",
        "spec/deletionStrategy",
        "should not be valid",
    ),
    "deletion-condition-both-statuses": (
        _rayjob,
        lambda d: d["spec"].update(
            deletionStrategy={
                "deletionRules": [
                    {"policy": "DeleteSelf", "condition": {"jobStatus": "FAILED", "jobDeploymentStatus": "Failed"}}
                ]
            }
        ),
        "oneOf",
        "deletionRules/0/condition",
        "valid under each of",
    ),
    "preRunningDeadline-zero": (
        _rayjob,
        lambda d: d["spec"].update(preRunningDeadlineSeconds=0),
        "minimum",
        "spec/preRunningDeadlineSeconds",
        "minimum of 1",
    ),
    "networkPolicy-mode": (
        _rayjob,
        lambda d: _cluster(d).update(networkPolicy={"mode": "AllowAll"}),
        "enum",
        "networkPolicy/mode",
        "AllowAll",
    ),
}


@pytest.mark.parametrize("case", list(_MISTAKES))
def test_kuberay_schema_catches_mistakes_for_the_right_reason(kuberay_validator, case):
    make, mutate, keyword, path, text = _MISTAKES[case]
    doc = make()
    assert _errors(kuberay_validator, doc) == [], "the manifest must pass before it is broken"
    mutate(doc)
    errors = list(kuberay_validator.iter_errors(doc))
    assert errors, "a broken manifest passed the schema"
    found = [(e.validator, "/".join(map(str, e.absolute_path)), e.message) for e in errors]
    assert any(k == keyword and p.endswith(path) and text in m for k, p, m in found), found


def test_rayjob_runs_the_bulk_job_and_cleans_up():
    spec = _rayjob()["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["entrypointNumCpus"] >= 1
    # the driver is pinned to the head by a resource only the head advertises
    wanted = json.loads(spec["entrypointResources"])
    head_params = spec["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]
    assert json.loads(json.loads(head_params["resources"])) == wanted
    assert spec["entrypoint"].split()[:3] == ["python", "-m", "pipelines.batch"]
    config = re.search(r"--config\s+(\S+)", spec["entrypoint"]).group(1)
    assert config.startswith("/home/ray/instdiff/"), "the image's copy of the configs"
    assert (ROOT / config.removeprefix("/home/ray/instdiff/")).is_file()
    for flag in ("--input", "--output"):
        assert re.search(rf"{flag}\s+s3://", spec["entrypoint"]), f"{flag} must be s3:// under KubeRay"
    workers = spec["rayClusterSpec"]["workerGroupSpecs"]
    assert all(w["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] for w in workers)
    assert spec["rayClusterSpec"]["rayVersion"] == _ray_pin()


def test_rayservice_serve_config_is_valid_for_ray_serve_and_the_app():
    from ray.serve.schema import ServeDeploySchema

    doc = _load(CLUSTER / "kuberay" / "rayservice.yaml")
    assert doc["spec"]["rayClusterConfig"]["rayVersion"] == _ray_pin()
    serve_config = yaml.safe_load(doc["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config)
    (app,) = serve_config["applications"]
    from pipelines.serve.config import IMPORT_PATH, parse_args

    assert app["import_path"] == IMPORT_PATH
    settings = parse_args(app["args"])  # the app's own parser: unknown keys and bad values raise ConfigError
    assert settings.replicas.num_gpus == 1
    assert settings.replicas.autoscaling["max_replicas"] >= 2


def test_serve_deploy_schema_catches_mistakes():
    import pydantic
    from ray.serve.schema import ServeDeploySchema

    serve_config = yaml.safe_load(_load(CLUSTER / "kuberay" / "rayservice.yaml")["spec"]["serveConfigV2"])
    serve_config["applications"][0]["route_prefix"] = 5
    with pytest.raises(pydantic.ValidationError):
        ServeDeploySchema.model_validate(serve_config)


# ---------------------------------------------------------------- runtime env and image


def test_runtime_env_is_accepted_by_ray_and_puts_the_venv_first():
    from ray.runtime_env import RuntimeEnv

    env = _load(CLUSTER / "runtime_env.yaml")
    RuntimeEnv(**env)  # Ray's own validation of the fields
    assert env["env_vars"]["PATH"].endswith(":${PATH}")
    assert {".venv", ".git"} <= set(env["excludes"])

    from cluster.runtime_env import runtime_env

    mine = runtime_env()
    assert mine["env_vars"]["PATH"] == f"{Path(sys.prefix).resolve() / 'bin'}:${{PATH}}"
    assert mine["excludes"] == env["excludes"]
    RuntimeEnv(**mine)


def test_runtime_env_command_writes_a_file(tmp_path):
    from cluster.runtime_env import main

    out = tmp_path / "env.yaml"
    assert main(["--venv", sys.prefix, "--out", str(out)]) == 0
    assert _load(out)["env_vars"]["PATH"].startswith(str(Path(sys.prefix).resolve()))
    with pytest.raises(SystemExit):
        main(["--venv", str(tmp_path)])  # no bin/python there


def test_dockerfile_matches_the_pins_and_copies_what_exists():
    text = (CLUSTER / "docker" / "Dockerfile").read_text()
    image = re.search(r"^ARG RAY_IMAGE=(\S+)$", text, re.M).group(1)
    assert image.startswith(f"rayproject/ray:{_ray_pin()}-"), "base image Ray must equal the ray pin"
    assert "-gpu" in image or "-cu" in image, "a CUDA base image"
    for line in re.findall(r"^COPY .*$", text, re.M):
        for src in line.split()[1:-1]:
            if not src.startswith("--"):
                assert (ROOT / src).exists(), f"Dockerfile copies {src}, which is not in the repository"
    torch_spec = re.search(r'^ARG TORCH_SPEC="([^"]+)"', text, re.M).group(1)
    makefile_spec = re.search(r"^TORCH_SPEC \?= (.+)$", (ROOT / "Makefile").read_text(), re.M).group(1).strip()
    assert torch_spec == makefile_spec
    assert "-c constraints.txt ." in text
