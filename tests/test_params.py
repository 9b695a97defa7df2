"""The trigger form: typed, documented DAG params, validated before any work starts."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dag():
    spec = importlib.util.spec_from_file_location("gender_dag_params", REPO / "dags" / "gender_classification.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.gender_classification()


def test_every_param_is_typed_and_described(dag):
    expected = {"source", "storage", "profile", "models", "epochs", "image_size", "weights", "seed", "label_audit",
                "external_eval"}  # fmt: skip
    assert expected <= set(dag.params.keys())
    for name in dag.params.keys():
        schema = dag.params.get_param(name).schema
        assert "type" in schema, name
        assert schema.get("title") or schema.get("description"), name
    assert dag.params.get_param("profile").schema["enum"] == ["paper", "cpu", "tiny"]
    assert dag.params.get_param("models").schema["items"]["enum"] == ["cnn", "resnet50", "inceptionv3", "mobilenetv2"]


@pytest.mark.parametrize(
    "conf",
    [
        {"profile": "gpu-xl"},
        {"models": ["cnn", "vgg16"]},
        {"models": []},
        {"epochs": 0},
        {"image_size": 8},
        {"seed": -1},
        {"source": ""},
        {"external_eval": "not-a-list"},
    ],
)
def test_invalid_trigger_settings_are_rejected_by_the_form(dag, conf):
    from airflow.sdk.definitions.param import ParamValidationError

    params = copy.deepcopy(dag.params)
    with pytest.raises((ParamValidationError, ValueError)):
        params.update(conf)
        params.validate()


def test_valid_trigger_settings_pass(dag):
    params = copy.deepcopy(dag.params)
    params.update(
        {"models": ["cnn", "resnet50"], "epochs": 3, "profile": "tiny", "external_eval": ["/data/x?age >= 16"]}
    )
    resolved = params.validate()
    assert resolved["models"] == ["cnn", "resnet50"] and resolved["epochs"] == 3
