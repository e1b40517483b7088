"""prefect.yaml must point at real flows with parameters they accept."""
import importlib
import inspect
from pathlib import Path

import yaml


def test_every_deployment_entrypoint_is_a_flow_accepting_its_parameters():
    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "prefect.yaml").read_text())
    assert config["deployments"]
    for deployment in config["deployments"]:
        module_path, function = deployment["entrypoint"].split(":")
        module = importlib.import_module(module_path.removesuffix(".py").replace("/", "."))
        flow = getattr(module, function)
        assert flow.__class__.__name__ == "Flow", deployment["name"]
        accepted = set(inspect.signature(flow.fn).parameters)
        assert set(deployment.get("parameters", {})) <= accepted, deployment["name"]
