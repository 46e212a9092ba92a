"""Bring your own data: `data=custom` (a user's torch Datasets through a marked factory) and `data=images`
(image folders and CSVs, augmentation) — inference of the task, refusals of what a config may not call,
per-sample determinism, and exact resume after SIGKILL with and without DataLoader workers."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, resume_and_compare, trainctl
from trainctl.errors import ConfigError

QUIET = ["logging.progress=none", "logging.tensorboard=false"]
FAULTS = str(REPO / "tests" / "faults.py")

MODULE = textwrap.dedent('''
    import os
    import torch
    from torch.utils.data import Dataset
    from trainctl.datasets import dataset_factory


    class Blobs(Dataset):
        """Three Gaussian blobs in 8 dimensions; every read adds fresh noise (a random augmentation)."""

        classes = ["a", "b", "c"]

        def __init__(self, n=300, seed=0, split=None):
            g = torch.Generator().manual_seed(seed if split != "val" else seed + 1)
            self.y = torch.randint(0, 3, (n,), generator=g)
            self.x = torch.randn(n, 8, generator=g) + self.y[:, None].float()

        def __len__(self):
            return len(self.y)

        def __getitem__(self, i):
            return {"input": self.x[i] + 0.3 * torch.randn(8), "label": int(self.y[i])}


    class Curve(Dataset):
        def __len__(self):
            return 200

        def __getitem__(self, i):
            x = torch.tensor([i / 200.0, (i % 7) / 7.0])
            return x, torch.tensor([x.sum().item(), x[0].item() ** 2])


    class Tokens(Dataset):
        vocab_size = 50

        def __len__(self):
            return 64

        def __getitem__(self, i):
            seq = (torch.arange(17) * (i + 1)) % 50
            return seq[:-1], seq[1:]


    @dataset_factory
    def blobs(n=300):
        return {"train": Blobs(n, 0), "val": Blobs(n // 3, 0, "val")}


    @dataset_factory
    def one_set(n=300):
        return Blobs(n, 0)


    def not_marked():
        return Blobs(), Blobs()


    def make_file(path="owned.txt"):
        open(path, "w").close()
    ''')


@pytest.fixture
def module_dir(tmp_path: Path) -> Path:
    (tmp_path / "my_data.py").write_text(MODULE)
    return tmp_path


def _custom(target: str, *extra: str) -> List[str]:
    return [*QUIET, "data=custom", f"data._target_={target}", "allowed_target_prefixes=[my_data.]", *extra]


def _build(args: List[str], cwd: Path):
    from conftest import compose
    from trainctl.build import build_run

    return build_run(compose(args, str(cwd)), base_dir=str(cwd))


# --- data=custom ----------------------------------------------------------------------------------------


def test_a_marked_factory_trains_and_the_task_classes_and_shape_are_read_from_the_samples(module_dir):
    run = _build(_custom("my_data.blobs"), module_dir)
    info = run.data.info
    assert (info.task, info.input_shape, info.num_classes, info.class_names) == ("classification", (8,), 3,
                                                                                ("a", "b", "c"))
    assert (info.n_train, info.n_val) == (300, 100)
    x, y = run.data.train.first()
    assert x.shape == (64, 8) and x.dtype == torch.float32 and y.dtype == torch.int64


def test_a_dataset_class_with_a_split_argument_and_one_dataset_split_by_val_fraction(module_dir):
    both = _build(_custom("my_data.Blobs", "+data.args={n: 120}"), module_dir).data.info
    assert (both.n_train, both.n_val) == (120, 120), "built twice, with split=train and split=val"
    one = _build(_custom("my_data.one_set", "data.val_fraction=0.25"), module_dir).data.info
    assert (one.n_train, one.n_val) == (225, 75)


def test_regression_and_token_datasets_are_recognised(module_dir):
    curve = _build(_custom("my_data.Curve", "loss=mse"), module_dir).data.info
    assert (curve.task, curve.num_targets, curve.input_shape) == ("regression", 2, (2,))
    tokens = _build(_custom("my_data.Tokens", "model=gpt", "model.n_layer=1"), module_dir)
    assert (tokens.data.info.task, tokens.data.info.vocab_size) == ("lm", 50)
    with pytest.raises(ConfigError, match="not lm"):
        _build(_custom("my_data.Tokens"), module_dir)  # the default MLP takes numeric features


def test_samples_are_a_pure_function_of_seed_epoch_and_index(module_dir):
    source = _build(_custom("my_data.blobs"), module_dir).data.train.source
    source.epoch = 3
    a, b = source.sample(5), source.sample(5)
    assert torch.equal(a[0], b[0]), "the dataset's own randomness is seeded per (seed, epoch, index)"
    source.epoch = 4
    assert not torch.equal(source.sample(5)[0], a[0]), "and differs from one epoch to the next"


@pytest.mark.parametrize("target,message", [
    ("my_data.not_marked", "nor a function marked"),
    ("my_data.make_file", "nor a function marked"),
    ("my_data.os.system", "no module 'my_data.os'"),
    ("my_data.torch.save", "no module 'my_data.torch'"),
])
def test_only_dataset_classes_and_marked_factories_may_be_called(module_dir, target, message):
    out = trainctl(["show", *_custom(target)], cwd=module_dir)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr
    assert not (module_dir / "owned.txt").exists()


def test_a_factory_needs_its_module_allowed(module_dir):
    out = trainctl(["show", *QUIET, "data=custom", "data._target_=my_data.blobs"], cwd=module_dir)
    assert out.returncode == 2 and "allowed_target_prefixes=[my_data.]" in out.stderr


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_sigkill_then_resume_of_a_custom_dataset_is_bitwise_exact(module_dir, workers):
    args = [*_custom("my_data.blobs"), "trainer.max_epochs=4", "data.batch_size=32", f"data.num_workers={workers}",
            "checkpoint.every_n_steps=8", "checkpoint.every_n_epochs=null", "regularization.dropout=0.2"]
    _kill_and_resume(args, 23, 20, module_dir)  # 10 steps per epoch: step 20 ends epoch 2 (a new best)


# --- data=images ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digit_images(tmp_path_factory) -> Path:
    """600 of the bundled digits as 16x16 PNG files in class folders, and a CSV listing the same files."""
    from PIL import Image

    from trainctl.data import digits_arrays

    root = tmp_path_factory.mktemp("images")
    pixels, labels = digits_arrays()
    rows = ["file,digit"]
    for i in range(600):
        folder = root / "folders" / f"d{labels[i]}"
        folder.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray((pixels[i].reshape(8, 8) * 16).clip(0, 255).astype(np.uint8)).resize((16, 16))
        image.save(folder / f"{i:04d}.png")
        rows.append(f"folders/d{labels[i]}/{i:04d}.png,{labels[i]}")
    (root / "list.csv").write_text("\n".join(rows) + "\n")
    return root


def _images(path: Path, *extra: str) -> List[str]:
    return [*QUIET, "model=cnn", "model.channels=[8]", "data=images", f"data.path={path}", "data.image_size=16",
            *extra]


def test_an_image_folder_and_a_csv_of_the_same_files_give_the_same_data(digit_images, tmp_path):
    folders = _build(_images(digit_images / "folders"), tmp_path).data
    table = _build(_images(digit_images / "list.csv", "data.label_column=digit", "data.path_column=file"),
                   tmp_path).data
    assert folders.info.class_names == tuple(f"d{i}" for i in range(10))
    assert table.info.class_names == tuple(str(i) for i in range(10))
    assert folders.info.input_shape == (1, 16, 16) and folders.info.n_train + folders.info.n_val == 600

    def labelled(data) -> dict:
        return {Path(p).name: int(label) for source in (data.train.source, data.val.source)
                for p, label in zip(source.paths, source.labels)}
    assert labelled(folders) == labelled(table)
    assert folders.train.source.mean == table.train.source.mean or folders.info.n_train == table.info.n_train


def test_decoding_and_normalising_against_pillow_and_numpy(digit_images, tmp_path):
    from PIL import Image

    source = _build(_images(digit_images / "folders"), tmp_path).data.val.source
    x, _ = source.sample(0)
    with Image.open(source.paths[0]) as image:
        expected = np.asarray(image.convert("L").resize((16, 16), Image.BILINEAR), dtype=np.float32) / 255.0
    expected = (expected - source.mean[0]) / source.std[0]
    assert np.allclose(x[0].numpy(), expected, atol=1e-5)


@pytest.mark.parametrize("preset", ["light", "standard"])
def test_augmentation_is_seeded_per_sample_and_only_on_the_training_split(digit_images, tmp_path, preset):
    data = _build(_images(digit_images / "folders", f"data.augment={preset}"), tmp_path).data
    train, val = data.train.source, data.val.source
    assert val.preset == "none" and train.preset == preset
    train.epoch = 1
    first = train.sample(3)[0]
    assert torch.equal(train.sample(3)[0], first)
    seen = set()
    for epoch in range(2, 8):
        train.epoch = epoch
        seen.add(train.sample(3)[0].numpy().tobytes())
    assert len(seen) > 1, "other epochs draw other augmentations"


def test_image_data_errors_name_the_key(digit_images, tmp_path):
    (tmp_path / "one" / "cat").mkdir(parents=True)
    out = trainctl(["show", *_images(tmp_path / "one")], cwd=tmp_path)
    assert out.returncode == 2 and "data.path" in out.stderr and "class folder" in out.stderr
    out = trainctl(["show", *_images(digit_images / "list.csv", "data.path_column=file", "data.label_column=nope")],
                   cwd=tmp_path)
    assert out.returncode == 2 and "data.label_column" in out.stderr and "file, digit" in out.stderr


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_sigkill_then_resume_of_augmented_images_is_bitwise_exact(digit_images, tmp_path, workers):
    args = [*_images(digit_images / "folders", "data.augment=standard", f"data.num_workers={workers}"),
            "trainer.max_epochs=3", "data.batch_size=32", "checkpoint.every_n_steps=10",
            "checkpoint.every_n_epochs=null"]
    _kill_and_resume(args, 23, 20, tmp_path)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stop_reason"] == "completed"


def _kill_and_resume(args: List[str], kill_at: int, resumes_from: int, cwd: Path) -> None:
    """SIGKILL a run right after step ``kill_at``, resume it, and compare it with the uninterrupted run."""
    def make_reference(name: str = "reference") -> Path:
        out = trainctl(["run", *args, f"hydra.run.dir={cwd / name}"], cwd=cwd)
        assert out.returncode == 0, out.stderr
        return cwd / name
    reference = make_reference()
    run_dir = cwd / "run"
    proc = subprocess.Popen([sys.executable, FAULTS, "kill-after-step", str(kill_at), "--", "run", *args,
                             f"hydra.run.dir={run_dir}"], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert (run_dir / "checkpoints" / "last").resolve().name == f"step-{resumes_from:08d}"
    def same_weights(resumed: Path, ref: Path) -> None:
        a, b = load_file(str(resumed / "model.safetensors")), load_file(str(ref / "model.safetensors"))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{key} differs after resuming"
    resume_and_compare(run_dir, cwd, reference, same_weights, lambda: make_reference("reference-2"))
