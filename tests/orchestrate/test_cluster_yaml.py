"""ray_cluster.yaml is a valid Ray cluster-launcher config (Ray's own schema and checks) with the shape the
README promises: a CPU head, an 8-GPU worker type with autoscaling bounds, the project installed on every
node, shared storage mounted."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jsonschema
import pytest
import yaml

CLUSTER_YAML = Path(__file__).resolve().parents[2] / "ray_cluster.yaml"


def ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(os.path.dirname(ray.autoscaler.__file__)) / "ray-schema.json").read_text())


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_valid_against_rays_schema_and_checks(raw):
    from ray.autoscaler._private.util import prepare_config, validate_config

    jsonschema.validate(raw, ray_schema())  # the file as written
    validate_config(prepare_config(raw))  # as `ray up` sees it after merging the provider's defaults


def test_head_and_gpu_workers(raw):
    types = raw["available_node_types"]
    head = types[raw["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["CPU"] > 0
    gpu = [t for name, t in types.items() if t["resources"].get("GPU") == 8]
    assert len(gpu) == 1 and gpu[0]["min_workers"] == 0 and 2 <= gpu[0]["max_workers"] <= raw["max_workers"]
    assert gpu[0]["max_workers"] * 8 >= 16  # the recipe's 16 GPUs fit


def test_project_installed_and_storage_shared(raw):
    assert raw["file_mounts"] == {"~/xsam": "."}
    setup = "\n".join(raw["setup_commands"])
    assert "pip install" in setup and "-e ~/xsam" in setup and "torch==2.13.0" in setup
    assert any("/mnt/shared" in c for c in raw["initialization_commands"])
    assert all(
        "RAY_AUTH_MODE=disabled" in c
        for c in raw["head_start_ray_commands"] + raw["worker_start_ray_commands"]
        if "ray start" in c
    )
    with pytest.raises(jsonschema.ValidationError):  # the schema does bite
        jsonschema.validate({**raw, "max_workers": "many"}, ray_schema())
