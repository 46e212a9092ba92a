"""Datasets: the digits split, CSV/TSV loading (task inference, train-only standardisation), text windows."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import compose
from trainctl.data import load
from trainctl.errors import ConfigError


def test_digits_split_is_fixed_stratified_and_disjoint():
    arrays = load(compose([]).data)
    assert arrays.x_train.shape == (1437, 1, 8, 8) and arrays.x_val.shape == (360, 1, 8, 8)
    assert 0.0 <= arrays.x_train.min() and arrays.x_train.max() <= 1.0
    assert np.bincount(arrays.y_val).min() >= 35, "every class is in the validation split"
    train = {x.tobytes() for x in arrays.x_train}
    assert not any(x.tobytes() in train for x in arrays.x_val)
    again = load(compose([]).data)
    assert np.array_equal(arrays.y_val, again.y_val)


def test_digits_are_read_as_scikit_learn_loads_them():
    from sklearn.datasets import load_digits

    from trainctl.data import digits_arrays

    pixels, labels = digits_arrays()
    bunch = load_digits()
    assert np.array_equal(pixels, bunch.data) and np.array_equal(labels, bunch.target)


@pytest.mark.parametrize("n", [12, 37, 360, 1797])
@pytest.mark.parametrize("classes", [None, 2, 3, 10])
def test_the_split_is_scikit_learns_train_test_split(n, classes):
    from sklearn.model_selection import train_test_split

    from trainctl.arrays import split_indices as _split

    rng = np.random.RandomState(n)
    labels = None if classes is None else rng.randint(0, classes, size=n)
    labels_for_sklearn = labels
    for fraction in (0.1, 0.1997, 0.2, 0.25, 0.5):
        if labels is not None:  # stratified only when every class fits on both sides, as trainctl does
            counts, n_val = np.unique(labels, return_counts=True)[1], int(np.ceil(n * fraction))
            fits = counts.min() >= 2 and min(n_val, n - n_val) >= len(counts)
            labels_for_sklearn = labels if fits else None
        for seed in (0, 1, 7):
            train, val = train_test_split(np.arange(n), test_size=fraction, random_state=seed,
                                          stratify=labels_for_sklearn)
            ours = _split(n, fraction, seed, labels)
            assert np.array_equal(ours[0], np.sort(train)) and np.array_equal(ours[1], np.sort(val)), \
                (fraction, seed)


def test_csv_classification_with_text_labels(csv_classification):
    arrays = load(compose(["data=csv", f"data.path={csv_classification}", "data.target=label"]).data)
    info = arrays.info
    assert info.task == "classification" and info.class_names == ("neg", "pos") and info.input_shape == (3,)
    assert info.n_train == 320 and info.n_val == 80
    # standardisation uses the training split only
    assert np.allclose(arrays.x_train.mean(0), 0, atol=1e-5) and np.allclose(arrays.x_train.std(0), 1, atol=1e-4)
    assert not np.allclose(arrays.x_val.mean(0), 0, atol=1e-3)


def test_tsv_regression_is_inferred_and_targets_scaled(tsv_regression):
    arrays = load(compose(["data=csv", f"data.path={tsv_regression}", "data.target=y"]).data)
    info = arrays.info
    assert info.task == "regression" and info.num_targets == 1
    assert info.target_mean[0] == pytest.approx(50, abs=0.5)
    restored = arrays.y_val[:, 0] * info.target_std[0] + info.target_mean[0]
    raw = np.loadtxt(tsv_regression, delimiter="\t", skiprows=1)[:, 2]
    nearest = np.abs(restored[:, None] - raw[None, :]).min(axis=1)
    assert nearest.max() < 1e-3, "un-scaled validation targets are the file's own values"


def test_integer_target_with_few_values_is_classification(tmp_path):
    path = tmp_path / "ints.csv"
    rows = [f"{i % 7},{(i * 37) % 11},{i % 3}" for i in range(60)]
    path.write_text("a,b,cls\n" + "\n".join(rows) + "\n")
    spec = compose(["data=csv", f"data.path={path}", "data.target=cls"]).data
    assert load(spec).info.num_classes == 3
    forced = compose(["data=csv", f"data.path={path}", "data.target=cls", "data.task=regression",
                      "loss=mse"]).data
    assert load(forced).info.task == "regression"


def test_feature_selection_and_non_numeric_features(tmp_path, csv_classification):
    spec = compose(["data=csv", f"data.path={csv_classification}", "data.target=label",
                    "data.features=[x1,x2]"]).data
    assert load(spec).info.input_shape == (2,)
    path = tmp_path / "mixed.csv"
    path.write_text("city,x,y\n" + "\n".join(f"{c},{i},{i % 2}" for i, c in enumerate(["a", "b"] * 10)) + "\n")
    info = load(compose(["data=csv", f"data.path={path}", "data.target=y"]).data).info
    assert info.input_shape == (3,) and info.encoding["columns"] == ["x", "city=a", "city=b"], \
        "a text column is a categorical feature, one-hot encoded after the numeric ones"


def test_ragged_csv_names_the_line(tmp_path):
    path = tmp_path / "ragged.csv"
    path.write_text("a,b,y\n1,2,0\n3,4\n" + "5,6,1\n" * 20)
    spec = compose(["data=csv", f"data.path={path}", "data.target=y", "data.task=classification"]).data
    with pytest.raises(ConfigError, match="line 3 has 2 fields"):  # found when the rows are read, not by validate()
        load(spec)


def test_text_windows_are_next_byte_pairs(text_file):
    from trainctl.batches import build_batches
    import torch

    spec = compose(["data=text", f"data.path={text_file}", "model=gpt", "data.seq_len=32"]).data
    bundle = build_batches(spec, load(spec), torch.device("cpu"))
    x, y = next(bundle.train.epoch(0))
    assert x.shape == y.shape == (32, 32) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1]), "targets are the inputs shifted by one byte"
    raw = text_file.read_bytes()
    assert bytes(x[0].tolist()) in raw
    cut = int(len(raw) * 0.9)
    val_x, _ = next(bundle.val.epoch(0))
    assert bytes(val_x[0].tolist()) == raw[cut:cut + 32], "validation comes from the end of the file"


def test_text_too_short_for_seq_len(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("hello world")
    with pytest.raises(ConfigError, match="too few"):
        compose(["data=text", f"data.path={path}", "model=gpt"])


def test_synthetic_data_is_seeded():
    a = load(compose(["data=synthetic", "data.seed=3"]).data)
    b = load(compose(["data=synthetic", "data.seed=3"]).data)
    c = load(compose(["data=synthetic", "data.seed=4"]).data)
    assert np.array_equal(a.x_train, b.x_train) and not np.array_equal(a.x_train, c.x_train)


@pytest.mark.parametrize("n_samples,n_features,n_informative,n_classes,noise,seed", [
    (2000, 20, 10, 3, 0.1, 0),      # the defaults: the hypercube's vertices by tracking selection
    (70000, 64, 10, 10, 0.1, 3),    # 20 clusters in 1024 vertices: by permutation
    (500, 8, 2, 2, 0.0, 5),         # 4 vertices of 4: reservoir sampling
    (300, 40, 35, 4, 0.3, 1),       # more than 30 informative dimensions
    (1001, 7, 7, 5, 1.0, 2),        # every label redrawn, no noise features, uneven clusters
])
def test_synthetic_classification_is_scikit_learns(n_samples, n_features, n_informative, n_classes, noise, seed):
    from sklearn.datasets import make_classification

    from trainctl import synthetic

    x, y = synthetic.make_classification(n_samples, n_features, n_informative, n_classes, noise, seed)
    ref_x, ref_y = make_classification(n_samples=n_samples, n_features=n_features, n_informative=n_informative,
                                       n_redundant=0, n_classes=n_classes, flip_y=noise, random_state=seed)
    assert np.array_equal(x, ref_x) and np.array_equal(y, ref_y)


@pytest.mark.parametrize("n_targets,noise,seed", [(1, 0.1, 0), (3, 0.0, 4), (2, 5.0, 9)])
def test_synthetic_regression_is_scikit_learns(n_targets, noise, seed):
    from sklearn.datasets import make_regression

    from trainctl import synthetic

    x, y = synthetic.make_regression(400, 12, 5, n_targets, noise, seed)
    ref_x, ref_y = make_regression(n_samples=400, n_features=12, n_informative=5, n_targets=n_targets,
                                   noise=noise, random_state=seed)
    assert np.array_equal(x, ref_x) and np.array_equal(y, ref_y)


def test_synthetic_data_does_not_import_scikit_learn():
    import subprocess
    import sys

    code = ("import sys; from trainctl.data import SyntheticSpec, load; load(SyntheticSpec()); "
            "print(any(m.startswith('sklearn') for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_digits_classes_keeps_those_digits_relabelled_in_the_order_given():
    from trainctl.data import digits_arrays, load

    spec = compose(["data.classes=[7,3]"]).data
    arrays = load(spec)
    _, labels = digits_arrays()
    assert arrays.info.num_classes == 2 and arrays.info.class_names == ("7", "3")
    assert arrays.info.n_train + arrays.info.n_val == int(((labels == 7) | (labels == 3)).sum())
    pixels, labels = digits_arrays()
    sevens = pixels[labels == 7].reshape(-1, 1, 8, 8) / 16.0
    x = np.concatenate([arrays.x_train, arrays.x_val])
    y = np.concatenate([arrays.y_train, arrays.y_val])
    assert sorted(map(bytes, x[y == 0].astype(np.float32))) == sorted(map(bytes, sevens.astype(np.float32)))
    with pytest.raises(ConfigError, match="data.classes"):
        compose(["data.classes=[3,3]"])
