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
        {"source": "   "},
        {"image_size": 9999},
        {"storage": "  "},
        {"external_eval": "not-a-list"},
        {"external_eval": [" "]},
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


def test_the_defaults_plus_a_source_are_a_valid_form(dag):
    """Optional fields allow null, so Airflow's form does not mark them required (its rule: a field whose
    type does not include "null" is required), and the defaults validate as they are."""
    params = copy.deepcopy(dag.params)
    params.update({"source": "/data/faces"})
    resolved = params.validate()
    assert resolved["storage"] is None and resolved["external_eval"] is None
    for name in ("storage", "epochs", "image_size", "weights", "external_eval"):
        assert "null" in dag.params.get_param(name).schema["type"], name
    params.update({"external_eval": None, "storage": None})  # a field typed into and cleared again
    params.validate()


def test_models_render_as_a_multi_select_of_the_registered_models(dag):
    # Airflow's form shows an array with `examples` as a multi-select of those values.
    schema = dag.params.get_param("models").schema
    assert schema["type"] == "array" and schema["examples"] == schema["items"]["enum"]
    assert schema["values_display"]["inceptionv3"] == "Inception V3"


@pytest.mark.parametrize(
    ("conf", "field"),
    [
        ({"epochs": 0}, "epochs"),
        ({"image_size": 9999}, "image_size"),
        ({"models": ["vgg16"]}, "vgg16"),
        ({"source": "   "}, "source"),
        ({"seed": -1}, "seed"),
    ],
)
def test_settings_refuse_what_the_form_refuses_instead_of_clamping(conf, field):
    """A run started without the form (CLI, REST API) is refused the same way, with the field named."""
    from gender_tasks.settings import SettingsError, resolve_settings

    with pytest.raises(SettingsError, match=field):
        resolve_settings(conf)


def test_the_server_names_the_field_it_refuses(dag):
    """What Airflow's trigger endpoint answers (HTTP 400, shown by the form) is this message."""
    from airflow.sdk.definitions.param import ParamValidationError

    params = copy.deepcopy(dag.params)
    with pytest.raises(ParamValidationError, match=r"Invalid input for param epochs: 0 is less than the minimum of 1"):
        params.update({"epochs": 0})
        params.validate()


def test_number_bounds_are_where_the_form_cannot_clamp_them(dag):
    """Airflow's number box clamps to a top-level minimum/maximum on blur (0 became 1, silently): the
    bounds live under allOf, where the server still validates them and names the field."""
    for name in ("epochs", "image_size", "seed"):
        schema = dag.params.get_param(name).schema
        assert "minimum" not in schema and "maximum" not in schema, name
        assert "minimum" in schema["allOf"][0], name


def test_a_misspelt_setting_is_refused_naming_the_likely_one():
    from gender_tasks.settings import SettingsError, resolve_settings

    with pytest.raises(
        SettingsError, match=r"unknown setting\(s\) \['epoch'\] \(did you mean 'epochs' instead of 'epoch'\?\)"
    ):
        resolve_settings({"epoch": 3})


@pytest.mark.parametrize(
    ("conf", "says"),
    [
        ({"epochs": "abc"}, "'epochs' must be a whole number, got 'abc'"),
        ({"epochs": 3.5}, "'epochs' must be a whole number, got 3.5"),
        ({"min_rows": "10"}, "'min_rows' must be a whole number"),
        ({"label_audit": "yes"}, "'label_audit' must be true/false"),
        ({"seed": True}, "'seed' must be a whole number"),
        ({"source": 7}, "'source' must be text"),
        ({"split": 0.7}, "'split' must be a list"),
    ],
)
def test_a_setting_of_the_wrong_type_is_refused_by_prepare(conf, says):
    """What the REST API lets through (settings off the form have no schema there) `prepare` refuses at once."""
    from gender_tasks.settings import SettingsError, resolve_settings

    with pytest.raises(SettingsError, match=says.replace("(", r"\(").replace(")", r"\)")):
        resolve_settings(conf)


@pytest.mark.parametrize("conf", [{"epochs": "abc"}, {"epochs": 2.5}, {"seed": "x"}, {"repeats": 1.5}])
def test_the_form_refuses_a_non_number_or_a_fraction(dag, conf):
    from airflow.sdk.definitions.param import ParamValidationError

    params = copy.deepcopy(dag.params)
    with pytest.raises(ParamValidationError, match=f"param {next(iter(conf))}"):
        params.update(conf)
        params.validate()


def test_number_fields_get_the_free_text_box_that_refuses_non_numbers(dag):
    """Airflow's form renders a field of more than one non-null type, with no enum or examples, as a text box
    that parses what is typed and says "Value must be one of: ..." when it is not a number (its number box
    dropped "abc" silently)."""
    for name in ("epochs", "image_size", "seed", "repeats"):
        schema = dag.params.get_param(name).schema
        types = [t for t in schema["type"] if t != "null"]
        assert sorted(types) == ["integer", "number"], name
        assert "enum" not in schema and "examples" not in schema, name


@pytest.mark.parametrize(("name", "says"), [("epochs", "1-500"), ("image_size", "22-512"), ("repeats", "1-20"),
                                            ("seed", "0 or more")])  # fmt: skip
def test_every_number_fields_help_gives_its_range(dag, name, says):
    assert dag.params.get_param(name).description.endswith(f"Allowed: {says}.")


def test_the_models_help_says_why_trigger_is_disabled_without_one(dag):
    assert "Trigger stays disabled while none is picked" in dag.params.get_param("models").description
