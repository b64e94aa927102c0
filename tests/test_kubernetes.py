"""deploy/kubernetes validates offline: the Kubernetes objects against the official
JSON schemas bundled by kubernetes-validate (strict: unknown fields are errors), the
KServe InferenceService against KServe's CRD schema (tests/schemas); and they agree
with the image (port, user), the service's settings and its probe semantics."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from service.core.config import Settings

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "deploy" / "kubernetes"
KSERVE_SCHEMA = Path(__file__).parent / "schemas" / "kserve_inferenceservice_v1beta1.yaml"
# The oldest and newest Kubernetes releases the manifests are checked against.
K8S_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())


def _documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def _by_kind() -> dict[str, dict[str, Any]]:
    found = {doc["kind"]: doc for _, doc in _documents()}
    assert len(found) == len(_documents()), "one object of each kind"
    return found


def test_every_expected_object_is_there() -> None:
    assert set(_by_kind()) == {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "InferenceService",
    }


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_objects_validate(version: str) -> None:
    checked = 0
    for name, doc in _documents():
        if doc["apiVersion"].startswith("serving.kserve.io/"):
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name} ({doc['kind']}) is invalid for Kubernetes {version}: {exc}")
        checked += 1
    assert checked == 4


def test_validator_rejects_mistakes() -> None:
    """The check above can fail: a typo, a wrong type, a missing field."""
    deployment = _by_kind()["Deployment"]
    version = K8S_VERSIONS[-1]
    typo = copy.deepcopy(deployment)
    typo["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] = "yes"
    no_selector = copy.deepcopy(deployment)
    del no_selector["spec"]["selector"]
    for bad in (typo, wrong_type, no_selector):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(bad, version, strict=True)


def _strict(schema: Any) -> Any:
    """A CRD's structural schema as JSON Schema that, like the API server with strict
    field validation, rejects fields the schema does not declare."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items() if not k.startswith("x-kubernetes")}
        if "properties" in out and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out.setdefault("additionalProperties", False)
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def _kserve_validator() -> jsonschema.Draft7Validator:
    schema = _strict(yaml.safe_load(KSERVE_SCHEMA.read_text())["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def test_inference_service_validates_against_kserve_crd() -> None:
    isvc = _by_kind()["InferenceService"]
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    validator = _kserve_validator()
    errors = [e.message for e in validator.iter_errors(isvc)]
    assert not errors, errors
    # The metadata block is an ObjectMeta: check it with Kubernetes' own schema.
    kubernetes_validate.validate(
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": isvc["metadata"]},
        K8S_VERSIONS[-1],
        strict=True,
    )
    model = isvc["spec"]["predictor"]["model"]
    assert model["protocolVersion"] == "v2" and model["modelFormat"]["name"] == "onnx"
    assert model["resources"]["limits"]["nvidia.com/gpu"] == 1
    for bad_path, value in (
        (("spec", "predictor", "scaleMetric"), "gpu"),  # not in the CRD's enum
        (("spec", "predictor", "model", "storageURI"), "s3://x"),  # typo
        (("spec", "predictor", "minReplicas"), "one"),
    ):
        bad = copy.deepcopy(isvc)
        node = bad
        for key in bad_path[:-1]:
            node = node[key]
        node[bad_path[-1]] = value
        assert list(validator.iter_errors(bad)), bad_path


def test_deployment_serves_the_image_as_built() -> None:
    kinds = _by_kind()
    deployment = kinds["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    dockerfile = (ROOT / "Dockerfile").read_text()

    # GPU: a limit (extended resources need request == limit when both are given).
    resources = container["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"]
    assert {"cpu", "memory"} <= set(resources["requests"])

    # Probes: readiness on /ready (503 until the model is warm), liveness on /health.
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    (port,) = container["ports"]
    assert port["containerPort"] == 8000 and "EXPOSE 8000" in dockerfile
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] == port["name"]

    # Non-root, as the image's user.
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True
    assert f"--uid {security['runAsUser']}" in dockerfile
    assert container["securityContext"]["allowPrivilegeEscalation"] is False

    # Every variable is a real setting, with a value the settings accept.
    env = {e["name"]: e["value"] for e in container["env"]}
    fields = {f"BRAINCAM_{name.upper()}" for name in Settings.model_fields}
    assert set(env) <= fields, set(env) - fields
    settings = Settings(**{k.removeprefix("BRAINCAM_").lower(): v for k, v in env.items()})
    assert settings.host == "0.0.0.0" and settings.port == port["containerPort"]
    assert settings.provider_list[0] == "CUDAExecutionProvider"

    # The Service, the HPA and the PDB point at this Deployment and its pods.
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    service = kinds["Service"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == port["name"]
    assert kinds["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"] == selector
    hpa = kinds["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
