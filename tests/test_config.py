"""Composition of every option of every group and every recipe; errors name the key and the fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import compose
from trainctl.data import DATASETS
from trainctl.errors import ConfigError
from trainctl.loss import LOSSES
from trainctl.model import MODELS
from trainctl.optim import OPTIMIZERS
from trainctl.precision import PRECISIONS
from trainctl.schedule import SCHEDULERS
from trainctl.spec import CONF_DIR, RECIPES_DIR

REGISTRIES = {"model": MODELS, "data": DATASETS, "optimizer": OPTIMIZERS, "scheduler": SCHEDULERS,
              "precision": PRECISIONS, "loss": LOSSES}


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("group", sorted(REGISTRIES))
def test_every_registered_option_has_a_yaml_and_back(group):
    registered = set(REGISTRIES[group].names())
    files = set(_options(group)) - ({"custom"} if group == "model" else set())
    assert files == registered


def _needs(group: str, option: str, tmp: Path, text: Path, csv: Path) -> list[str]:
    """Overrides that make an option composable on its own (required fields, a compatible model/data)."""
    hf = tmp / "hf"  # validation looks for a model's config.json and a tokenizer file, nothing more
    hf.mkdir(exist_ok=True)
    (hf / "config.json").write_text("{}")
    (hf / "tokenizer_config.json").write_text("{}")
    images = tmp / "images"
    for name in ("a", "b"):
        (images / name).mkdir(parents=True, exist_ok=True)
        from PIL import Image

        for i in range(4):
            Image.new("L", (8, 8), 40 * i).save(images / name / f"{i}.png")
    tokens = tmp / "tokens"
    tokens.mkdir(exist_ok=True)
    for split in ("train", "val"):
        np.arange(4096, dtype=np.uint16).tofile(tokens / f"{split}.bin")
    extra = {
        ("data", "custom"): ["data._target_=own_datasets.Pairs", "allowed_target_prefixes=[own_datasets.]"],
        ("data", "images"): [f"data.path={images}", "model=cnn"],
        ("data", "tokens"): [f"data.path={tokens}", "data.dtype=uint16", "data.vocab_size=4096", "model=gpt"],
        ("model", "hf"): ["data=hf_text", f"data.path={text}", f"data.tokenizer={hf}", f"model.path={hf}"],
        ("data", "hf_text"): [f"data.path={text}", f"data.tokenizer={hf}", "model=gpt"],
        ("data", "hf_classification"): [f"data.path={csv}", f"data.tokenizer={hf}", "model=hf", f"model.path={hf}"],
        ("data", "csv"): [f"data.path={csv}", "data.target=label"],
        ("data", "text"): [f"data.path={text}", "model=gpt"],
        ("model", "gpt"): ["data=text", f"data.path={text}"],
        ("model", "custom"): ["model._target_=trainctl.models.mlp.MLP"],
        ("loss", "mse"): ["data=synthetic", "data.task=regression"],
        ("loss", "l1"): ["data=synthetic", "data.task=regression"],
        ("loss", "huber"): ["data=synthetic", "data.task=regression"],
        ("loss", "smooth_l1"): ["data=synthetic", "data.task=regression"],
    }
    return extra.get((group, option), [])


@pytest.mark.parametrize("group,option", [(g, o) for g in
                                          ["model", "data", "optimizer", "scheduler", "regularization",
                                           "precision", "performance", "parallelism", "loss", "trainer", "logging",
                                           "peft"]
                                          for o in _options(g)])
def test_every_option_composes_and_validates(group, option, tmp_path, text_file, csv_classification):
    spec = compose([f"{group}={option}", *_needs(group, option, tmp_path, text_file, csv_classification)])
    node = getattr(spec, group)
    if group in REGISTRIES and option != "custom":
        assert type(node) is REGISTRIES[group].get(option).spec
        assert node.name == option


@pytest.mark.parametrize("recipe", sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
def test_every_recipe_composes(recipe, text_file):
    extra = [f"data.path={text_file}"] if "text" in recipe else []
    spec = compose([f"+recipe={recipe}", *extra])
    header = (RECIPES_DIR / f"{recipe}.yaml").read_text()
    assert "trainctl run +recipe=" + recipe in header, "a recipe's header gives its exact command"
    assert "Result" in header, "a recipe's header states the result it reaches"
    assert spec.data.name in ("digits", "text", "csv", "synthetic")


def test_recipes_exist():
    names = {p.stem for p in RECIPES_DIR.glob("*.yaml")}
    assert {"digits_mlp", "digits_cnn", "text_gpt"} <= names


def test_defaults_are_the_embedded_digits_run():
    spec = compose([])
    assert (spec.model.name, spec.data.name, spec.optimizer.name, spec.scheduler.name) == \
        ("mlp", "digits", "adamw", "warmup_cosine")


def test_override_names_users_expect():
    spec = compose(["data.batch_size=16", "optimizer.lr=0.003", "trainer.max_epochs=2", "trainer.seed=3",
                    "trainer.grad_accum_steps=4", "trainer.eval_every_n_steps=5", "regularization.max_grad_norm=1",
                    "regularization.clip_value=0.5", "regularization.label_smoothing=0.1", "regularization.dropout=0"])
    assert spec.data.batch_size == 16 and spec.optimizer.lr == 0.003
    assert spec.trainer.grad_accum_steps == 4 and spec.regularization.clip_value == 0.5


def _error(overrides, base_dir=".") -> ConfigError:
    with pytest.raises(ConfigError) as info:
        compose(overrides, base_dir)
    return info.value


def test_typo_in_key_suggests_the_closest():
    error = _error(["optimizer.lrr=0.1"])
    assert error.key == "optimizer.lrr"
    assert "'optimizer.lr'" in str(error) and "Did you mean" in str(error)


def test_key_of_another_group_points_there():
    error = _error(["optimizer.weight_decay=0.1"])
    assert "regularization.weight_decay" in str(error)


def test_key_of_another_option_is_refused():
    error = _error(["optimizer=sgd", "optimizer.betas=[0.9,0.99]"])
    assert error.key == "optimizer.betas" and "optimizer=sgd" in str(error)


def test_key_of_another_option_names_the_options_that_have_it():
    error = _error(["optimizer=sgd", "optimizer.betas=[0.9,0.99]"])
    assert "it is a setting of optimizer=adam, adamw" in error.message and error.fix == "set optimizer=adam"
    error = _error(["parallelism=ddp", "parallelism.sharding=hybrid"])
    assert "it is a setting of parallelism=fsdp" in error.message and error.fix == "set parallelism=fsdp"


def test_added_key_on_a_typed_group_is_refused():
    assert _error(["+optimizer.foo=1"]).key == "optimizer.foo"
    assert _error(["+foo=1"]).key == "foo"


def test_unknown_option_lists_the_valid_ones():
    error = _error(["optimizer=adamx"])
    assert error.key == "optimizer" and "Did you mean 'adam'" in str(error)
    assert "schedulefree_adamw" in str(error) and error.fix == "set optimizer=adam"


def test_unknown_recipe_lists_the_recipes():
    error = _error(["+recipe=digit_cnn"])
    assert "digits_cnn" in str(error) and error.fix == "set +recipe=digits_cnn"


@pytest.mark.parametrize("override,key,words", [
    ("optimizer.lr=-1", "optimizer.lr", "must be > 0"),
    ("trainer.max_epochs=abc", "trainer.max_epochs", "could not be converted"),
    ("trainer.max_epochs=0", "trainer.max_epochs", ">= 1"),
    ("data.batch_size=0", "data.batch_size", ">= 1"),
    ("trainer.grad_accum_steps=0", "trainer.grad_accum_steps", ">= 1"),
    ("model.activation=relux", "model.activation", "Did you mean 'relu'"),
    ("regularization.label_smoothing=1.5", "regularization.label_smoothing", "[0, 1)"),
    ("trainer.device=tpu", "trainer.device", "not one of"),
    ("optimizer.betas=[0.9,1.5]", "optimizer.betas", "[0, 1)"),
])
def test_bad_values_name_the_key(override, key, words):
    error = _error([override])
    assert error.key == key and words in str(error) and error.fix


def test_missing_csv_and_missing_column(tmp_path, csv_classification):
    assert "no such file" in str(_error(["data=csv", "data.path=missing.csv", "data.target=y"], str(tmp_path)))
    error = _error(["data=csv", f"data.path={csv_classification}", "data.target=lable"])
    assert error.key == "data.target" and "x1, x2, noise, label" in str(error)
    assert _error(["data=csv", "data.target=y"]).key == "data.path"


def test_relative_paths_resolve_against_the_launch_directory(tmp_path, csv_classification):
    spec = compose(["data=csv", f"data.path={csv_classification.name}", "data.target=label"], str(tmp_path))
    assert spec.data.path == str(csv_classification)


def test_cross_group_checks():
    assert _error(["model=cnn", "data=synthetic"]).fix == "set model=mlp"
    assert "does not fit classification" in str(_error(["loss=mse"]))
    assert _error(["loss=bce", "regularization.label_smoothing=0.1"]).key == "regularization.label_smoothing"
    assert _error(["scheduler=plateau", "scheduler.monitor=val/mse"]).key == "scheduler.monitor"
    assert _error(["trainer.monitor=val/ppl"]).key == "trainer.monitor"
    assert _error(["optimizer=sgd", "optimizer.nesterov=true", "optimizer.momentum=0"]).key == "optimizer.nesterov"
    assert _error(["scheduler.warmup_steps=5"]).key == "scheduler.warmup_steps"  # warmup_fraction is set too


def test_custom_model_target_is_allowlisted():
    error = _error(["model=custom", "model._target_=os.system"])
    assert error.key == "model._target_" and "allowed_target_prefixes=[os.]" in error.fix
    nested = _error(["model=custom", "model._target_=trainctl.models.mlp.MLP",
                     "+model.extra={_target_: subprocess.call}"])
    assert nested.key == "model.extra._target_"


def test_validation_never_imports_torch():
    code = ("import sys; from trainctl.config import compose_spec; "
            "compose_spec(['optimizer=sgd', 'scheduler=onecycle'], '.'); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
