"""Deployment artifacts: job specs, the Ray Jobs entrypoint's edge, KubeRay / Kubernetes manifests.

The manifests are checked against the fields the API servers require (KubeRay ray.io/v1 CRDs,
batch/v1 CronJob), and every file they reference must exist in the repo.
"""
from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import yaml

from zoospectra.config import ALL
from zoospectra.errors import ConfigError
from zoospectra.jobs.entrypoint import build_parser, main
from zoospectra.jobs.spec import CrawlSpec, validate_cron

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
IMAGE_ROOT = "/app/"                     # deploy/Dockerfile: WORKDIR /app, COPY jobs ./jobs
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
QUANTITY = re.compile(r"^\d+(\.\d+)?(m|Ki|Mi|Gi|Ti|k|M|G|T)?$")


def _docs() -> list[tuple[str, dict]]:
    out = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                out.append((path.name, doc))
    return out


def _of_kind(kind: str) -> list[dict]:
    return [doc for _, doc in _docs() if doc.get("kind") == kind]


# --- job specs ---------------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted((REPO / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_job_specs_are_valid(path: Path) -> None:
    spec = CrawlSpec.load(path)
    assert spec.name == path.stem and spec.base_models and spec.schedule


def test_spec_fields_and_analysis_options() -> None:
    spec = CrawlSpec.from_dict({"name": "x", "base_models": "org/base", "out": "/tmp/r", "limit": 5,
                                "analysis": {"k": 8, "k_store": "all", "mode": "fast"}})
    assert spec.base_models == ("org/base",) and spec.limit == 5
    assert (spec.analysis.k, spec.analysis.k_store, spec.analysis.mode) == (8, ALL, "fast")


@pytest.mark.parametrize("raw, match", [
    ({"name": "x", "base_models": ["org/b"]}, "missing required"),
    ({"name": "x", "base_models": ["org/b"], "out": "r", "limt": 3}, "unknown field"),
    ({"name": "x", "base_models": [], "out": "r"}, "base_models is empty"),
    ({"name": "x", "base_models": ["not a repo"], "out": "r"}, "repo id"),
    ({"name": "Bad_Name", "base_models": ["org/b"], "out": "r"}, "DNS label"),
    ({"name": "x", "base_models": ["org/b"], "out": "r", "limit": 0}, "limit"),
    ({"name": "x", "base_models": ["org/b"], "out": "r", "schedule": "61 * * * *"}, "minute"),
    ({"name": "x", "base_models": ["org/b"], "out": "r", "analysis": {"eps": 2}}, "eps"),
    ({"name": "x", "base_models": ["org/b"], "out": "r", "analysis": {"kk": 2}}, "unknown analysis"),
    ({"name": "x", "base_models": ["org/b"], "out": "r", "include_full": "yes"}, "include_full"),
])
def test_invalid_specs_are_rejected(raw: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        CrawlSpec.from_dict(raw)


@pytest.mark.parametrize("expr", ["0 3 * * *", "*/15 * * * *", "0 0 1 jan,jul *", "30 2 * * mon-fri",
                                  "0 0 * * 7", "5 4 1-15/2 * sun", "@daily"])
def test_valid_cron(expr: str) -> None:
    assert validate_cron(expr) == expr


@pytest.mark.parametrize("expr", ["0 3 * *", "0 24 * * *", "0 0 0 * *", "0 0 * 13 *", "*/0 * * * *",
                                  "0 0 * * funday", "5-1 * * * *", "@sometimes"])
def test_invalid_cron(expr: str) -> None:
    with pytest.raises(ConfigError):
        validate_cron(expr)


def test_entrypoint_rejects_a_bad_spec_with_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nbase_models: [org/b]\n")
    assert main(["--spec", str(bad)]) == 2
    assert "missing required" in capsys.readouterr().err


# --- manifests ---------------------------------------------------------------------------
def test_every_manifest_has_the_kubernetes_basics() -> None:
    docs = _docs()
    assert {d["kind"] for _, d in docs} >= {"RayCluster", "RayJob", "RayCronJob", "CronJob"}
    for name, doc in docs:
        assert doc.get("apiVersion") and doc.get("kind"), name
        meta = doc.get("metadata") or {}
        assert DNS_LABEL.match(meta.get("name", "")) and len(meta["name"]) <= 63, name
        assert isinstance(doc.get("spec"), dict), name
        if doc["kind"].startswith("Ray"):
            assert doc["apiVersion"] == "ray.io/v1", name


def _check_pod_spec(pod: dict, where: str) -> list[dict]:
    containers = pod.get("containers")
    assert isinstance(containers, list) and containers, f"{where}: containers required"
    for c in containers:
        assert DNS_LABEL.match(c.get("name", "")), f"{where}: container name"
        assert c.get("image"), f"{where}: container image"
        for section in ("requests", "limits"):
            for key, value in (c.get("resources", {}).get(section) or {}).items():
                assert QUANTITY.match(str(value)), f"{where}: {section}.{key}={value!r}"
    mounts = {m["name"] for c in containers for m in c.get("volumeMounts", [])}
    volumes = {v["name"] for v in pod.get("volumes", [])}
    assert mounts <= volumes, f"{where}: volumeMounts without volumes: {mounts - volumes}"
    return containers


def _check_ray_cluster_spec(spec: dict, where: str) -> None:
    assert isinstance(spec.get("rayVersion"), str)
    import ray

    assert spec["rayVersion"] == ray.__version__, "rayVersion must match the ray the image installs"
    head = spec["headGroupSpec"]
    assert isinstance(head.get("rayStartParams"), dict), f"{where}: headGroupSpec.rayStartParams"
    assert all(isinstance(v, str) for v in head["rayStartParams"].values()), "rayStartParams are strings"
    _check_pod_spec(head["template"]["spec"], f"{where} head")
    groups = spec.get("workerGroupSpecs")
    assert isinstance(groups, list) and groups, f"{where}: workerGroupSpecs"
    gpu_groups = 0
    for g in groups:
        assert DNS_LABEL.match(g.get("groupName", "")), f"{where}: groupName"
        assert all(isinstance(g.get(k), int) for k in ("replicas", "minReplicas", "maxReplicas"))
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], f"{where}: replica bounds"
        assert isinstance(g.get("rayStartParams"), dict)
        assert all(isinstance(v, str) for v in g["rayStartParams"].values())
        containers = _check_pod_spec(g["template"]["spec"], f"{where} {g['groupName']}")
        limits = containers[0].get("resources", {}).get("limits", {})
        if "nvidia.com/gpu" in limits:
            gpu_groups += 1
            assert int(limits["nvidia.com/gpu"]) >= 1
            # Kubernetes requires extended-resource requests to equal limits.
            requested = containers[0]["resources"].get("requests", {})
            assert requested.get("nvidia.com/gpu", limits["nvidia.com/gpu"]) == limits["nvidia.com/gpu"]
    assert gpu_groups >= 1, f"{where}: a GPU worker group (nvidia.com/gpu limits) is required"


def _check_entrypoint(command: str, where: str) -> None:
    words = shlex.split(command)
    assert words[:3] == ["python", "-m", "zoospectra.jobs.entrypoint"], f"{where}: runs the crawl entrypoint"
    # the module resolves to the installed package's entrypoint, and accepts exactly these arguments
    found = importlib.util.find_spec(words[2])
    assert found is not None and Path(found.origin).read_bytes() == (REPO / "jobs" / "entrypoint.py").read_bytes()
    args = build_parser().parse_args(words[3:])                 # SystemExit on an unknown flag
    assert args.spec.startswith(IMAGE_ROOT), f"{where}: spec path must be absolute in the image"
    local = REPO / args.spec[len(IMAGE_ROOT):]
    assert local.is_file(), f"{where}: {args.spec} is not in the repo"
    CrawlSpec.load(local)


def test_raycluster() -> None:
    (cluster,) = _of_kind("RayCluster")
    _check_ray_cluster_spec(cluster["spec"], "RayCluster")


def test_rayjob() -> None:
    (job,) = _of_kind("RayJob")
    spec = job["spec"]
    _check_entrypoint(spec["entrypoint"], "RayJob")
    _check_ray_cluster_spec(spec["rayClusterSpec"], "RayJob.rayClusterSpec")
    assert spec.get("submissionMode", "K8sJobMode") in ("K8sJobMode", "HTTPMode", "InteractiveMode",
                                                         "SidecarMode")
    # a finished job must tear its cluster (GPU workers included) down, and KubeRay only deletes
    # it after ttlSecondsAfterFinished when shutdownAfterJobFinishes is true
    assert spec.get("shutdownAfterJobFinishes") is True
    assert isinstance(spec.get("ttlSecondsAfterFinished"), int) and spec["ttlSecondsAfterFinished"] >= 0
    yaml.safe_load(spec.get("runtimeEnvYAML", "{}"))


def test_raycronjob() -> None:
    (cron,) = _of_kind("RayCronJob")
    validate_cron(cron["spec"]["schedule"])
    template = cron["spec"]["jobTemplate"]
    _check_entrypoint(template["entrypoint"], "RayCronJob")
    _check_ray_cluster_spec(template["rayClusterSpec"], "RayCronJob.jobTemplate.rayClusterSpec")


def test_kubernetes_cronjob_submits_the_crawl_to_the_cluster() -> None:
    (cron,) = _of_kind("CronJob")
    assert cron["apiVersion"] == "batch/v1"
    spec = cron["spec"]
    validate_cron(spec["schedule"])
    assert spec.get("concurrencyPolicy", "Allow") in ("Allow", "Forbid", "Replace")
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure"), "Jobs refuse restartPolicy Always"
    (container,) = _check_pod_spec(pod, "CronJob")
    script = " ".join(container.get("command", []) + container.get("args", []))
    assert "ray job submit" in script
    (cluster,) = _of_kind("RayCluster")
    assert f"http://{cluster['metadata']['name']}-head-svc:8265" in script   # KubeRay's head service
    _check_entrypoint(script.split(" -- ", 1)[1], "CronJob")


def test_dockerfile_installs_the_package_and_ships_the_specs() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim", text, re.M)
    assert re.search(r"^WORKDIR /app$", text, re.M)
    assert re.search(r"^COPY jobs \./jobs$", text, re.M)
    assert re.search(r"^RUN pip install \.", text, re.M)
    assert "HF_TOKEN" not in re.sub(r"#.*", "", text), "never bake a token into the image"
    images = {c["image"] for _, d in _docs() for c in _containers(d)}
    assert len(images) == 1, f"one image for head, workers and submitter: {images}"


def _containers(node: object) -> list[dict]:
    if isinstance(node, dict):
        found = list(node["containers"]) if isinstance(node.get("containers"), list) else []
        return found + [c for k, v in node.items() if k != "containers" for c in _containers(v)]
    if isinstance(node, list):
        return [c for v in node for c in _containers(v)]
    return []
