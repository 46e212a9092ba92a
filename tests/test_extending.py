"""The seams: callbacks (hooks, state in checkpoints, `callbacks=[lr_monitor]`), batch transforms with
soft targets (`transforms=[noise]`), optimizer-step wrappers (a gradient rescale, a second pass), the
table of config groups, and the shape of the package (no import cycles, no run state in module globals,
modules of a readable size)."""

from __future__ import annotations

import ast
import copy
import json
from typing import Dict, List

import pytest
import torch

from conftest import REPO, build, compose, stop_then_resume
from trainctl.batches import windows_of
from trainctl.callbacks import HOOKS, Callback
from trainctl.errors import ConfigError
from trainctl.runner import Runner

QUIET = ["logging.progress=none", "logging.tensorboard=false"]
EXACT = [*QUIET, "model.dropout=0", "trainer.eval_every_n_epochs=null"]


# --- callbacks ------------------------------------------------------------------------------------------

class Recorder(Callback):
    name = "recorder"

    def __init__(self) -> None:
        self.calls: List[str] = []
        self.grad_seen: List[bool] = []
        self.count = 0

    def on_fit_start(self, run, state):
        self.calls.append("fit_start")

    def on_step_start(self, run, state):
        self.calls.append(f"step_start {state.step}")

    def on_before_optimizer_step(self, run, state):
        self.grad_seen.append(all(p.grad is not None for p in run.clipper.params))
        self.calls.append(f"before_step {state.step}")

    def on_step_end(self, run, state):
        self.count += 1
        self.calls.append(f"step_end {state.step}")

    def on_log(self, run, state):
        return {"recorder/count": float(self.count)}

    def on_eval_start(self, run, state):
        self.calls.append(f"eval_start {state.step}")

    def on_eval_end(self, run, state, metrics):
        self.calls.append(f"eval_end {state.step} {sorted(metrics)}")

    def on_fit_end(self, run, state):
        self.calls.append("fit_end")

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, state):
        self.count = state["count"]


def test_every_hook_is_called_where_it_says(tmp_path):
    from trainctl.metrics import MetricsWriter

    run = build([*QUIET, "trainer.max_steps=4", "trainer.max_epochs=null", "trainer.eval_every_n_steps=2",
                 "logging.log_every_n_steps=2"])
    recorder = Recorder()
    run.callbacks.append(recorder)
    Runner(run, writer=MetricsWriter(tmp_path, tensorboard=False)).fit()
    assert recorder.calls == [
        "fit_start",
        "step_start 0", "before_step 0", "step_end 1",
        "step_start 1", "before_step 1", "step_end 2", "eval_start 2", "eval_end 2 ['val/acc', 'val/f1', 'val/loss']",
        "step_start 2", "before_step 2", "step_end 3",
        "step_start 3", "before_step 3", "step_end 4", "eval_start 4", "eval_end 4 ['val/acc', 'val/f1', 'val/loss']",
        "fit_end"]
    assert all(recorder.grad_seen), "the gradients of the step are there before the optimizer steps"
    logged = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["recorder/count"] for r in logged if "recorder/count" in r] == [2.0, 4.0]


def test_an_unused_hook_costs_nothing_per_step():
    runner = Runner(build(QUIET))
    assert all(runner.hooks[hook] == [] for hook in HOOKS), "no callback, no calls"
    early = Runner(build([*QUIET, "early_stopping.patience=3"]))
    assert [hook for hook in HOOKS if early.hooks[hook]] == ["on_eval_end", "on_fit_end"]


class SwapForEval(Callback):
    """Swaps other weights in for evaluation and back, as an EMA callback would."""

    name = "swap"

    def on_eval_start(self, run, state):
        self.kept = copy.deepcopy(run.model.state_dict())
        with torch.no_grad():
            for p in run.model.parameters():
                p.zero_()

    def on_eval_end(self, run, state, metrics):
        run.model.load_state_dict(self.kept)


def test_weights_swapped_in_for_evaluation_do_not_touch_training():
    base = [*EXACT, "trainer.max_steps=6", "trainer.max_epochs=null", "trainer.eval_every_n_steps=3"]
    plain, swapped = build(base), build(base)
    swapped.callbacks.append(SwapForEval())
    first = Runner(plain).fit()
    second = Runner(swapped).fit()
    for a, b in zip(plain.model.parameters(), swapped.model.parameters()):
        assert torch.equal(a, b), "training went on with its own weights"
    assert second["final"]["val/acc"] == pytest.approx(0.1, abs=0.05) != first["final"]["val/acc"], \
        "the evaluation saw the swapped-in (all-zero) weights"


def test_a_callbacks_state_resumes_with_the_run(tmp_path, monkeypatch):
    from trainctl import build as build_module
    from trainctl.job import train

    made: List[Recorder] = []

    def with_recorder(spec, task, monitors):
        made.append(Recorder())
        return [made[-1]]
    monkeypatch.setattr(build_module, "_callbacks", with_recorder)
    original = Runner.train_step

    def interrupted_at_5(self, window):
        original(self, window)
        if self.state.step == 5 and len(made) == 1:
            self.state.request_stop("interrupted")
    monkeypatch.setattr(Runner, "train_step", interrupted_at_5)
    args = [*QUIET, "trainer.max_steps=9", "trainer.max_epochs=null", "checkpoint.every_n_steps=1"]
    assert train(compose(args), tmp_path / "run", str(tmp_path))["steps"] == 5
    assert train(compose([*args, "checkpoint.resume=auto"]), tmp_path / "run", str(tmp_path))["steps"] == 9
    assert made[1].count == 9, "the resumed callback continued from its saved state"


def test_lr_monitor_logs_every_groups_lr_and_the_gradient_norm(tmp_path):
    from trainctl.job import train

    args = [*QUIET, "trainer.max_steps=6", "trainer.max_epochs=null", "logging.log_every_n_steps=1", "checkpoint=off",
            "+optimizer.lr_multipliers={head.*: 10}"]
    monitored = train(compose([*args, "callbacks=[lr_monitor]"]), tmp_path / "monitored", str(tmp_path))
    clipping = train(compose([*args, "regularization.max_grad_norm=1e9"]), tmp_path / "clipping", str(tmp_path))
    assert monitored["final"]["train/loss"] == clipping["final"]["train/loss"], "the callback changes nothing"

    def records(name: str) -> List[Dict]:
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if "train/loss" in r]
    for mine, theirs in zip(records("monitored"), records("clipping")):
        assert mine["lr/0"] == mine["lr"] and len([k for k in mine if k.startswith("lr/")]) == 4
        assert sorted({round(mine[f"lr/{i}"] / mine["lr"], 9) for i in range(4)}) == [1.0, 10.0]
        # the norm a clipper computes before clipping (by a threshold that never bites) is the same number
        assert mine["train/grad_norm"] == pytest.approx(theirs["train/grad_norm"], rel=1e-6)


def test_a_callback_option_needs_its_option_file():
    assert type(compose(["callbacks=[lr_monitor]"]).callbacks["lr_monitor"]).__name__ == "LRMonitorSpec"
    with pytest.raises(ConfigError, match="unknown option 'lr_monitr'"):
        compose(["callbacks=[lr_monitr]"])
    with pytest.raises(ConfigError) as error:
        compose(["callbacks=[lr_monitor]", "callbacks.lr_monitor.grad_nrm=false"])
    assert error.value.key == "callbacks.lr_monitor.grad_nrm"


# --- batch transforms and soft targets ---------------------------------------------------------------------

def test_soft_targets_give_the_loss_of_the_hard_ones():
    from trainctl.data import DataInfo
    from trainctl.loss import BCESpec, CrossEntropySpec, build_loss

    info = DataInfo("classification", (4,), num_classes=3)
    outputs, hard = torch.randn(8, 3), torch.randint(0, 3, (8,))
    soft = torch.nn.functional.one_hot(hard, 3).float()
    for spec in (CrossEntropySpec(), BCESpec()):
        loss = build_loss(spec, info, 0.0)[0]
        assert loss.count(soft) == loss.count(hard)
        torch.testing.assert_close(loss(outputs, soft), loss(outputs, hard))
    lm = build_loss(CrossEntropySpec(), DataInfo("lm", (5,), vocab_size=7), 0.0)[0]
    tokens = torch.randint(0, 7, (2, 5))
    assert lm.count(torch.nn.functional.one_hot(tokens, 7).float()) == lm.count(tokens) == 10


def test_soft_targets_accumulate_like_one_big_batch():
    """A transform that returns class probabilities trains through accumulation exactly as hard labels."""
    from trainctl.transforms import Transform

    class Soften(Transform):
        name = "soften"

        def __call__(self, x, y):
            return x, torch.nn.functional.one_hot(y, 10).float() * 0.9 + 0.01

    def trained(overrides: List[str]) -> Dict[str, torch.Tensor]:
        run = build([*EXACT, "optimizer=sgd", "trainer.max_epochs=1", *overrides])
        run.transforms.append(Soften())
        Runner(run).fit()
        return run.model.state_dict()
    accumulated = trained(["data.batch_size=25", "trainer.grad_accum_steps=4"])
    big = trained(["data.batch_size=100"])
    for key in big:
        torch.testing.assert_close(accumulated[key], big[key], rtol=1e-4, atol=1e-5)


def test_noise_and_token_dropout_do_what_they_say():
    from trainctl.transforms import Noise, TokenDropout

    torch.manual_seed(0)
    x, y = torch.zeros(2000, 8), torch.arange(2000)
    noisy, same_y = Noise(0.1, 1.0)(x, y)
    assert same_y is y and abs(noisy.std().item() - 0.1) < 0.005 and abs(noisy.mean().item()) < 0.005
    half, _ = Noise(0.1, 0.5)(x, y)
    untouched = (half == 0).all(dim=1).float().mean().item()
    assert 0.45 < untouched < 0.55, "p is the share of samples that get noise"
    tokens = torch.randint(0, 50, (64, 128))
    dropped, targets = TokenDropout(0.2, 50)(tokens, tokens + 1)
    assert torch.equal(targets, tokens + 1) and 0 <= dropped.min() and dropped.max() < 50
    changed = (dropped != tokens).float().mean().item()
    assert 0.2 * 0.96 - 0.02 < changed < 0.2 + 0.02  # a replacement can draw the same token (1 in 50)


def test_a_transform_changes_training_only_and_resumes_exactly(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from trainctl.job import train
    from trainctl.transforms import Noise

    calls = {"n": 0}
    original = Noise.__call__

    def counted(self, x, y):
        calls["n"] += 1
        return original(self, x, y)
    monkeypatch.setattr(Noise, "__call__", counted)
    common = [*QUIET, "trainer.max_steps=10", "trainer.max_epochs=null", "trainer.eval_every_n_steps=5",
              "checkpoint.every_n_steps=1", "trainer.grad_accum_steps=2"]
    args = [*common, "transforms=[noise]", "transforms.noise.std=0.3"]
    train(compose(args), tmp_path / "reference", str(tmp_path))
    assert calls["n"] == 20, "once per training micro-batch, never in evaluation"
    train(compose(common), tmp_path / "plain", str(tmp_path))
    a, b = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("reference", "plain"))
    assert any(not torch.equal(a[k], b[k]) for k in a), "the noise reached the training batches"

    stop_then_resume(monkeypatch, args, tmp_path / "run", str(tmp_path), 6)
    a, b = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("reference", "run"))
    assert all(torch.equal(a[k], b[k]) for k in a), "the noise drawn after a resume is the noise of the whole run"


def test_a_transform_for_another_task_is_refused():
    with pytest.raises(ConfigError, match="applies to lm data, not classification") as error:
        compose(["transforms=[token_dropout]"])
    assert error.value.key == "transforms.token_dropout"


# --- optimizer-step wrappers ---------------------------------------------------------------------------------

def _with_wrapper(monkeypatch, wrapper) -> None:
    from trainctl import steps

    registry = steps.Registry("step wrapper")
    registry.add(wrapper.name, steps.StepWrapperEntry(lambda spec: wrapper))
    monkeypatch.setattr(steps, "STEP_WRAPPERS", registry)


def test_a_wrapper_rescaling_gradients_acts_on_every_step(monkeypatch):
    from trainctl.steps import StepWrapper

    class Halve(StepWrapper):
        name = "halve"

        def before_step(self, params, recompute):
            for p in params:
                p.grad.mul_(0.5)

    args = [*EXACT, "optimizer=sgd", "optimizer.momentum=0", "regularization.weight_decay=0", "trainer.max_steps=8",
            "trainer.max_epochs=null", "scheduler=constant", "trainer.grad_accum_steps=2"]
    half_lr = build([*args, "optimizer.lr=0.025"])
    Runner(half_lr).fit()
    _with_wrapper(monkeypatch, Halve())
    halved = build([*args, "optimizer.lr=0.05"])
    assert [w.name for w in halved.step_wrappers] == ["halve"]
    Runner(halved).fit()
    for a, b in zip(halved.model.parameters(), half_lr.model.parameters()):
        assert torch.equal(a, b), "halving every gradient is halving the learning rate (0.5 is exact)"


class SecondPass:
    """Sharpness-aware minimisation's step: gradients taken again at w + rho * g / |g|."""

    name, recomputes, rho = "second_pass", True, 0.05

    def before_step(self, params, recompute):
        with torch.no_grad():
            norm = torch.sqrt(sum((p.grad ** 2).sum() for p in params))
            shifts = [self.rho * p.grad / norm for p in params]
            for p, e in zip(params, shifts):
                p.add_(e)
        recompute()
        with torch.no_grad():
            for p, e in zip(params, shifts):
                p.sub_(e)


def test_a_wrapper_can_take_a_second_pass_over_the_whole_window(monkeypatch):
    _with_wrapper(monkeypatch, SecondPass())
    run = build([*EXACT, "optimizer=sgd", "optimizer.momentum=0", "regularization.weight_decay=0",
                 "scheduler=constant", "optimizer.lr=0.1", "data.batch_size=16", "trainer.grad_accum_steps=3"])
    window = next(windows_of(run.data.train.epoch(0), 3))
    reference = copy.deepcopy(run.model)
    x, y = torch.cat([b[0] for b in window]), torch.cat([b[1] for b in window])

    def grads(model):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        return [p.grad.clone() for p in model.parameters()]
    first = grads(reference)
    norm = torch.sqrt(sum((g ** 2).sum() for g in first))
    with torch.no_grad():
        for p, g in zip(reference.parameters(), first):
            p.add_(0.05 * g / norm)
    second = grads(reference)
    expected = [p0 - 0.1 * g for p0, g in zip(copy.deepcopy(run.model).parameters(), second)]
    Runner(run).train_step(window)
    for got, want in zip(run.model.parameters(), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_wrapper_taking_a_second_pass_is_refused_under_the_loss_scaler(monkeypatch):
    _with_wrapper(monkeypatch, SecondPass())
    with pytest.raises(ConfigError, match="second forward/backward pass") as error:
        build([*QUIET, "precision=fp16"])
    assert error.value.fix == "set precision=bf16 (or fp32)"


# --- one table of groups; the package's shape -----------------------------------------------------------

def test_the_table_of_groups_is_the_run_spec():
    import dataclasses

    from trainctl.groups import GROUPS
    from trainctl.spec import RunSpec

    fields = [f.name for f in dataclasses.fields(RunSpec)]
    assert fields == [*GROUPS, "allowed_target_prefixes"]
    for group in GROUPS.values():
        assert (REPO / "conf" / group.name).is_dir(), group.name
        if group.options is not None and group.name != "model":
            assert set(group.options.names()) == set(group.option_names()), f"{group.name}: a YAML per option"


def _imports() -> Dict[str, set]:
    """trainctl module -> the trainctl modules it imports (anywhere in the file, lazily or not; imports
    for type checking only are not imports)."""
    graph: Dict[str, set] = {}
    for path in sorted((REPO / "trainctl").rglob("*.py")):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts).replace(".__init__", "")
        tree = ast.parse(path.read_text())
        typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                       and getattr(block.test, "id", "") == "TYPE_CHECKING" for n in ast.walk(block)}
        found = set()
        for node in (n for n in ast.walk(tree) if id(n) not in typing_only):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("trainctl"):
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("trainctl"))
        graph[module] = found
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def test_no_import_cycles():
    graph = _imports()
    state: Dict[str, int] = {}

    def visit(module: str, path: List[str]) -> None:
        state[module] = 1
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, path + [dep])
        state[module] = 2
    for module in graph:
        if module not in state:
            visit(module, [module])


def test_commands_come_first_and_the_runner_never_reaches_back():
    graph = _imports()
    assert all(not any(d.startswith("trainctl.commands") for d in deps) for m, deps in graph.items()
               if not m.startswith("trainctl.commands") and m != "trainctl.cli"), "only the CLI imports commands"
    upstream = {"trainctl.launch", "trainctl.config", "trainctl.preflight", "trainctl.job", "trainctl.build",
                "trainctl.sweep"}
    assert not graph["trainctl.runner"] & upstream, graph["trainctl.runner"] & upstream


def test_no_module_level_state_and_modules_of_a_readable_size():
    allowed = {("trainctl.rundir", "_HELD")}  # mirrors the locks the kernel holds for this process
    for path in sorted((REPO / "trainctl").rglob("*.py")):
        text = path.read_text()
        assert len(text.splitlines()) <= 420, f"{path.name} has {len(text.splitlines())} lines"
        module = ".".join(path.relative_to(REPO).with_suffix("").parts)
        for node in ast.parse(text).body:
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, (ast.Dict, ast.List, ast.Set)):
                empty = not getattr(node.value, "keys", None) and not getattr(node.value, "elts", None)
                names = [t.id for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
                         if isinstance(t, ast.Name)]
                for name in names:
                    assert not empty or (module, name) in allowed, f"{module}.{name}: run state in a module global"
