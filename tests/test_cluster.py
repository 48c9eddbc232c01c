"""The cluster configurations (cluster/) and job files (jobs/) are what the real schemas accept; fast, no Ray.

Every RayCluster/RayJob passes KubeRay v1.7.0's CRD schema (tests/data/kuberay-v1.7.0/) strictly, with
unknown fields as errors, as under the API server's strict field validation; the `ray up` config passes
Ray's own autoscaler schema from the installed Ray. Beyond the schemas: the image is the Ray the
project pins and installs pinned packages; GPU pods land on GPU nodes and heads never do; the shared
claim is defined once, apart from the clusters; entrypoints run jobs/ scripts and configs that exist.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shlex
import subprocess
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

import jsonschema
import pytest
import yaml

from raymtl.config import load_experiment
from raymtl.tune.spec import load_sweep

REPO = Path(__file__).resolve().parents[1]
KUBERAY = REPO / "tests" / "data" / "kuberay-v1.7.0"
YAMLS = sorted([*REPO.glob("cluster/**/*.yaml"), *REPO.glob("jobs/**/*.yaml")])
RAY_VERSION = next(
    dep.split("==")[1] for dep in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    if re.match(r"ray(\[.*\])?==", dep)
)  # fmt: skip
DOCKERFILE = (REPO / "cluster" / "Dockerfile").read_text()
IMAGE_ROOT = re.search(r"^WORKDIR\s+(\S+)", DOCKERFILE, re.M).group(1)  # where the image holds the repo
GPU_LABEL = "nvidia.com/gpu.present"
SHARED = REPO / "cluster" / "kuberay" / "shared.yaml"


def documents(path: Path) -> list:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def kube(kind: str) -> list[tuple[Path, dict]]:
    """(file, object) for each Kubernetes object of `kind` under cluster/."""
    return [(p, doc) for p in YAMLS for doc in documents(p) if isinstance(doc, dict) and doc.get("kind") == kind]


def cluster_specs() -> list[tuple[Path, dict]]:
    """Every RayCluster spec: RayClusters' own and those of RayJobs that bring a cluster."""
    specs = [(p, obj["spec"]) for p, obj in kube("RayCluster")]
    return specs + [(p, obj["spec"]["rayClusterSpec"]) for p, obj in kube("RayJob") if "rayClusterSpec" in obj["spec"]]


def pod_templates(spec: dict) -> list[dict]:
    return [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]


def pins_ray(image: str) -> bool:
    return image.startswith(f"rayproject/ray:{RAY_VERSION}-") or f"-ray{RAY_VERSION}-" in image


def repo_path(path: str) -> Path:
    """A path inside the image (IMAGE_ROOT/...) or relative to the repo, as a repo file."""
    return REPO / (path[len(IMAGE_ROOT) + 1 :] if path.startswith(IMAGE_ROOT + "/") else path)


# ---------------------------------------------------------------- strict CRD validation

# What the API server accepts in an object's own metadata (ObjectMeta fields a manifest may set).
OBJECT_META = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string"}, "generateName": {"type": "string"}, "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        "finalizers": {"type": "array", "items": {"type": "string"}},
        "ownerReferences": {"type": "array", "items": {"type": "object"}},
    },
}


def strict(schema: dict) -> dict:
    """A CRD's structural openAPI v3 schema as JSON Schema that refuses unknown fields.

    An object schema that lists `properties` allows nothing else unless it says
    `x-kubernetes-preserve-unknown-fields`; `nullable` admits null; `x-kubernetes-int-or-string`
    admits both (the CRD spells it as an anyOf too, kept). `pattern`, `enum`, `required`, `minimum`,
    `items` and `additionalProperties` mean the same in both languages; CEL rules
    (x-kubernetes-validations) are not evaluated.
    """
    out = dict(schema)
    if "properties" in schema:
        out["properties"] = {name: strict(sub) for name, sub in schema["properties"].items()}
        if not schema.get("x-kubernetes-preserve-unknown-fields"):
            out.setdefault("additionalProperties", False)
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            out[key] = strict(schema[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in schema:
            out[key] = [strict(sub) for sub in schema[key]]
    if schema.get("x-kubernetes-int-or-string") and "anyOf" not in schema:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if schema.get("nullable") and "type" in schema:
        out["type"] = [schema["type"], "null"]
    return out


def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    schema = strict(json.loads((KUBERAY / f"{kind.lower()}.json").read_text()))
    schema["properties"]["metadata"] = OBJECT_META  # the root's metadata is ObjectMeta, which the CRD leaves open
    schema["properties"]["apiVersion"] = {"const": "ray.io/v1"}
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    return jsonschema.Draft7Validator(schema)


VALIDATORS = {kind: crd_validator(kind) for kind in ("RayCluster", "RayJob")}


def schema_errors(obj: dict) -> list[str]:
    """Every violation of the object's CRD schema, as `path.to.field: message`."""
    errors = VALIDATORS[obj["kind"]].iter_errors(obj)
    return sorted(f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors)


CRD_OBJECTS = [(p, o) for kind in VALIDATORS for p, o in kube(kind)]


@pytest.mark.parametrize("path,obj", CRD_OBJECTS, ids=[f"{p.name}:{o['metadata']['name']}" for p, o in CRD_OBJECTS])
def test_kuberay_objects_pass_the_crd_schema_strictly(path, obj):
    assert schema_errors(obj) == [], path


def test_every_manifest_kind_is_checked():
    kinds = {doc["kind"] for p in YAMLS if p.is_relative_to(REPO / "cluster" / "kuberay") for doc in documents(p)}
    assert kinds == {"RayCluster", "RayJob", "Service", "PersistentVolumeClaim", "ServiceAccount"}
    assert {p.name for p, _ in CRD_OBJECTS} == {"raycluster.yaml", "rayjob.yaml", "rayjob-sweep.yaml",
                                                "rayjob-predict.yaml"}


def demo_job() -> dict:
    [(_, job)] = [(p, o) for p, o in kube("RayJob") if p.name == "rayjob.yaml"]
    return copy.deepcopy(job)


def worker_pod(job: dict) -> dict:
    return job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]


def typo_in_auth_options(job):
    job["spec"]["rayClusterSpec"]["authOptions"] = {"mdoe": "token"}
    return "spec.rayClusterSpec.authOptions: Additional properties are not allowed ('mdoe' was unexpected)"


def unknown_auth_mode(job):
    job["spec"]["rayClusterSpec"]["authOptions"]["mode"] = "tokens"
    return "spec.rayClusterSpec.authOptions.mode: 'tokens' is not one of ['disabled', 'token']"


def typo_in_tolerations_key(job):
    worker_pod(job)["toleration"] = worker_pod(job).pop("tolerations")
    return "Additional properties are not allowed ('toleration' was unexpected)"


def typo_in_a_toleration(job):
    worker_pod(job)["tolerations"][0]["efect"] = worker_pod(job)["tolerations"][0].pop("effect")
    return ".tolerations.0: Additional properties are not allowed ('efect' was unexpected)"


def typo_in_shutdown_after_job_finishes(job):
    job["spec"]["shutdownAfterJobFinished"] = job["spec"].pop("shutdownAfterJobFinishes")
    return "spec: Additional properties are not allowed ('shutdownAfterJobFinished' was unexpected)"


def shutdown_as_a_string(job):
    job["spec"]["shutdownAfterJobFinishes"] = "yes"
    return "spec.shutdownAfterJobFinishes: 'yes' is not of type 'boolean'"


def bad_gpu_quantity(job):
    worker_pod(job)["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] = "one"
    return "limits.nvidia.com/gpu: 'one' does not match"


def typo_in_metadata(job):
    job["metadata"]["lables"] = {"team": "ml"}
    return "metadata: Additional properties are not allowed ('lables' was unexpected)"


@pytest.mark.parametrize("mutate", [
    typo_in_auth_options, unknown_auth_mode, typo_in_tolerations_key, typo_in_a_toleration,
    typo_in_shutdown_after_job_finishes, shutdown_as_a_string, bad_gpu_quantity, typo_in_metadata,
], ids=lambda f: f.__name__)
def test_the_schema_check_names_a_broken_field(mutate):
    job = demo_job()
    expected = mutate(job)
    errors = schema_errors(job)
    assert len(errors) == 1 and expected in errors[0], errors


def test_strict_conversion_keeps_what_the_crd_leaves_open():
    open_map = {"type": "object", "additionalProperties": {"type": "string"}}
    preserved = {"type": "object", "properties": {"a": {"type": "integer"}}, "x-kubernetes-preserve-unknown-fields": True}
    validator = jsonschema.Draft7Validator(strict({"type": "object", "properties": {"m": open_map, "p": preserved}}))
    assert validator.is_valid({"m": {"any-key": "v"}, "p": {"a": 1, "extra": [1]}})
    assert not validator.is_valid({"m": {"k": 1}})
    assert not validator.is_valid({"p": {"a": "1"}})
    nullable = jsonschema.Draft7Validator(strict({"type": "string", "nullable": True}))
    assert nullable.is_valid(None) and not nullable.is_valid(1)


# ---------------------------------------------------------------- what the schema cannot say


def test_the_project_pins_the_installed_ray():
    assert version("ray") == RAY_VERSION


def test_kuberay_clusters_pin_ray_and_keep_gpu_and_cpu_pods_apart():
    specs = cluster_specs()
    assert {p.name for p, _ in specs} == {"raycluster.yaml", "rayjob.yaml"}
    for path, spec in specs:
        assert spec["rayVersion"] == RAY_VERSION, path
        assert spec["authOptions"]["mode"] == "token", path
        head = spec["headGroupSpec"]
        assert head["rayStartParams"].get("num-cpus") == "0", f"{path}: the head runs no tasks"
        terms = head["template"]["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert all({"key": GPU_LABEL, "operator": "DoesNotExist"} in t["matchExpressions"]
                   for t in terms["nodeSelectorTerms"]), f"{path}: the head may land on a GPU node"
        for group in spec["workerGroupSpecs"]:
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], (path, group["groupName"])
            pod = group["template"]["spec"]
            assert pod["nodeSelector"] == {GPU_LABEL: "true"}, (path, group["groupName"])
            assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"]), (path, group["groupName"])
            limits = pod["containers"][0]["resources"]["limits"]
            assert int(limits.get("nvidia.com/gpu", 0)) >= 1, f"{path}: group {group['groupName']} has no GPU"
            # An 8-vCPU 32-GiB GPU node (g5.2xlarge, aws-gpu.yaml's) allocates less than that to pods: a
            # pod asking for all of it stays Pending, and the cluster autoscaler adds no node for it.
            requests = pod["containers"][0]["resources"]["requests"]
            assert float(requests["cpu"]) <= 7.5 and gib(requests["memory"]) <= 28, (path, requests)


def gib(quantity: str) -> float:
    """A Kubernetes memory quantity (Gi, Mi or bytes) in GiB."""
    units = {"Gi": 1.0, "Mi": 1 / 1024}
    return float(quantity[:-2]) * units[quantity[-2:]] if quantity[-2:] in units else float(quantity) / 2**30


def shared_objects(kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in documents(SHARED) if d["kind"] == kind}


def all_pods() -> list[tuple[Path, dict]]:
    """Every pod template: cluster heads and workers, and RayJob submitters."""
    pods = [(p, pod) for p, spec in cluster_specs() for pod in pod_templates(spec)]
    return pods + [(p, job["spec"]["submitterPodTemplate"]["spec"]) for p, job in kube("RayJob")]


def test_every_pod_has_the_shared_identity_pull_secret_and_image():
    accounts = shared_objects("ServiceAccount")
    for path, pod in all_pods():
        assert pod["serviceAccountName"] in accounts, f"{path}: service account is not defined in {SHARED.name}"
        assert pod["imagePullSecrets"], path
        for c in pod["containers"]:
            assert pins_ray(c["image"]), f"{path}: image {c['image']} does not pin Ray {RAY_VERSION}"


def test_ray_pods_mount_the_shared_claim_defined_once_and_a_log_volume():
    claims = shared_objects("PersistentVolumeClaim")
    [claim] = claims.values()
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"] and claim["spec"]["resources"]["requests"]["storage"]
    assert [p for p, _ in kube("PersistentVolumeClaim")] == [SHARED], "the claim must live apart from clusters/jobs"
    for path, spec in cluster_specs():
        for pod in pod_templates(spec):
            volumes = {v["name"]: v for v in pod["volumes"]}
            ray = pod["containers"][0]  # KubeRay's Ray container is the first
            mounts = {m["mountPath"]: m["name"] for m in ray["volumeMounts"]}
            assert volumes[mounts["/mnt/shared"]]["persistentVolumeClaim"]["claimName"] in claims, path
            assert "emptyDir" in volumes[mounts["/tmp/ray"]], f"{path}: Ray's logs need their own volume"
            for c in pod["containers"]:
                assert {m["name"] for m in c.get("volumeMounts", [])} <= set(volumes), path


def test_service_reaches_the_heads_dashboard_and_tensorboard():
    [(path, cluster)] = kube("RayCluster")
    [(service_path, service)] = kube("Service")
    assert service_path == path, "the Service belongs with the cluster it selects"
    assert service["spec"]["selector"] == {"ray.io/cluster": cluster["metadata"]["name"], "ray.io/node-type": "head"}
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    declared = {p["name"]: p["containerPort"] for c in head["containers"] for p in c.get("ports", [])}
    ports = {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]}
    assert ports == {"dashboard": (8265, declared["dashboard"]), "tensorboard": (6006, declared["tensorboard"])}
    [tensorboard] = [c for c in head["containers"] if c["name"] == "tensorboard"]
    assert tensorboard["command"][:3] == ["tensorboard", "--logdir", "/mnt/shared/raymtl/runs"]


def test_rayjobs_follow_kuberays_own_rules():
    """KubeRay's admission rules (ValidateRayJobSpec) that the schema does not express."""
    for path, job in kube("RayJob"):
        spec, name = job["spec"], job["metadata"]["name"]
        assert re.fullmatch(r"[a-z]([-a-z0-9]{0,45}[a-z0-9])?", name), f"{path}: DNS-1035 name of at most 47 chars"
        assert ("rayClusterSpec" in spec) != ("clusterSelector" in spec), path
        assert spec["submitterConfig"]["backoffLimit"] >= 1, path
        assert spec["submitterPodTemplate"]["spec"]["restartPolicy"] == "Never", path
        assert "command" not in spec["submitterPodTemplate"]["spec"]["containers"][0], "KubeRay supplies it"
        if "clusterSelector" in spec:
            [(_, cluster)] = kube("RayCluster")
            assert spec["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}, path
            assert not spec.get("backoffLimit") and not spec.get("shutdownAfterJobFinishes"), path
            assert not spec.get("ttlSecondsAfterFinished"), f"{path}: a TTL needs shutdownAfterJobFinishes"
        else:
            assert spec["shutdownAfterJobFinishes"] and spec["backoffLimit"] >= 1, path


@pytest.mark.parametrize("path,job", kube("RayJob"), ids=lambda v: v.name if isinstance(v, Path) else "")
def test_rayjob_entrypoints_run_jobs_scripts_and_files_the_image_holds(path, job):
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "python" and repo_path(argv[1]).parent == REPO / "jobs", argv[:2]
    named = [repo_path(a) for a in argv[1:] if a.startswith((IMAGE_ROOT, "jobs/"))]
    missing = [str(p) for p in named if not p.is_file()]
    assert not missing, f"{path} names files that are not in the repo: {missing}"
    if "--config" in argv and Path(argv[1]).name == "tune.py":
        assert load_sweep(repo_path(argv[argv.index("--config") + 1]))[1].groupings == "search"
    written = [argv[argv.index(flag) + 1] for flag in ("--storage", "--output") if flag in argv]
    assert all(w.startswith("/mnt/shared/") for w in written), f"{path}: outputs must go to shared storage"
    assert "--gpu" in argv or "--num-gpus" in argv, path


# ---------------------------------------------------------------- ray up


def ray_schema() -> dict:
    ray_dir = Path(importlib.util.find_spec("ray").submodule_search_locations[0])
    return json.loads((ray_dir / "autoscaler" / "ray-schema.json").read_text())


def aws_config() -> dict:
    return documents(REPO / "cluster" / "aws-gpu.yaml")[0]


def test_ray_up_config_passes_rays_schema_with_cpu_head_and_autoscaling_gpu_workers():
    config = aws_config()
    jsonschema.validate(config, ray_schema())
    assert pins_ray(config["docker"]["image"])
    assert "--gpus all" in config["docker"]["worker_run_options"]
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert not head["resources"].get("GPU")
    assert head["node_config"]["BlockDeviceMappings"][0]["Ebs"]["VolumeSize"] >= 50, "room for the GPU image"
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert workers
    for t in workers:
        assert t["resources"]["GPU"] >= 1
        assert 0 <= t["min_workers"] < t["max_workers"] <= config["max_workers"]


def test_ray_up_config_replaces_rays_aws_setup_defaults():
    """Left out, these lists are filled from Ray's AWS defaults (a pip install on the head at every start)."""
    config = aws_config()
    assert {k: config[k] for k in ("setup_commands", "head_setup_commands", "worker_setup_commands")} == {
        "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": []}


@pytest.mark.parametrize("path,key", [
    ((), "setup_comands"), (("available_node_types", "gpu"), "min_worker"), (("docker",), "worker_run_option"),
])
def test_ray_schema_refuses_a_misspelt_key(path, key):
    config = aws_config()
    node = config
    for part in path:
        node = node[part]
    node[key] = 1
    with pytest.raises(jsonschema.ValidationError, match=f"'{key}' was unexpected"):
        jsonschema.validate(config, ray_schema())


# ---------------------------------------------------------------- the image


def test_dockerfile_builds_raymtl_on_the_pinned_ray_gpu_image_with_every_package_pinned():
    assert re.search(rf"^FROM rayproject/ray:{re.escape(RAY_VERSION)}-py311-gpu\s*$", DOCKERFILE, re.M)
    copied = re.findall(r"^COPY\s+(?:--\S+\s+)*(.+)\s+\S+$", DOCKERFILE, re.M)
    for source in " ".join(copied).split():
        assert (REPO / source).exists(), f"Dockerfile copies {source}, which is not in the repo"
    assert {"raymtl", "jobs", "pyproject.toml", "requirements.lock"} <= set(" ".join(copied).split())
    installs = re.findall(r"pip install ([^\n&\\]+)", DOCKERFILE)
    assert any(re.search(r"\s'?\.(\[[\w,]+\])?'?(\s|$)", i) for i in installs), "the image must install raymtl"
    assert all("-c requirements.lock" in i for i in installs), installs
    assert installs[0].split() == ["--no-cache-dir", "--upgrade", "-c", "requirements.lock", "pip"], (
        "the locked pip first: it reads --build-constraint")
    project = [i for i in installs if re.search(r"\s'?\.(\[[\w,]+\])?'?(\s|$)", i)]
    assert all("--build-constraint requirements.lock" in i for i in project), "raymtl built with the locked setuptools"
    assert "R580" in DOCKERFILE, "the CUDA 13 torch needs NVIDIA driver R580+: say so"


# ---------------------------------------------------------------- jobs/


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_yaml_parses(path):
    assert documents(path), f"{path} is empty"


def named_configs() -> list[str]:
    """jobs/configs/ files that cluster/ files, the README and the jobs/ scripts tell users to run."""
    sources = [*REPO.glob("cluster/**/*"), REPO / "README.md", *REPO.glob("jobs/*.py")]
    texts = [p.read_text() for p in sources if p.is_file()]
    return sorted({m for text in texts for m in re.findall(r"jobs/configs/[\w.-]+\.ya?ml", text)})


def test_cluster_docs_name_configs():
    assert named_configs()


@pytest.mark.parametrize("config", named_configs())
def test_named_job_configs_exist_and_are_valid_experiments(config):
    load_experiment(REPO / config)


def test_runtime_env_is_valid_and_uploads_no_venv():
    env = documents(REPO / "jobs" / "runtime_env.yaml")[0]
    assert set(env) <= {"env_vars", "excludes"}
    assert all(isinstance(v, str) for v in env["env_vars"].values()), "Ray needs string env values"
    assert env["env_vars"]["HF_HUB_OFFLINE"] == "1"
    assert {".venv", ".git"} <= set(env["excludes"])


@pytest.mark.parametrize("script", sorted(str(p.relative_to(REPO)) for p in REPO.glob("jobs/*.py")))
def test_job_entrypoints_start(script):
    done = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
