"""External evaluation sets run no code, never hang and stream.

The filter of `folder?<filter>` is parsed by its own grammar (data/filters.py), never handed to
pandas' query/eval (whose `@` reached module globals and ran shell commands); the folder is judged
like an ingest source (a FIFO is refused, never opened); and the images are read, decoded and
predicted a batch at a time. No training here: the models are freshly initialised networks,
exported the way training exports them.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import write_dataset

from gender_tasks import layout, pipeline
from gender_tasks.data.filters import MAX_CHARS, MAX_DEPTH, ExternalSetError, FilterError, parse_filter, split_spec
from gender_tasks.errors import PermanentError
from gender_tasks.evaluation import external
from gender_tasks.settings import resolve_settings

SECONDS = 20  # a correctness bound: a FIFO opened for reading would block forever
RUN = "run1"
SIZES = {"cnn": 32, "mobilenetv2": 40}  # two input sizes: every image decoded at both


def _labels(root: Path) -> Path:
    """A labels.csv beside the class folders: numbers, text with spaces, cells that are not numbers."""
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.jpg"))
    rows = [{"file": f, "age": ["12", "16", "30", "n/a", "", "45"][i % 6],
             "ethnicity": ["white", "South Asian", "black", "white", "South Asian", "other"][i % 6]}
            for i, f in enumerate(files)]  # fmt: skip
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    return root


@pytest.fixture
def table() -> pd.DataFrame:
    return pd.DataFrame({
        "file": ["a", "b", "c", "d", "e", "f"],
        "age": ["12", "16", "30", "n/a", "", "016"],
        "race": ["0", "1", "2", "3", "0", "1"],
        "ethnicity": ["white", "South Asian", "black", "white", "South Asian", "it's"],
    }, dtype=str)  # fmt: skip


# --- the grammar ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, rows",
    [
        ("age >= 16", "bcf"),  # the README's example; "n/a" and "" are not numbers, "016" is 16
        ("age < 16", "a"),
        ("age == 16", "bf"),
        ("age != 16", "ac"),  # rows that are not numbers do not match a numeric comparison, even !=
        ("not age == 16", "acde"),  # ... but `not` of one does
        ("age > -1.5e1 and age <= 3e1", "abcf"),
        ("age == '16'", "b"),  # quoted: compared as text
        ("race == 0 or race == 3", "ade"),
        ("ethnicity == 'South Asian'", "be"),
        ('ethnicity == "South Asian" and age >= 0', "b"),
        ("ethnicity == white", "ad"),  # a bare word is text
        ("ethnicity != white", "bcef"),
        ("ethnicity < c", "bce"),  # code-point order: 'South Asian' < 'black' < 'c' < "it's" < 'white'
        ("ethnicity == 'it\\'s'", "f"),
        ('ethnicity == "it\'s"', "f"),
        ("age == 12 OR race == 1", "abf"),
        ("age >= 16 AND NOT (race == 1 Or race == 2)", ""),
        ("not (age >= 16 and (race == 1 or race == 2)) and race != 3", "ae"),
        ("(((age >= 16)))", "bcf"),
        ("race==0|race==2&ethnicity==black", "ace"),  # & binds tighter than |, as and before or
        ("(race==0|race==2)&ethnicity==black", "c"),
    ],
)
def test_valid_filters_select_the_right_rows(table, text, rows):
    mask = parse_filter(text).mask(table, where="labels.csv")
    assert mask.dtype == bool
    assert "".join(table.loc[mask, "file"]) == rows


INJECTIONS = [
    "@pd.io.common.os.system('touch PWNED') == 0",
    "age > 1 or @pd.io.common.os.system('touch PWNED') == 0",
    "__import__('os').system('touch PWNED') == 0",
    "`age`.__class__ == 1",
    "`age` > 1",
    "age.__class__ == 1",
    "age.__class__.__mro__[1].__subclasses__() == 0",
    "system('touch PWNED') == 0",
    "age == 1 and open('PWNED', 'w')",
    "age == len('x')",
    "age + 1 > 2",
    "age > 1 - 0",
    "age * 2 > 2",
    "age > 1; import os",
    "age == [1]",
    "age == {'a': 1}",
    "lambda: 0",
    "age in (1, 2)",
    "age = 1",
    "(age > 1",
    "age > 1)",
    "age > ",
    "1 < age",
    "age > 1 < 2",
    "age == 'open",
    "",
]


@pytest.mark.parametrize("text", INJECTIONS)
def test_code_and_malformed_filters_are_refused_and_nothing_runs(tmp_path, monkeypatch, table, text):
    monkeypatch.chdir(tmp_path)
    folder = write_dataset(tmp_path / "ext", 2)
    with pytest.raises(FilterError) as info:
        parse_filter(text).mask(table, where="labels.csv")
    message = str(info.value)
    assert isinstance(info.value, ExternalSetError) and isinstance(info.value, PermanentError)
    assert repr(text) in message and "at character " in message and "column OP value" in message
    if text:  # through a set's spec too (what the CLI's pre-flight and evaluate_external parse)
        with pytest.raises(FilterError):
            external.parse_spec(f"{folder}?{text}")
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize(
    "text, at, why",
    [
        ("@pd.io.common.os.system('touch PWNED') == 0", 1, "'@'"),
        ("__import__('os').system('x') == 0", 11, "function calls"),
        ("`age` > 1", 1, "backticks"),
        ("age.__class__ == 1", 4, "attribute access"),
        ("age + 1 > 2", 5, "arithmetic"),
        ("(age > 1 and race == 1", 1, "never closed"),
        ("age > 1)", 8, "closes no"),
        ("age = 1", 5, "use =="),
        ("16a == 1", 1, "neither a number nor a name"),
    ],
)
def test_a_refusal_names_the_position_and_the_reason(text, at, why):
    with pytest.raises(FilterError, match=f"at character {at} ") as info:
        parse_filter(text)
    assert why in str(info.value)


def test_an_unknown_column_is_named_with_the_columns_there(table):
    flt = parse_filter("age >= 16 and agee < 30")
    with pytest.raises(FilterError, match="unknown column 'agee'") as info:
        flt.mask(table, where="x/labels.csv")
    assert "at character 15 " in str(info.value) and "['file', 'age', 'race', 'ethnicity']" in str(info.value)
    with pytest.raises(FilterError, match="'race' is a column"):  # not a comparison of two columns
        parse_filter("age == race").mask(table, where="x/labels.csv")


def test_over_long_and_deeply_nested_filters_are_refused(table):
    long = " or ".join(["age == 1"] * 200)
    assert len(long) > MAX_CHARS
    with pytest.raises(FilterError, match=f"longer than {MAX_CHARS} characters"):
        parse_filter(long)
    at_limit = "(" * MAX_DEPTH + "age >= 16" + ")" * MAX_DEPTH
    assert parse_filter(at_limit).mask(table, where="labels.csv").sum() == 3
    for deep in ("(" * (MAX_DEPTH + 1) + "age >= 16" + ")" * (MAX_DEPTH + 1), "not " * (MAX_DEPTH + 1) + "age > 1",
                 "(" * 400 + "age >= 16" + ")" * 400):  # fmt: skip
        with pytest.raises(FilterError, match=f"nested deeper than {MAX_DEPTH}"):
            parse_filter(deep)


def test_a_bad_filter_fails_prepare_before_anything_is_written(tmp_path, monkeypatch):
    """The DAG param: `prepare` parses every set's filter (without reading its folder)."""
    monkeypatch.chdir(tmp_path)
    conf = {"source": str(tmp_path / "src"), "storage": str(tmp_path / "store"), "profile": "tiny",
            "external_eval": ["/not/read/ext?@pd.io.common.os.system('touch PWNED') == 0"]}  # fmt: skip
    with pytest.raises(FilterError, match="'@'"):
        pipeline.prepare(conf)
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "store").exists()
    assert split_spec("/x/y") == ("/x/y", None) and split_spec("/x/y?  ")[1] is None
    folder, flt = split_spec("/x/y?age >= 16 ")
    assert folder == "/x/y" and flt.text == "age >= 16" and flt.columns == ["age"]


def test_listing_filters_through_labels_csv_without_pandas_query(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("pandas query/eval must never see a filter")

    monkeypatch.setattr(pd.DataFrame, "query", refuse)
    monkeypatch.setattr(pd.DataFrame, "eval", refuse)
    monkeypatch.setattr(pd, "eval", refuse)
    root = _labels(write_dataset(tmp_path / "ext", 6))
    labels = pd.read_csv(root / "labels.csv", dtype=str, keep_default_na=False)
    for text in ("age >= 16", "ethnicity == 'South Asian' or not age < 40"):
        root_, query, name = external.parse_spec(f"{root}?{text}")
        table = external.list_labeled_images(root_, query)
        rel = [p.relative_to(root).as_posix() for p in table["path"]]
        expected = labels.loc[parse_filter(text).mask(labels, where="labels.csv"), "file"].tolist()
        assert rel == expected and len(rel) > 0
        assert list(table["label"]) == [r.split("/")[0] for r in rel]
    assert external.parse_spec(f"{root}?age >= 16")[2] == "ext_age_16"
    assert len(external.list_labeled_images(root, None)) == 12
    with pytest.raises(FilterError, match="unknown column 'agee'.*'file', 'age', 'ethnicity'"):
        external.list_labeled_images(root, "agee >= 16")
    with pytest.raises(ExternalSetError, match="needs images of both classes"):
        external.list_labeled_images(root, "age > 1000")
    (root / "labels.csv").unlink()
    with pytest.raises(ExternalSetError, match="needs a labels.csv"):
        external.list_labeled_images(root, "age >= 16")


# --- the folder: judged before it is read -------------------------------------------------------------


@pytest.fixture
def models_in_storage(local_storage):
    """Freshly initialised cnn (32 px) and mobilenetv2 (40 px), exported as training exports them."""
    import json

    from gender_tasks.integrity import sha256_hex
    from gender_tasks.models.registry import get_model_spec
    from gender_tasks.training.export import export_model

    for name, size in SIZES.items():
        net = get_model_spec(name).build(size, "none")
        data = export_model(net, name, size, {})
        local_storage.put_bytes(layout.model_file_key(RUN, name, "model.pt2"), data)
        card = {"files": {"model.pt2": sha256_hex(data)}}  # as training records it: the model is verified on load
        local_storage.put_bytes(layout.model_file_key(RUN, name, "model_card.json"), json.dumps(card).encode())
    return local_storage


def _settings(**overrides):
    return resolve_settings({"profile": "tiny", "models": list(SIZES), **overrides})


def _listing(storage) -> list[str]:
    return sorted(p.relative_to(storage.root).as_posix() for p in storage.root.rglob("*") if p.is_file())


def _within(seconds: float, fn):
    """fn() in a daemon thread: its result or exception, or a failure (not a hung test) past `seconds`."""
    out: dict = {}

    def target():
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    started = time.monotonic()
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s (a FIFO opened?)"
    return out, time.monotonic() - started


@pytest.mark.slow
@pytest.mark.parametrize("query", [None, "age >= 0"])
def test_a_fifo_in_an_external_set_is_refused_within_seconds_and_nothing_is_written(tmp_path, models_in_storage,
                                                                                    query):  # fmt: skip
    root = _labels(write_dataset(tmp_path / "ext", 3))
    os.mkfifo(root / "male" / "pipe.jpg")  # opening it for reading would block forever
    before = _listing(models_in_storage)
    spec = f"{root}?{query}" if query else str(root)
    out, seconds = _within(SECONDS, lambda: external.evaluate_external(
        models_in_storage, run_key=RUN, settings=_settings(), spec=spec))  # fmt: skip
    error = out.get("error")
    assert isinstance(error, ExternalSetError), out
    assert "male/pipe.jpg is a FIFO" in str(error) and "not a regular file" in str(error)
    assert seconds < SECONDS
    assert _listing(models_in_storage) == before
    assert not models_in_storage.list(layout.external_prefix(RUN))


@pytest.mark.slow
def test_the_size_limits_of_the_settings_apply(tmp_path, models_in_storage):
    root = write_dataset(tmp_path / "ext", 3)
    big = max(p.stat().st_size for p in root.rglob("*.jpg"))
    with pytest.raises(ExternalSetError, match="max_file_bytes"):
        external.evaluate_external(models_in_storage, run_key=RUN, settings=_settings(max_file_bytes=big - 1),
                                   spec=str(root))  # fmt: skip
    with pytest.raises(ExternalSetError, match="max_source_bytes"):
        external.evaluate_external(models_in_storage, run_key=RUN, settings=_settings(max_source_bytes=big),
                                   spec=str(root))  # fmt: skip
    assert not models_in_storage.list(layout.external_prefix(RUN))


# --- streaming -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_batches_give_the_probabilities_of_one_big_batch(tmp_path, models_in_storage, monkeypatch):
    root = _labels(write_dataset(tmp_path / "ext", 5, seed=7))  # 10 images: 4 batches of at most 3
    settings = _settings()
    reads: list[Path] = []
    read_regular = external.read_regular
    monkeypatch.setattr(external, "read_regular", lambda p, n: reads.append(p) or read_regular(p, n))
    whole = external.evaluate_external(models_in_storage, run_key=RUN, settings=settings, spec=str(root),
                                       batch_size=1000)  # fmt: skip
    assert len(reads) == 10 and len(set(reads)) == 10  # every file read once, for both input sizes
    reads.clear()
    batched = external.evaluate_external(models_in_storage, run_key=RUN, settings=settings, spec=str(root),
                                         batch_size=3)  # fmt: skip
    assert len(reads) == 10 and len(set(reads)) == 10
    assert set(batched["models"]) == set(SIZES) and batched["images"] == 10
    for name in SIZES:
        a, b = whole["models"][name], batched["models"][name]
        assert a["confusion_matrix"] == b["confusion_matrix"] and a["roc_auc"] == pytest.approx(b["roc_auc"])

    # The probabilities themselves, and what each model is given: batches of at most 3 at its own size.
    table = external.list_labeled_images(root, None)
    modules = {name: external.load_stored_model(models_in_storage, layout.model_prefix(RUN, name))[0]
               for name in SIZES}  # fmt: skip
    seen: dict[str, list[tuple]] = {name: [] for name in SIZES}

    def recording(name):
        def run(x):
            seen[name].append(tuple(x.shape))
            return modules[name](x)

        return run

    paths = list(table["path"])
    one = external.predict_streamed(paths, {n: (modules[n], [s]) for n, s in SIZES.items()}, batch_size=len(paths))
    many = external.predict_streamed(paths, {n: (recording(n), [s]) for n, s in SIZES.items()}, batch_size=3)
    for name, size in SIZES.items():
        assert one[name].shape == (10,)
        np.testing.assert_allclose(many[name], one[name], rtol=1e-5, atol=1e-6)
        assert seen[name] == [(3, 3, size, size)] * 3 + [(1, 3, size, size)]
