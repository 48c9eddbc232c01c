"""The cluster configurations (cluster/) and job files (jobs/) hang together; fast, no Ray cluster.

Every YAML parses; the image is the Ray the project pins; KubeRay GPU groups request GPUs and mount
the volumes they name; the RayJob's entrypoint runs a jobs/ script that the image holds; the
`ray up` config passes Ray's own schema; job configs and the runtime env are valid.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import subprocess
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

from raymtl.config import load_experiment

REPO = Path(__file__).resolve().parents[1]
YAMLS = sorted([*REPO.glob("cluster/**/*.yaml"), *REPO.glob("jobs/**/*.yaml")])
RAY_VERSION = next(
    dep.split("==")[1] for dep in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    if re.match(r"ray(\[.*\])?==", dep)
)  # fmt: skip
DOCKERFILE = (REPO / "cluster" / "Dockerfile").read_text()
IMAGE_ROOT = re.search(r"^WORKDIR\s+(\S+)", DOCKERFILE, re.M).group(1)  # where the image holds the repo


def documents(path: Path) -> list:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def kube(kind: str) -> list[tuple[Path, dict, list]]:
    """(file, object, every object of that file) for each Kubernetes object of `kind` under cluster/."""
    found = []
    for path in YAMLS:
        docs = documents(path)
        found += [(path, doc, docs) for doc in docs if isinstance(doc, dict) and doc.get("kind") == kind]
    return found


def cluster_specs() -> list[tuple[Path, dict, list]]:
    specs = [(p, obj["spec"], docs) for p, obj, docs in kube("RayCluster")]
    return specs + [(p, obj["spec"]["rayClusterSpec"], docs) for p, obj, docs in kube("RayJob")]


def pod_templates(spec: dict) -> list[dict]:
    return [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]


def pins_ray(image: str) -> bool:
    return image.startswith(f"rayproject/ray:{RAY_VERSION}-") or f"-ray{RAY_VERSION}-" in image


def repo_path(path: str) -> Path:
    """A path inside the image (IMAGE_ROOT/...) or relative to the repo, as a repo file."""
    return REPO / (path[len(IMAGE_ROOT) + 1 :] if path.startswith(IMAGE_ROOT + "/") else path)


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_yaml_parses(path):
    assert documents(path), f"{path} is empty"


def test_the_project_pins_the_installed_ray():
    assert version("ray") == RAY_VERSION


def test_dockerfile_builds_raymtl_on_the_pinned_ray_gpu_image():
    assert re.search(rf"^FROM rayproject/ray:{re.escape(RAY_VERSION)}-py311-gpu\s*$", DOCKERFILE, re.M)
    copied = re.findall(r"^COPY\s+(?:--\S+\s+)*(.+)\s+\S+$", DOCKERFILE, re.M)
    for source in " ".join(copied).split():
        assert (REPO / source).exists(), f"Dockerfile copies {source}, which is not in the repo"
    assert {"raymtl", "jobs", "pyproject.toml"} <= set(" ".join(copied).split())
    assert re.search(r"pip install [^\n]*\s\.(\s|$)", DOCKERFILE), "the image must install raymtl"


def test_kuberay_clusters_pin_ray_and_request_gpus():
    specs = cluster_specs()
    assert {p.name for p, _, _ in specs} == {"raycluster.yaml", "rayjob.yaml"}
    for path, spec, docs in specs:
        assert spec["rayVersion"] == RAY_VERSION, path
        assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0", f"{path}: head runs no tasks"
        claims = {d["metadata"]["name"] for d in docs if d.get("kind") == "PersistentVolumeClaim"}
        for pod in pod_templates(spec):
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            for c in pod["containers"]:
                assert pins_ray(c["image"]), f"{path}: image {c['image']} does not pin Ray {RAY_VERSION}"
                mounts = {m["name"]: m["mountPath"] for m in c.get("volumeMounts", [])}
                assert mounts.get("shared") == "/mnt/shared" and set(mounts) <= set(volumes), path
            claim = volumes["shared"]["persistentVolumeClaim"]["claimName"]
            assert claim in claims, f"{path}: claim {claim} is not defined in the file"
        for group in spec["workerGroupSpecs"]:
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], (path, group["groupName"])
            for c in group["template"]["spec"]["containers"]:
                limits = c["resources"]["limits"]
                assert int(limits.get("nvidia.com/gpu", 0)) >= 1, f"{path}: group {group['groupName']} has no GPU"


def test_rayjob_entrypoint_runs_a_jobs_script_the_image_holds():
    [(path, job, _)] = kube("RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "python" and repo_path(argv[1]).parent == REPO / "jobs", argv[:2]
    named = [repo_path(a) for a in argv[1:] if a.startswith((IMAGE_ROOT, "jobs/"))]
    missing = [str(p) for p in named if not p.is_file()]
    assert not missing, f"{path} names files that are not in the repo: {missing}"
    assert "--gpu" in argv and "/mnt/shared" in argv[argv.index("--storage") + 1]


def test_ray_up_config_passes_rays_schema_with_cpu_head_and_autoscaling_gpu_workers():
    import jsonschema

    config = documents(REPO / "cluster" / "aws-gpu.yaml")[0]
    ray_dir = Path(importlib.util.find_spec("ray").submodule_search_locations[0])
    jsonschema.validate(config, json.loads((ray_dir / "autoscaler" / "ray-schema.json").read_text()))
    assert pins_ray(config["docker"]["image"])
    assert "--gpus all" in config["docker"]["worker_run_options"]
    types = config["available_node_types"]
    assert not types[config["head_node_type"]]["resources"].get("GPU")
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert workers
    for t in workers:
        assert t["resources"]["GPU"] >= 1
        assert 0 <= t["min_workers"] < t["max_workers"] <= config["max_workers"]


def named_configs() -> list[str]:
    """jobs/configs/ files that cluster/ files, the README and jobs/train.py tell users to run."""
    sources = [*REPO.glob("cluster/**/*"), REPO / "README.md", REPO / "jobs" / "train.py"]
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


@pytest.mark.parametrize("script", ["jobs/train.py", "jobs/demo_data.py"])
def test_job_entrypoints_start(script):
    done = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
