"""Regenerate this folder's schemas from KubeRay's CRD files.

    python tests/data/kuberay-v1.7.0/extract.py <kuberay>/ray-operator/config/crd/bases

Keeps `spec.versions[name=v1].schema.openAPIV3Schema` of each CRD (what the API server validates
objects against) minus `description` texts and the `status` subtree, which no manifest sets: about
a sixth of the CRD files' size, with every type, field, enum, pattern and x-kubernetes-* marker intact.
"""

import json
import sys
from pathlib import Path

import yaml

CRDS = {"raycluster.json": "ray.io_rayclusters.yaml", "rayjob.json": "ray.io_rayjobs.yaml"}


def strip(node):
    if isinstance(node, dict):
        return {k: strip(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [strip(v) for v in node]
    return node


def v1_schema(crd: dict) -> dict:
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    schema = strip(schema)
    schema["properties"].pop("status", None)
    return schema


if __name__ == "__main__":
    bases, here = Path(sys.argv[1]), Path(__file__).parent
    for out, crd in CRDS.items():
        schema = v1_schema(yaml.safe_load((bases / crd).read_text()))
        (here / out).write_text(json.dumps(schema, sort_keys=True, separators=(",", ":")) + "\n")
