"""`trainctl merge`: the arithmetic against independent computations (the mean, the SLERP formula, peft's
merge functions applied by hand), the greedy soup's guarantee on a real lr sweep, the output that
`trainctl eval` reads, and the refusals."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import build, compose, trainctl
from trainctl.commands.merge import main as merge_main
from trainctl.errors import ConfigError
from trainctl.merging import greedy_soup, slerp, slerp_tensor, weighted_average

QUIET = ["logging.progress=none", "logging.tensorboard=false", "checkpoint=off", "model.width=32",
         "model.dropout=0.0"]
LRS = ("0.0003", "0.001", "0.003", "0.03")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A base run, a 4-job lr sweep fine-tuned from it (laid out as a sweep: SWEEP/0..3), and a run of
    another width."""
    from trainctl.job import train

    root = tmp_path_factory.mktemp("merge")
    train(compose([*QUIET, "trainer.max_epochs=1"]), root / "base", str(root))
    for i, lr in enumerate(LRS):
        train(compose([*QUIET, "trainer.max_epochs=2", f"optimizer.lr={lr}",
                       f"model.init_from={root / 'base'}"]), root / "sweep" / str(i), str(root))
    train(compose([*QUIET, "trainer.max_epochs=1", "model.width=16", "trainer.max_steps=3"]), root / "narrow",
          str(root))
    return root


def merge(root: Path, *args: str) -> dict:
    cwd = os.getcwd()
    os.chdir(root)
    try:
        merge_main([*args, "--json"])
    finally:
        os.chdir(cwd)
    return json.loads((root / args[args.index("-o") + 1] / "merge.json").read_text())


def weights(path: Path) -> dict:
    return load_file(str(path / "model.safetensors"))


def test_greedy_soup_of_a_sweep_is_at_least_its_best_member_and_eval_reads_it(runs, capsys):
    report = merge(runs, "sweep", "--method", "greedy_soup", "-o", "soup")
    assert [Path(i["path"]).name for i in report["inputs"]] == ["0", "1", "2", "3"]  # the sweep, expanded
    best = max(i["metrics"]["val/acc"] for i in report["inputs"])
    assert report["metric"] == "val/acc" and report["merged"]["metrics"]["val/acc"] >= best
    kept = [i for i in report["inputs"] if i["kept"]]
    assert kept and kept[0]["metrics"]["val/acc"] == best and report["kept"][0] == kept[0]["path"]
    # the written weights are the average of the kept inputs
    expected = weighted_average([weights(Path(i["path"])) for i in kept])
    assert all(torch.allclose(weights(runs / "soup")[k], v, atol=1e-7) for k, v in expected.items())
    # `trainctl eval OUT` rebuilds it and gets the merged metrics
    from trainctl.job import evaluate_saved

    again = evaluate_saved(runs / "soup", [], str(runs))["metrics"]
    assert again == pytest.approx(report["merged"]["metrics"], abs=1e-9)
    capsys.readouterr()


def test_greedy_soup_keeps_a_member_only_when_the_soup_does_not_get_worse():
    states = [{"w": torch.tensor([float(v)])} for v in (1.0, 4.0, 2.0, 0.0)]
    scores = [-abs(s["w"].item() - 2.0) for s in states]  # best at w=2
    seen = []

    def evaluate(state, index):
        seen.append(index)
        return -abs(state["w"].item() - 2.0)
    soup, kept, score, _ = greedy_soup(states, scores, evaluate, "max")
    # order by score: w=2 (2), w=1 (0), w=4 (1) [tie with w=0: input order], w=0 (3)
    # {2,1}=1.5 worse; {2,4}=3 worse; {2,0}=1 worse -> the best member alone
    assert seen == [0, 1, 3] and kept == [2] and soup["w"].item() == 2.0 and score == 0.0
    states = [{"w": torch.tensor([v])} for v in (3.0, 0.0, 4.0, 8.0)]
    soup, kept, score, steps = greedy_soup(states, [-abs(s["w"].item() - 2.0) for s in states],
                                           lambda s, i: -abs(s["w"].item() - 2.0), "max")
    # {3,0} = 1.5 better, {3,0,4} = 7/3 better, {3,0,4,8} = 3.75 worse
    assert kept == [0, 1, 2] and soup["w"].item() == pytest.approx(7 / 3) and [s["kept"] for s in steps] == [
        True, True, True, False]
    soup, kept, _, _ = greedy_soup(states, [-s["w"].item() for s in states], lambda s, i: -s["w"].item(), "min")
    assert kept == [3]  # mode min: the largest w scores lowest and leads; every addition makes it larger
    flat = [{"w": torch.tensor([v])} for v in (2.0, 2.5)]  # a tie (like equal accuracy) joins the soup
    assert greedy_soup(flat, [1.0, 1.0], lambda s, i: 1.0, "max")[1] == [0, 1]


def test_uniform_average_is_the_mean_and_integer_tensors_come_from_the_first():
    g = torch.Generator().manual_seed(0)
    states = [{"a": torch.randn(3, 4, generator=g), "n": torch.tensor(i + 5),
               "h": torch.randn(5, generator=g).half()} for i in range(3)]
    merged = weighted_average(states)
    assert torch.allclose(merged["a"], torch.stack([s["a"] for s in states]).mean(0), atol=1e-7)
    assert merged["h"].dtype == torch.float16
    weighted = weighted_average(states, [0.5, 0.3, 0.2])["a"]
    assert torch.allclose(weighted, 0.5 * states[0]["a"] + 0.3 * states[1]["a"] + 0.2 * states[2]["a"], atol=1e-7)
    assert torch.equal(merged["h"], torch.stack([s["h"].float() for s in states]).mean(0).half())
    assert merged["n"].item() == 5 and list(merged) == ["a", "n", "h"]


def test_average_of_runs_from_the_cli_equals_the_mean(runs):
    report = merge(runs, "sweep/0", "sweep/2", "--method", "average", "-o", "avg")
    a, b, out = weights(runs / "sweep" / "0"), weights(runs / "sweep" / "2"), weights(runs / "avg")
    assert all(torch.allclose(out[k], (a[k] + b[k]) / 2, atol=1e-7) for k in a)
    assert report["weights"] == [0.5, 0.5] and "val/acc" in report["merged"]["metrics"]


def test_slerp_gives_the_endpoints_exactly_and_keeps_the_norm_of_orthogonal_vectors(runs):
    g = torch.Generator().manual_seed(1)
    a, b = {"w": torch.randn(7, 3, generator=g)}, {"w": torch.randn(7, 3, generator=g)}
    assert torch.equal(slerp(a, b, 0.0)["w"], a["w"]) and torch.equal(slerp(a, b, 1.0)["w"], b["w"])
    x, y = torch.zeros(6), torch.zeros(6)
    x[0], y[1] = 3.0, 3.0  # orthogonal, norm 3: the midpoint on the circle has norm 3 (lerp: 3/sqrt(2))
    mid = slerp_tensor(x, y, 0.5)
    assert mid.norm().item() == pytest.approx(3.0, rel=1e-6)
    assert torch.allclose(mid[:2], torch.tensor([3 / math.sqrt(2)] * 2))
    t = 0.3  # and elsewhere the formula: sin((1-t)θ)/sinθ x + sin(tθ)/sinθ y, θ = π/2
    assert torch.allclose(slerp_tensor(x, y, t), math.cos(t * math.pi / 2) * x + math.sin(t * math.pi / 2) * y)
    assert torch.allclose(slerp_tensor(x, 2 * x, 0.25), 1.25 * x)  # parallel: linear
    merge(runs, "sweep/1", "sweep/3", "--method", "slerp", "--t", "0", "-o", "slerp0")
    merge(runs, "sweep/1", "sweep/3", "--method", "slerp", "--t", "1", "-o", "slerp1")
    for out, source in (("slerp0", "sweep/1"), ("slerp1", "sweep/3")):
        assert all(torch.equal(v, weights(runs / source)[k]) for k, v in weights(runs / out).items())


@pytest.mark.parametrize("method,function,extra", [
    ("task_arithmetic", "task_arithmetic", ["--weights", "0.7,0.5"]),
    ("ties", "ties", ["--density", "0.3"]),
    ("dare", "dare_linear", ["--density", "0.4", "--seed", "3"]),
])
def test_task_vector_methods_equal_peft_applied_by_hand(runs, method, function, extra):
    from peft.utils import merge_utils

    out = f"tv-{method}"
    report = merge(runs, "sweep/1", "sweep/2", "--method", method, "--scale", "0.8", "-o", out, *extra)
    assert Path(report["base"]) == runs / "base"  # taken from the inputs' model.init_from
    base, a, b = weights(runs / "base"), weights(runs / "sweep" / "1"), weights(runs / "sweep" / "2")
    w = torch.tensor(report["weights"])
    order = list(build(QUIET).model.state_dict())  # DARE draws its masks tensor by tensor in this order
    torch.manual_seed(3)
    merged = weights(runs / out)
    for key in order:
        tasks = [a[key] - base[key], b[key] - base[key]]
        delta = getattr(merge_utils, function)(tasks, w, *([report["density"]] if "density" in report else []))
        assert torch.allclose(merged[key], base[key] + 0.8 * delta, atol=1e-6), key
    if method == "task_arithmetic":
        assert report["weights"] == [0.7, 0.5]
    else:  # not simply the average: pruning changed something
        assert not torch.allclose(merged["head.weight"], (a["head.weight"] + b["head.weight"]) / 2, atol=1e-4)


def refused(root: Path, *args: str) -> ConfigError:
    cwd = os.getcwd()
    os.chdir(root)
    try:
        with pytest.raises(ConfigError) as info:
            merge_main(list(args))
    finally:
        os.chdir(cwd)
    return info.value


def test_refusals(runs, monkeypatch):
    error = refused(runs, "sweep/0", "narrow", "--method", "average", "-o", "x1")
    assert "blocks.0.0.weight" in error.message and "narrow" in error.message and "same model" in error.message
    (runs / "busy").mkdir()
    (runs / "busy" / "file").write_text("x")
    assert "already exists" in refused(runs, "sweep/0", "sweep/1", "--method", "average", "-o", "busy").message
    error = refused(runs, "sweep/0", "sweep/1", "--method", "avrage", "-o", "x2")
    assert error.key == "--method" and error.fix == "pass --method average"
    error = refused(runs, "sweep", "--method", "slerp", "-o", "x3")
    assert error.key == "--method" and "two runs, got 4" in error.message
    assert refused(runs, "sweep/0", "sweep/1", "--method", "slerp", "--t", "1.5", "-o", "x4").key == "--t"
    assert refused(runs, "sweep/0", "--method", "average", "-o", "x5").key == "inputs"
    assert refused(runs, "sweep", "--method", "ties", "--weights", "1,2", "-o", "x6").key == "--weights"
    error = refused(runs, "sweep/0", "sweep/1", "--method", "ties", "-o", "x8", "--base", "narrow")
    assert "the base narrow" in error.message
    monkeypatch.setitem(__import__("sys").modules, "peft", None)  # peft not installed
    error = refused(runs, "sweep/0", "sweep/1", "--method", "ties", "-o", "x7")
    assert error.key == "--method" and "pip install 'trainctl[hf]'" in error.fix
    assert not any((runs / f"x{i}").exists() for i in range(1, 9))


@pytest.mark.slow
def test_cli_merge_then_eval(runs):
    result = trainctl(["merge", "sweep/0", "sweep/1", "--method", "average", "-o", "cli-avg"], runs)
    assert result.returncode == 0, result.stderr
    assert "merged val/acc" in result.stdout and "[3/3] merged" in result.stderr
    result = trainctl(["merge", "sweep/0", "narrow", "--method", "average", "-o", "cli-bad"], runs)
    assert result.returncode == 2 and "Traceback" not in result.stderr and "fix:" in result.stderr
    result = trainctl(["eval", "cli-avg"], runs)
    assert result.returncode == 0 and "val/acc" in result.stdout
