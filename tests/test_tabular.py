"""`data=csv` tables: missing-value policies, categorical encodings fitted on the train split and reused by
`trainctl eval`, unseen categories, Parquet and TSV files, the test split (`data.test_fraction`,
`data.test_path`, `trainctl eval --split test`), and the errors a user gets (exit 2, no traceback).

Every expected array is computed here with NumPy (and scikit-learn's split) from the raw values, not with
trainctl's own helpers."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
from sklearn.model_selection import train_test_split

from conftest import compose, trainctl
from trainctl.data import load
from trainctl.errors import ConfigError

QUIET = ["logging.progress=none", "logging.tensorboard=false", "checkpoint=off"]
CITIES = ("lima", "oslo", "paris", "rome")


def make_table(n: int, seed: int, cities=CITIES) -> Dict[str, np.ndarray]:
    """A learnable table: label yes/no from a + b and the city; an id column to recognise rows."""
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=n) * 10 + 5, rng.normal(size=n)
    city = np.array(cities)[rng.integers(0, len(cities), n)]
    score = (a - 5) / 10 + b + 2.0 * (city == "rome") - 1.5 * (city == "lima")
    return {"id": np.arange(n, dtype=float), "a": a.round(4), "b": b.round(4), "city": city,
            "label": np.where(score > 0.2, "yes", "no")}


def write(path: Path, table: Dict[str, np.ndarray], sep: str = ",", holes: Dict[str, List[int]] | None = None) -> Path:
    """``table`` as text; ``holes``: rows whose cell of that column is left empty."""
    holes = holes or {}
    names = list(table)
    lines = [sep.join(names)]
    for i in range(len(table[names[0]])):
        lines.append(sep.join("" if i in holes.get(c, ()) else str(table[c][i]) for c in names))
    path.write_text("\n".join(lines) + "\n")
    return path


def split_rows(labels: np.ndarray, val_fraction: float = 0.2, test_fraction: float = 0.0, seed: int = 0):
    """Train, validation and test row indices as scikit-learn draws them (stratified), sorted."""
    rest, test = np.arange(len(labels)), np.arange(0)
    if test_fraction:
        rest, test = train_test_split(rest, test_size=test_fraction, random_state=seed, stratify=labels)
    train, val = train_test_split(np.sort(rest), test_size=val_fraction, random_state=seed,
                                  stratify=labels[np.sort(rest)])
    return np.sort(train), np.sort(val), np.sort(test)


def onehot(values: np.ndarray, levels: List[str]) -> np.ndarray:
    return np.stack([(values == level).astype(np.float32) for level in levels], axis=1)


def csv_spec(path: Path, *extra: str):
    return compose(["data=csv", f"data.path={path}", "data.target=label", *extra]).data


# --- missing values ------------------------------------------------------------------------------


def test_missing_values_are_an_error_naming_columns_rows_and_the_fix(tmp_path):
    path = write(tmp_path / "t.csv", make_table(60, 0), holes={"b": [3, 10, 40], "city": [10], "label": [59]})
    with pytest.raises(ConfigError) as error:
        load(csv_spec(path))
    e = error.value
    assert e.key == "data.missing"
    assert "t.csv has missing values in 4 row(s)" in e.message  # rows 3, 10, 40 and 59
    assert "column 'b' on 3 row(s) (line 5, 12, 42)" in e.message and "column 'city' on 1 row(s) (line 12)" in e.message
    assert "column 'label' on 1 row(s) (line 61)" in e.message
    assert "data.missing=drop" in e.fix and "data.missing=mean" in e.fix


def test_missing_drop_drops_exactly_the_rows_with_a_hole(tmp_path, caplog):
    table = make_table(80, 1)
    holes = {"b": [3, 10, 40], "city": [10, 11], "label": [79]}
    path = write(tmp_path / "t.csv", table, holes=holes)
    with caplog.at_level(logging.INFO, logger="trainctl"):
        arrays = load(csv_spec(path, "data.missing=drop", "data.standardize=false"))
    assert "dropped 5 of 80 rows" in caplog.text
    kept_ids = np.sort(np.concatenate([arrays.x_train[:, 0], arrays.x_val[:, 0]]))
    assert np.array_equal(kept_ids, np.setdiff1d(np.arange(80), [3, 10, 11, 40, 79]))


def test_missing_mean_fills_with_the_train_split_mean_and_a_missing_category(tmp_path, caplog):
    table = make_table(200, 2)
    holes = {"a": [5, 17, 60, 61, 150], "city": [7, 8], "label": [199]}
    path = write(tmp_path / "t.csv", table, holes=holes)
    with caplog.at_level(logging.INFO, logger="trainctl"):
        arrays = load(csv_spec(path, "data.missing=mean", "data.standardize=false"))
    assert "dropped 1 of 200 rows" in caplog.text and "no target" in caplog.text
    assert arrays.info.encoding["columns"] == ["id", "a", "b", "city=lima", "city=oslo", "city=paris", "city=rome",
                                               "city=<missing>"]
    labels = table["label"][:199]
    train, val, _ = split_rows(labels)
    assert np.array_equal(arrays.x_train[:, 0], train) and np.array_equal(arrays.x_val[:, 0], val)
    a = table["a"].astype(float).copy()
    a[holes["a"]] = np.nan
    train_mean = np.nanmean(a[train])  # the train split's own mean, never the validation rows'
    assert train_mean != pytest.approx(np.nanmean(a[:199]), abs=1e-6)
    for split, rows in ((arrays.x_train, train), (arrays.x_val, val)):
        expected = np.where(np.isnan(a[rows]), train_mean, a[rows])
        assert np.allclose(split[:, 1], expected, atol=1e-4)
        missing_city = np.isin(rows, holes["city"])
        assert np.array_equal(split[:, 7] == 1, missing_city), "a missing category is a category of its own"
        assert np.all(split[missing_city, 3:7] == 0)


# --- categorical encodings -----------------------------------------------------------------------


def test_onehot_and_standardisation_match_an_independent_encoding_of_the_train_split(tmp_path):
    table = make_table(300, 3)
    table["kind"] = np.where(np.arange(300) % 3 == 0, "x", "y")
    path = write(tmp_path / "t.csv", table)
    arrays = load(csv_spec(path))
    assert arrays.info.encoding["columns"] == ["id", "a", "b", "city=lima", "city=oslo", "city=paris", "city=rome",
                                               "kind=x", "kind=y"]
    train, val, _ = split_rows(table["label"])
    numeric = np.stack([table[c].astype(float) for c in ("id", "a", "b")], axis=1)
    mean, std = numeric[train].mean(0), numeric[train].std(0)
    for x, rows in ((arrays.x_train, train), (arrays.x_val, val)):
        assert np.allclose(x[:, :3], (numeric[rows] - mean) / std, atol=1e-5)
        assert np.array_equal(x[:, 3:7], onehot(table["city"][rows], list(CITIES)))
        assert np.array_equal(x[:, 7:], onehot(table["kind"][rows], ["x", "y"]))
    assert arrays.info.class_names == ("no", "yes")
    assert np.array_equal(arrays.y_val, (table["label"][val] == "yes").astype(int))


def test_codes_are_one_column_per_category_feature_with_zero_for_unknown(tmp_path):
    table = make_table(200, 4)
    path = write(tmp_path / "t.csv", table)
    arrays = load(csv_spec(path, "data.categorical=codes"))
    assert arrays.info.encoding["columns"] == ["id", "a", "b", "city#code"]
    train, val, _ = split_rows(table["label"])
    expected = np.searchsorted(np.array(CITIES), table["city"][val]) + 1
    assert np.array_equal(arrays.x_val[:, 3], expected)


def test_numeric_codes_become_categories_when_listed(tmp_path):
    table = make_table(100, 5)
    table["zip"] = np.where(np.arange(100) % 2 == 0, 94110, 10001)
    path = write(tmp_path / "t.csv", table)
    assert load(csv_spec(path)).info.encoding["columns"][:4] == ["id", "a", "b", "zip"]
    columns = load(csv_spec(path, "data.categorical_columns=[zip]")).info.encoding["columns"]
    assert columns[-2:] == ["zip=10001", "zip=94110"]


def test_an_unseen_category_is_an_all_zero_row_counted_in_the_log(tmp_path, caplog):
    train_file = write(tmp_path / "train.csv", make_table(200, 6))
    first = load(csv_spec(train_file))
    encoding = tmp_path / "data_encoding.json"
    encoding.write_text(json.dumps(first.info.encoding))
    other = make_table(100, 7, cities=("oslo", "tokyo"))
    other_file = write(tmp_path / "other.csv", other)
    with caplog.at_level(logging.WARNING, logger="trainctl"):
        arrays = load(csv_spec(other_file, f"data.encoding={encoding}"))
    _, val, _ = split_rows(other["label"])
    tokyo = other["city"][val] == "tokyo"
    assert arrays.x_val.shape[1] == first.x_val.shape[1], "the encoding of the train file, not a new one"
    assert np.all(arrays.x_val[tokyo, 3:7] == 0) and np.all(arrays.x_val[~tokyo, 4] == 1)
    assert f"{int(tokyo.sum())} row(s) of the validation split have a category the train split does not have " \
           "(e.g. 'tokyo')" in caplog.text


# --- file formats --------------------------------------------------------------------------------


def test_parquet_and_tsv_load_as_the_csv_does(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = make_table(150, 8)
    table["b"] = np.where(np.arange(150) % 10 == 0, np.nan, table["b"])
    reference = load(csv_spec(write(tmp_path / "t.csv", table, holes={"b": list(range(0, 150, 10))}),
                              "data.missing=mean"))
    pq.write_table(pa.table(table), tmp_path / "t.parquet")
    tsv = write(tmp_path / "t.tsv", table, sep="\t", holes={"b": list(range(0, 150, 10))})
    for path in (tmp_path / "t.parquet", tsv):
        arrays = load(csv_spec(path, "data.missing=mean"))
        assert arrays.info.encoding == reference.info.encoding
        for name in ("x_train", "y_train", "x_val", "y_val"):
            assert np.array_equal(getattr(arrays, name), getattr(reference, name)), (path.name, name)


def test_spaces_quotes_and_a_byte_order_mark_are_read_as_a_user_means_them(tmp_path):
    rows = "".join(f'" {i}.5 ", {i % 3} ,"{"ab"[i % 2]} ",{i % 2}\n' for i in range(40))
    path = tmp_path / "t.csv"
    path.write_bytes(("\ufeffx , n,cat,label\n" + rows).encode("utf-8"))
    arrays = load(csv_spec(path, "data.standardize=false"))
    assert arrays.info.encoding["columns"] == ["x", "n", "cat=a", "cat=b"]
    assert set(arrays.x_train[:, 0] - np.floor(arrays.x_train[:, 0])) == {0.5}


# --- test split ----------------------------------------------------------------------------------


def test_test_fraction_is_held_out_stratified_and_seeded(tmp_path):
    table = make_table(400, 9)
    path = write(tmp_path / "t.csv", table)
    arrays = load(csv_spec(path, "data.test_fraction=0.25", "data.standardize=false"))
    train, val, test = split_rows(table["label"], test_fraction=0.25)
    assert len(test) == 100 and arrays.info.n_train + arrays.info.n_val == 300
    assert np.array_equal(arrays.x_train[:, 0], train) and np.array_equal(arrays.x_val[:, 0], val)
    used = set(arrays.x_train[:, 0].astype(int)) | set(arrays.x_val[:, 0].astype(int))
    assert len(used) == 300 and not used & set(test.tolist()), "no test row is trained or validated on"
    share = (table["label"] == "yes").mean()
    assert (table["label"][test] == "yes").mean() == pytest.approx(share, abs=0.01)
    other = load(csv_spec(path, "data.test_fraction=0.25", "data.standardize=false", "data.seed=1"))
    assert not np.array_equal(other.x_val[:, 0], arrays.x_val[:, 0])


def test_the_test_file_is_not_read_for_training(tmp_path):
    from trainctl.job import train

    path = write(tmp_path / "t.csv", make_table(200, 10))
    test_file = write(tmp_path / "test.csv", make_table(50, 11), holes={"a": [4]})  # unreadable by the default policy
    spec = compose(["data=csv", f"data.path={path}", "data.target=label", f"data.test_path={test_file}",
                    "trainer.max_epochs=1", *QUIET])
    assert train(spec, tmp_path / "run", str(tmp_path))["stop_reason"] == "completed"
    out = trainctl(["eval", str(tmp_path / "run"), "--split", "test"], cwd=tmp_path, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "data.missing: test.csv has missing values in 1 row(s): column 'a' on 1 row(s) (line 6)" in out.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run trained on train.csv with a held-out test fraction (in-process, a few seconds)."""
    from trainctl.job import train

    root = tmp_path_factory.mktemp("tabular")
    table = make_table(600, 12)
    write(root / "train.csv", table)
    spec = compose(["data=csv", "data.path=train.csv", "data.target=label", "data.test_fraction=0.2",
                    "trainer.max_epochs=6", "model.dropout=0", *QUIET], str(root))
    summary = train(spec, root / "run", str(root))
    return root, table, summary


def _independent_accuracy(root: Path, x: np.ndarray, y: np.ndarray) -> float:
    import torch

    from trainctl.job import load_saved_run

    run = load_saved_run(root / "run", [], str(root))[0]  # the model with its trained weights
    with torch.no_grad():
        predictions = run.model.eval()(torch.from_numpy(x)).argmax(-1).numpy()
    return float(np.mean(predictions == y))


def _encode_by_hand(table: Dict[str, np.ndarray], rows: np.ndarray, train: np.ndarray) -> np.ndarray:
    numeric = np.stack([table[c].astype(float) for c in ("id", "a", "b")], axis=1)
    mean, std = numeric[train].mean(0), numeric[train].std(0)
    return np.concatenate([(numeric[rows] - mean) / std, onehot(table["city"][rows], list(CITIES))],
                          axis=1).astype(np.float32)


def test_eval_split_test_gives_the_metrics_of_the_held_out_rows(trained):
    root, table, _ = trained
    out = trainctl(["eval", str(root / "run"), "--split", "test", "--json"], cwd=root, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["split"] == "test" and result["samples"] == 120
    assert json.loads((root / "run" / "eval-test.json").read_text())["metrics"] == result["metrics"]
    train, _, test = split_rows(table["label"], test_fraction=0.2)
    x, y = _encode_by_hand(table, test, train), (table["label"][test] == "yes").astype(int)
    assert result["metrics"]["test/acc"] == pytest.approx(_independent_accuracy(root, x, y), abs=1e-6)
    assert result["metrics"]["test/acc"] >= 0.8


def test_eval_applies_the_runs_stored_encoding_to_another_file(trained):
    root, table, _ = trained
    encoding = json.loads((root / "run" / "data_encoding.json").read_text())
    train, _, _ = split_rows(table["label"], test_fraction=0.2)
    trained_on = np.stack([table[c].astype(float) for c in ("id", "a", "b")], axis=1)[train]
    means, stds = trained_on.mean(0), trained_on.std(0)  # the training file's train split, computed here
    assert np.allclose([encoding["features"][i]["mean"] for i in range(3)], means, rtol=1e-9)
    assert np.allclose([encoding["features"][i]["std"] for i in range(3)], stds, rtol=1e-9)
    assert encoding["features"][3]["levels"] == list(CITIES)
    # Another file with two of the cities only: a refitted encoding would have two city columns and not fit
    # the model; the stored one applies the training statistics.
    other = make_table(200, 13, cities=("paris", "rome"))
    write(root / "other.csv", other)
    out = trainctl(["eval", str(root / "run"), "--json", "-o", "o.json", "data.path=other.csv",
                    "data.test_fraction=0"], cwd=root, timeout=120)
    assert out.returncode == 0, out.stderr
    _, val, _ = split_rows(other["label"])
    numeric = np.stack([other[c].astype(float) for c in ("id", "a", "b")], axis=1)[val]
    x = np.concatenate([(numeric - means) / stds, onehot(other["city"][val], list(CITIES))], axis=1).astype(np.float32)
    y = (other["label"][val] == "yes").astype(int)
    assert json.loads(out.stdout)["metrics"]["val/acc"] == pytest.approx(_independent_accuracy(root, x, y), abs=1e-6)


def test_eval_split_test_with_a_test_file_given_at_eval_time(trained):
    root, _, _ = trained
    write(root / "fresh.csv", make_table(90, 14))
    out = trainctl(["eval", str(root / "run"), "--split", "test", "--json", "-o", "f.json", "data.test_fraction=0",
                    "data.test_path=fresh.csv"], cwd=root, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["samples"] == 90


def test_regression_test_split_is_scored_in_the_targets_own_units(tmp_path):
    import torch

    from trainctl.job import evaluate_saved, load_saved_run, train

    rng = np.random.default_rng(19)
    n = 300
    a, b = rng.normal(size=n), rng.normal(size=n)
    kind = np.array(["u", "v"])[rng.integers(0, 2, n)]
    price = 1000 + 40 * a - 25 * b + 30 * (kind == "v") + rng.normal(scale=2, size=n)
    table = {"a": a.round(4), "b": b.round(4), "kind": kind, "price": price.round(3)}
    write(tmp_path / "prices.csv", table)
    spec = compose(["data=csv", "data.path=prices.csv", "data.target=price", "data.test_fraction=0.2",
                    "trainer.max_epochs=2", *QUIET], str(tmp_path))
    train(spec, tmp_path / "run", str(tmp_path))
    result = evaluate_saved(tmp_path / "run", [], str(tmp_path), "test")
    assert result["split"] == "test" and result["samples"] == 60 and "test/mse" in result["metrics"]
    rest, test = train_test_split(np.arange(n), test_size=0.2, random_state=0)  # unstratified for regression
    train_rows, _ = train_test_split(np.sort(rest), test_size=0.2, random_state=0)
    numeric = np.stack([table["a"], table["b"]], axis=1)
    mean, std = numeric[train_rows].mean(0), numeric[train_rows].std(0)
    test = np.sort(test)
    x = np.concatenate([(numeric[test] - mean) / std, onehot(kind[test], ["u", "v"])], axis=1).astype(np.float32)
    y_mean, y_std = table["price"][train_rows].mean(), table["price"][train_rows].std()
    model = load_saved_run(tmp_path / "run", [], str(tmp_path))[0].model.eval()
    with torch.no_grad():
        predicted = model(torch.from_numpy(x))[:, 0].double().numpy() * y_std + y_mean
    errors = predicted - table["price"][test]
    assert result["metrics"]["test/mse"] == pytest.approx(np.mean(errors ** 2), rel=1e-4)
    assert result["metrics"]["test/mae"] == pytest.approx(np.mean(np.abs(errors)), rel=1e-4)


# --- errors --------------------------------------------------------------------------------------


def _cli_error(args: List[str], cwd: Path) -> str:
    out = trainctl(args, cwd=cwd, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr + out.stdout and "fix:" in out.stderr
    return out.stderr


def test_split_test_without_a_test_split_exits_2_with_the_fix(tmp_path):
    from trainctl.job import train

    path = write(tmp_path / "t.csv", make_table(100, 15))
    spec = compose(["data=csv", f"data.path={path}", "data.target=label", "trainer.max_epochs=1", *QUIET])
    train(spec, tmp_path / "run", str(tmp_path))
    stderr = _cli_error(["eval", str(tmp_path / "run"), "--split", "test"], tmp_path)
    assert "no test split" in stderr and "data.test_path=FILE" in stderr and "data.test_fraction" in stderr
    stderr = _cli_error(["eval", str(tmp_path / "run"), "--split", "test", "data.test_path=nope.csv"], tmp_path)
    assert "data.test_path: no such file" in stderr


def test_run_errors_exit_2_naming_the_key(tmp_path):
    table = make_table(100, 16)
    write(tmp_path / "holes.csv", table, holes={"b": [1, 2]})
    stderr = _cli_error(["run", "data=csv", "data.path=holes.csv", "data.target=label", "data.task=classification",
                         f"hydra.run.dir={tmp_path / 'r1'}"], tmp_path)
    assert "data.missing: holes.csv has missing values in 2 row(s)" in stderr and "data.missing=drop" in stderr
    typo = {**table, "b": table["b"].astype(str)}
    typo["b"][[7, 30]] = ["1.5.2", "abc"]
    write(tmp_path / "typo.csv", typo)
    stderr = _cli_error(["run", "data=csv", "data.path=typo.csv", "data.target=label",
                         f"hydra.run.dir={tmp_path / 'r2'}"], tmp_path)
    assert "data.features: column 'b' of typo.csv holds numbers except in 2 cell(s): line 9 '1.5.2', line 32 'abc'" \
        in stderr and "data.categorical_columns=[b]" in stderr
    stderr = _cli_error(["run", "data=csv", "data.path=typo.csv", "data.target=lable",
                         f"hydra.run.dir={tmp_path / 'r3'}"], tmp_path)
    assert "its columns are: id, a, b, city, label" in stderr
    stderr = _cli_error(["run", "data=csv", "data.path=typo.csv", "data.target=label", "data.features=[a,label]",
                         f"hydra.run.dir={tmp_path / 'r4'}"], tmp_path)
    assert "cannot also be a feature" in stderr
    assert not any((tmp_path / f"r{i}").exists() for i in range(1, 5))


@pytest.mark.parametrize("setting,words", [
    ("data.missing=fill", "data.missing: 'fill' is not one of error, drop, mean"),
    ("data.categorical=embed", "data.categorical: 'embed' is not one of onehot, codes"),
    ("data.test_fraction=0.9", "data.test_fraction: must be >= 0 and leave rows for training"),
    ("data.categorical_columns=[nope]", "data.categorical_columns: no feature column 'nope'"),
])
def test_settings_are_checked_at_composition(tmp_path, setting, words):
    path = write(tmp_path / "t.csv", make_table(30, 17))
    with pytest.raises(ConfigError) as error:
        compose(["data=csv", f"data.path={path}", "data.target=label", setting])
    assert words in str(error.value) and error.value.fix


def test_infinite_values_and_too_many_categories_are_refused(tmp_path):
    table = make_table(100, 18)
    table["a"] = np.where(np.arange(100) == 9, np.inf, table["a"])
    with pytest.raises(ConfigError, match=r"column 'a' of t.csv holds infinite values on 1 row\(s\) \(line 11\)"):
        load(csv_spec(write(tmp_path / "t.csv", table)))
    table = make_table(100, 18)
    table["name"] = np.array([f"n{i}" for i in range(100)])
    with pytest.raises(ConfigError) as error:
        load(csv_spec(write(tmp_path / "t.csv", table), "data.max_categories=50"))
    assert error.value.key == "data.max_categories" and "data.features=[id,a,b,city]" in error.value.fix


def test_parquet_without_pyarrow_names_the_install(tmp_path, monkeypatch):
    from trainctl import csvfile

    (tmp_path / "t.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now fails
    csvfile._header_cached.cache_clear()
    with pytest.raises(ConfigError) as error:
        csvfile.read_header(str(tmp_path / "t.parquet"), None)
    assert "needs pyarrow" in error.value.message and "pip install" in error.value.fix


def test_validation_reads_the_header_only_and_imports_no_pyarrow(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("a,b,label\n" + "1,2,0\n" * 30 + "3,4\n")  # a short row far down: found by the load, later
    code = ("import sys; sys.path.insert(0, 'tests'); from conftest import compose; "
            f"compose(['data=csv', 'data.path={path}', 'data.target=label', 'data.task=classification']); "
            "print('pyarrow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
