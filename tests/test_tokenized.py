"""Datasets tokenised with a Hugging Face tokenizer from a local directory (data=hf_text,
data=hf_classification): packing into next-token blocks, padding and masks, labels, the cache in the
run directory, and errors that name the key to fix."""

from __future__ import annotations

import json
import logging
import random
import sys
from pathlib import Path

import numpy as np
import pytest

import hf_tiny
from conftest import assert_resumed_exactly, compose, trainctl
from trainctl.arrays import split_indices
from trainctl.data import load
from trainctl.errors import ConfigError

pytest.importorskip("transformers")

SENTENCES = ["the cat sat on the mat", "a dog ran under the tree", "the bird flew over the log",
             "it was a very good day", "then it was night and the cat was sad"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tokenizer")
    hf_tiny.save_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)


def _documents(n: int, seed: int = 0) -> list:
    rng = random.Random(seed)
    return [" ".join(rng.choice(SENTENCES) for _ in range(rng.randint(1, 4))) for _ in range(n)]


def _jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _text(path: Path, tokenizer_dir: Path, *extra: str):
    return compose(["data=hf_text", f"data.path={path}", f"data.tokenizer={tokenizer_dir}", "model=gpt", *extra]).data


def _classes(path: Path, tokenizer_dir: Path, *extra: str):
    stub = path.parent / "model-stub"  # model=hf validates with a config.json (nothing is built here)
    stub.mkdir(exist_ok=True)
    (stub / "config.json").write_text("{}")
    return compose(["data=hf_classification", f"data.path={path}", f"data.tokenizer={tokenizer_dir}", "model=hf",
                    f"model.path={stub}", *extra]).data


def _blocks_of(arrays, seq_len: int):
    """(train blocks, val blocks): each split's stream cut back into blocks of seq_len + 1."""
    block = seq_len + 1
    assert np.array_equal(arrays.starts_train, np.arange(arrays.info.n_train) * block)
    assert np.array_equal(arrays.starts_val, np.arange(arrays.info.n_val) * block)
    return arrays.x_train.reshape(-1, block), arrays.x_val.reshape(-1, block)


# --- data=hf_text --------------------------------------------------------------------------------------


def test_documents_are_packed_into_next_token_blocks(tmp_path, tokenizer_dir, tokenizer):
    import torch

    from trainctl.batches import build_batches

    documents = _documents(150)
    spec = _text(_jsonl(tmp_path / "docs.jsonl", [{"text": d, "id": i} for i, d in enumerate(documents)]),
                 tokenizer_dir, "data.seq_len=8")
    arrays = load(spec)
    # independently: each document's ids, then EOS, all concatenated and cut into blocks of 9
    stream = [t for d in documents for t in tokenizer(d)["input_ids"] + [tokenizer.eos_token_id]]
    n = len(stream) // 9
    blocks = np.array(stream[: n * 9]).reshape(n, 9)
    train, val = split_indices(n, 0.1, 0)
    ours_train, ours_val = _blocks_of(arrays, 8)
    assert np.array_equal(ours_train, blocks[train]) and np.array_equal(ours_val, blocks[val])
    assert len(val) == int(np.ceil(n * 0.1)) and len(train) + len(val) == n
    info = arrays.info
    assert info.task == "lm" and info.input_shape == (8,) and info.vocab_size == len(tokenizer) == 34
    assert (info.n_train, info.n_val) == (len(train), len(val))

    bundle = build_batches(spec, arrays, torch.device("cpu"))
    x, y = bundle.train.source.take(torch.arange(len(train)))
    assert x.dtype == y.dtype == torch.long and x.shape == y.shape == (len(train), 8)
    assert torch.equal(x, torch.from_numpy(blocks[train][:, :-1]))
    assert torch.equal(y, torch.from_numpy(blocks[train][:, 1:])), "targets: the next tokens"
    vx, vy = next(bundle.val.epoch(0))
    assert torch.equal(vx, torch.from_numpy(blocks[val][: len(vx), :-1]))


def test_a_text_file_is_one_document(tmp_path, tokenizer_dir, tokenizer):
    text = "\n\n".join(_documents(80, seed=3))
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    arrays = load(_text(path, tokenizer_dir, "data.seq_len=16", "data.val_fraction=0.25"))
    stream = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    assert stream.count(tokenizer.eos_token_id) == 1, "no EOS between paragraphs: the file is one document"
    n = len(stream) // 17
    train, val = split_indices(n, 0.25, 0)
    blocks = np.array(stream[: n * 17]).reshape(n, 17)
    ours_train, ours_val = _blocks_of(arrays, 16)
    assert np.array_equal(ours_train, blocks[train]) and np.array_equal(ours_val, blocks[val])


def test_the_jsonl_field_is_chosen_and_the_split_follows_the_seed(tmp_path, tokenizer_dir):
    documents = _documents(100)
    path = _jsonl(tmp_path / "docs.jsonl", [{"body": d, "text": "the the the"} for d in documents])
    a = load(_text(path, tokenizer_dir, "data.field=body", "data.seq_len=8"))
    b = load(_text(path, tokenizer_dir, "data.field=body", "data.seq_len=8"))
    c = load(_text(path, tokenizer_dir, "data.field=body", "data.seq_len=8", "data.seed=1"))
    assert np.array_equal(a.x_train, b.x_train) and np.array_equal(a.x_val, b.x_val)
    assert not np.array_equal(a.x_val, c.x_val)
    assert sorted(map(tuple, a.x_train.reshape(-1, 9))) != sorted(map(tuple, load(
        _text(path, tokenizer_dir, "data.seq_len=8")).x_train.reshape(-1, 9))), "data.field=text is other text"


# --- data=hf_classification ----------------------------------------------------------------------------


def _labelled(n: int, labels: list, seed: int = 0) -> list:
    rng = random.Random(seed)
    return [{"text": " ".join(rng.choice(hf_tiny.WORDS) for _ in range(rng.randint(1, 12))),
             "label": labels[i % len(labels)]} for i in range(n)]


def test_texts_are_padded_masked_and_labelled(tmp_path, tokenizer_dir, tokenizer):
    records = _labelled(60, ["pos", "neg", "mid"])
    arrays = load(_classes(_jsonl(tmp_path / "reviews.jsonl", records), tokenizer_dir))
    ids = [tokenizer(r["text"])["input_ids"] for r in records]
    longest = max(map(len, ids))
    info = arrays.info
    assert info.task == "classification" and info.input_shape == (2, longest) and info.num_classes == 3
    assert info.class_names == ("mid", "neg", "pos"), "text labels become classes in sorted order"
    assert arrays.x_train.dtype == arrays.y_train.dtype == np.int64
    labels = np.array([info.class_names.index(r["label"]) for r in records])
    train, val = split_indices(len(records), 0.2, 0, labels)
    for split, (x, y) in zip((train, val), ((arrays.x_train, arrays.y_train), (arrays.x_val, arrays.y_val))):
        assert np.array_equal(y, labels[split])
        for row, i in zip(x, split):
            n = len(ids[i])
            assert list(row[0, :n]) == ids[i] and set(row[0, n:]) <= {tokenizer.pad_token_id}
            assert list(row[1]) == [1] * n + [0] * (longest - n)
    assert np.bincount(arrays.y_val).tolist() == [4, 4, 4], "the split is stratified"


def test_csv_integer_labels_truncation_and_left_padding(tmp_path, tokenizer_dir):
    records = _labelled(40, [10, 2, 7])
    path = tmp_path / "reviews.csv"
    path.write_text("id,text,label\n" + "".join(f'{i},"{r["text"]}",{r["label"]}\n' for i, r in enumerate(records)))
    left = tmp_path / "left"
    left.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (left / name).write_text((tokenizer_dir / name).read_text())
    config = json.loads((left / "tokenizer_config.json").read_text())
    (left / "tokenizer_config.json").write_text(json.dumps({**config, "padding_side": "left"}))
    arrays = load(_classes(path, left, "data.max_length=4"))
    assert arrays.info.class_names == ("2", "7", "10"), "integer labels in numeric order"
    assert arrays.info.input_shape == (2, 4), "texts are truncated to data.max_length"
    x = np.concatenate([arrays.x_train, arrays.x_val])
    masks = x[:, 1]
    assert masks[:, -1].all() and (np.diff(masks, axis=1) >= 0).all(), "padding comes first on the left"
    assert (x[:, 0][masks == 0] == 0).all()


def test_without_a_pad_token_eos_pads_and_without_either_it_is_an_error(tmp_path, tokenizer_dir, tokenizer):
    path = _jsonl(tmp_path / "r.jsonl", _labelled(30, ["a", "b"]))
    no_pad = tmp_path / "no_pad"
    tokenizer.pad_token = None
    try:
        tokenizer.save_pretrained(str(no_pad))
        tokenizer.eos_token = None
        tokenizer.save_pretrained(str(tmp_path / "neither"))
    finally:
        tokenizer.pad_token, tokenizer.eos_token = "[PAD]", "[EOS]"
    arrays = load(_classes(path, no_pad))
    x = np.concatenate([arrays.x_train, arrays.x_val])
    assert (x[:, 0][x[:, 1] == 0] == tokenizer.eos_token_id).all()
    with pytest.raises(ConfigError, match="neither a pad nor an EOS token") as error:
        load(_classes(path, tmp_path / "neither"))
    assert error.value.key == "data.tokenizer" and "pad_token" in error.value.fix


# --- the cache -----------------------------------------------------------------------------------------


@pytest.fixture
def count_loads(monkeypatch):
    """How many times a tokenizer is loaded (transformers.AutoTokenizer.from_pretrained)."""
    from transformers import AutoTokenizer

    calls = []
    real = AutoTokenizer.from_pretrained

    def counted(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", counted)
    return calls


@pytest.mark.parametrize("kind", ["hf_text", "hf_classification"])
def test_a_second_load_reads_the_cache_and_a_changed_file_is_tokenised_again(tmp_path, tokenizer_dir, kind,
                                                                                 count_loads, caplog):
    if kind == "hf_text":
        path = _jsonl(tmp_path / "d.jsonl", [{"text": d} for d in _documents(100)])
        spec = _text(path, tokenizer_dir, "data.seq_len=8")
    else:
        path = _jsonl(tmp_path / "d.jsonl", _labelled(30, ["x", "y"]))
        spec = _classes(path, tokenizer_dir)
    cache = tmp_path / "run" / "cache"
    first = load(spec, cache_dir=cache)
    assert len(count_loads) == 1 and [p.name.startswith("tokenized-") for p in cache.iterdir()] == [True]
    with caplog.at_level(logging.INFO, logger="trainctl"):
        second = load(spec, cache_dir=cache)
    assert len(count_loads) == 1, "the cache spares loading the tokenizer"
    assert "loaded tokenised data from cache" in caplog.text
    for name in ("x_train", "y_train", "x_val", "y_val", "starts_train", "starts_val"):
        a, b = getattr(first, name), getattr(second, name)
        assert (a is None and b is None) or (np.array_equal(a, b) and a.dtype == b.dtype), name
    assert first.info == second.info

    with path.open("a") as handle:
        handle.write(json.dumps({"text": "the cat sat", "label": "x"}) + "\n")
    load(spec, cache_dir=cache)
    assert len(count_loads) == 2, "a changed data file is tokenised again"
    assert len(list(cache.glob("tokenized-*.npz"))) == 2
    load(spec)
    assert len(count_loads) == 3 and len(list(cache.iterdir())) == 2, "no cache_dir: nothing is cached"


def test_a_corrupt_or_foreign_cache_file_is_rebuilt(tmp_path, tokenizer_dir, count_loads, caplog):
    path = _jsonl(tmp_path / "d.jsonl", [{"text": d} for d in _documents(100)])
    spec = _text(path, tokenizer_dir, "data.seq_len=8")
    cache = tmp_path / "cache"
    reference = load(spec, cache_dir=cache)
    (cached,) = cache.glob("tokenized-*.npz")
    for damage in (b"not a zip file", cached.read_bytes()[:200]):
        cached.write_bytes(damage)
        with caplog.at_level(logging.WARNING, logger="trainctl"):
            again = load(spec, cache_dir=cache)
        assert "ignoring the tokenised-data cache" in caplog.text
        assert np.array_equal(again.x_train, reference.x_train) and np.array_equal(again.x_val, reference.x_val)
    loads = len(count_loads)
    load(spec, cache_dir=cache)
    assert len(count_loads) == loads, "the rebuilt cache file is used"

    other = tmp_path / "other"  # a valid cache file of other data, under this data's name
    load(_text(path, tokenizer_dir, "data.seq_len=4"), cache_dir=other)
    (foreign,) = other.glob("tokenized-*.npz")
    cached.write_bytes(foreign.read_bytes())
    again = load(spec, cache_dir=cache)
    assert np.array_equal(again.x_train, reference.x_train) and len(count_loads) == loads + 2


def test_a_cache_that_cannot_be_written_is_skipped(tmp_path, tokenizer_dir, caplog):
    path = _jsonl(tmp_path / "d.jsonl", [{"text": d} for d in _documents(60)])
    (tmp_path / "cache").write_text("a file where the directory should be")
    with caplog.at_level(logging.WARNING, logger="trainctl"):
        arrays = load(_text(path, tokenizer_dir, "data.seq_len=8"), cache_dir=tmp_path / "cache")
    assert arrays.info.n_train > 0 and "could not write the tokenised-data cache" in caplog.text


# --- errors --------------------------------------------------------------------------------------------


def _error(spec_or_overrides) -> ConfigError:
    with pytest.raises(ConfigError) as error:
        spec_or_overrides()
    return error.value


def test_bad_jsonl_lines_are_named(tmp_path, tokenizer_dir):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "the cat"}\n\n{"text": "a dog",}\n')
    error = _error(lambda: load(_text(path, tokenizer_dir)))
    assert error.key == "data.path" and "bad.jsonl line 3 is not valid JSON" in error.message
    path.write_text('{"text": "the cat"}\n["a", "list"]\n')
    assert "line 2 is a JSON list, not an object" in _error(lambda: load(_text(path, tokenizer_dir))).message
    path.write_text('{"text": "the cat"}\n{"body": "a dog", "id": 3}\n')
    error = _error(lambda: load(_text(path, tokenizer_dir)))
    assert error.key == "data.field" and "line 2 of bad.jsonl has no field 'text'" in error.message
    assert "its fields are: body, id" in error.message and error.fix == "set data.field=body"
    path.write_text('{"text": 12}\n')
    assert _error(lambda: load(_text(path, tokenizer_dir))).key == "data.field"
    path.write_bytes(b'{"text": "caf\xe9"}\n')
    assert "not UTF-8" in _error(lambda: load(_text(path, tokenizer_dir))).message


def test_too_little_text_names_seq_len(tmp_path, tokenizer_dir):
    path = tmp_path / "short.txt"
    path.write_text("the cat sat on the mat and the dog ran")  # 10 tokens + EOS
    error = _error(lambda: load(_text(path, tokenizer_dir, "data.seq_len=8")))
    assert error.key == "data.seq_len" and "11 tokens" in error.message and "at most 4" in error.fix
    assert load(_text(path, tokenizer_dir, "data.seq_len=4")).info.n_val == 1
    path.write_text("  \n\n")
    assert _error(lambda: load(_text(path, tokenizer_dir))).key == "data.path"


def test_classification_errors_name_the_key(tmp_path, tokenizer_dir):
    one_class = _jsonl(tmp_path / "one.jsonl", _labelled(20, ["pos"]))
    error = _error(lambda: load(_classes(one_class, tokenizer_dir)))
    assert error.key == "data.label" and "single class" in error.message
    error = _error(lambda: load(_classes(one_class, tokenizer_dir, "data.text=txt")))
    assert error.key == "data.text" and "its fields are: text, label" in error.message
    bad_label = _jsonl(tmp_path / "bad.jsonl", [{"text": "the cat", "label": "a"}, {"text": "a dog", "label": [1]}])
    error = _error(lambda: load(_classes(bad_label, tokenizer_dir)))
    assert error.key == "data.label" and "line 2 of bad.jsonl" in error.message
    csv = tmp_path / "r.csv"
    csv.write_text("review,label\nthe cat,a\na dog,b\n")
    error = _error(lambda: load(_classes(csv, tokenizer_dir)))
    assert error.key == "data.text" and "its columns are: review, label" in error.message
    assert error.fix == "set data.text=review"
    csv.write_text("text,label\nthe cat,a\n,b\nthe dog,b\n")
    error = _error(lambda: load(_classes(csv, tokenizer_dir)))
    assert error.key == "data.text" and "row 3 of r.csv" in error.message


def test_validation_checks_the_paths_and_sizes_without_loading(tmp_path, tokenizer_dir):
    path = _jsonl(tmp_path / "d.jsonl", [{"text": "the cat"}])
    for overrides, key in ([[f"data.tokenizer={tmp_path / 'nowhere'}"], "data.tokenizer"],
                           [[f"data.tokenizer={tmp_path}"], "data.tokenizer"],
                           [["data.seq_len=1"], "data.seq_len"],
                           [[f"data.path={tmp_path / 'missing.jsonl'}"], "data.path"]):
        error = _error(lambda: _text(path, tokenizer_dir, *overrides))
        assert error.key == key, overrides
    error = _error(lambda: compose(["data=hf_text", f"data.path={path}", "model=gpt"]))
    assert error.key == "data.tokenizer" and "required" in error.message
    assert _error(lambda: _classes(path, tokenizer_dir, "data.max_length=1")).key == "data.max_length"


def test_the_inputs_are_token_ids():
    from trainctl.data import DATASETS

    assert [name for name, entry in DATASETS.items() if entry.token_ids is True] == \
        ["hf_classification", "hf_text", "text", "tokens"]
    assert [name for name, entry in DATASETS.items() if entry.cached] == ["hf_classification", "hf_text", "tokens"]


def test_without_transformers_the_fix_is_the_extra(tmp_path, tokenizer_dir, monkeypatch):
    spec = _text(_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in _documents(40)]), tokenizer_dir)
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` fails
    error = _error(lambda: load(spec))
    assert error.key == "data.tokenizer" and "transformers" in error.message
    assert error.fix == "pip install 'trainctl[hf]'"


# --- the command line ----------------------------------------------------------------------------------


def test_show_validates_and_a_malformed_file_exits_2(tmp_path, tokenizer_dir):
    path = _jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in _documents(100)])
    args = ["show", "data=hf_text", f"data.path={path.name}", f"data.tokenizer={tokenizer_dir}", "model=gpt",
            "model.n_layer=1", "data.seq_len=16"]
    out = trainctl(args, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "name: hf_text" in out.stdout and f"path: {path}" in out.stdout and "seq_len: 16" in out.stdout
    path.write_text(path.read_text() + '{"text": "the cat"\n')
    out = trainctl(args, cwd=tmp_path, timeout=120)
    assert out.returncode == 2 and "docs.jsonl line 101 is not valid JSON" in out.stderr and "fix:" in out.stderr
    assert "Traceback" not in out.stdout + out.stderr


def test_gpt_learns_tokenised_text(tmp_path, tokenizer_dir):
    path = _jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in _documents(300)])
    run_dir = tmp_path / "run"
    out = trainctl(["run", "data=hf_text", f"data.path={path}", f"data.tokenizer={tokenizer_dir}", "data.seq_len=16",
                    "data.batch_size=16", "model=gpt", "model.n_layer=1", "model.d_model=32", "model.n_head=2",
                    "optimizer.lr=3e-3", "trainer.max_epochs=3", "logging.progress=none", "logging.tensorboard=false",
                    f"hydra.run.dir={run_dir}"], cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    final = json.loads((run_dir / "summary.json").read_text())["final"]
    arrays = load(_text(path, tokenizer_dir, "data.seq_len=16"))
    targets = [a.reshape(-1, 17)[:, 1:].ravel() for a in (arrays.x_train, arrays.x_val)]
    unigram = np.bincount(targets[0], minlength=arrays.info.vocab_size) + 0.5
    unigram_ppl = float(np.exp(-np.log(unigram[targets[1]] / unigram.sum()).mean()))  # about 20
    assert final["val/ppl"] < unigram_ppl / 2, "the model uses context, not just token frequencies"
    assert final["val/loss"] == pytest.approx(np.log(final["val/ppl"]), rel=1e-3)


@pytest.mark.slow
def test_a_resumed_run_reads_the_cache_and_continues_exactly(tmp_path, tokenizer_dir):
    path = _jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in _documents(120)])
    args = ["data=hf_text", f"data.path={path}", f"data.tokenizer={tokenizer_dir}", "data.seq_len=16",
            "data.batch_size=16", "model=gpt", "model.n_layer=1", "model.d_model=32", "model.n_head=2",
            "model.dropout=0.1", "scheduler=constant", "logging.progress=none", "logging.tensorboard=false",
            "logging.log_every_n_steps=1"]
    reference, run_dir = tmp_path / "reference", tmp_path / "run"
    for directory, epochs in ((reference, 2), (run_dir, 1)):
        out = trainctl(["run", *args, f"trainer.max_epochs={epochs}", f"hydra.run.dir={directory}"], cwd=tmp_path)
        assert out.returncode == 0, out.stderr[-3000:]
    assert len(list((run_dir / "cache").glob("tokenized-*.npz"))) == 1
    out = trainctl(["resume", str(run_dir), "trainer.max_epochs=2"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    log_text = (run_dir / "trainctl.log").read_text()
    assert log_text.count("tokenised docs.jsonl") == 1 and "loaded tokenised data from cache" in log_text
    steps = [json.loads(line)["step"] for line in (reference / "metrics.jsonl").read_text().splitlines()
             if "train/loss" in json.loads(line)]
    assert_resumed_exactly(run_dir, reference, steps)
