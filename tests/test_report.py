"""`trainctl report`: finding runs, the table (order, differing overrides, best run, failures, runs in
progress), report.md, JSON, and the plots (their lines and cells, and that the PNGs are real images)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from trainctl.cli import main
from trainctl.errors import ConfigError
from trainctl.report import build_report, find_runs, markdown, table_cells, write_report
from trainctl.runs import RunRecord, objective_value

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_run(path: Path, overrides: list[str], vals: list[float] | None, losses: list[float] | None = None,
             status: str = "done", optimized_metric: str = "auto", **summary) -> Path:
    """A run directory as `trainctl run -m` leaves it: .hydra/, metrics.jsonl, summary.json."""
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (path / ".hydra" / "config.yaml").write_text(f"optimized_metric: {optimized_metric}\n")
    records = []
    for i, loss in enumerate(losses or []):
        records.append({"step": 10 * (i + 1), "epoch": i, "train/loss": loss, "lr": 0.01 / (i + 1),
                        "train/samples_per_second": 1000.0 + i})
    for i, val in enumerate(vals or []):
        records.append({"step": 10 * (i + 1), "epoch": i + 1, "val/acc": val, "val/loss": 1 - val})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if status == "done" and vals:
        summary = {"stop_reason": "completed", "best_metric": max(vals), "steps": 10 * len(vals),
                   "final": {"val/acc": vals[-1], "val/loss": 1 - vals[-1], "train/loss": (losses or [None])[-1]},
                   "wall_seconds": 3.5, "samples_per_second": 1234.5, **summary}
    summary = {"status": status, "monitor": "val/acc", "mode": "max", **summary}
    (path / "summary.json").write_text(json.dumps(summary))
    return path


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """A 2x2 sweep over lr and weight decay: job 2 is best, job 3 failed, all share max_epochs."""
    root = tmp_path / "multirun" / "2026-01-01" / "12-00-00"
    common = ["trainer.max_epochs=3"]
    make_run(root / "0", ["optimizer.lr=0.001", "regularization.weight_decay=0.0", *common], [0.80, 0.85, 0.84],
             [2.0, 1.0, 0.8])
    make_run(root / "1", ["optimizer.lr=0.001", "regularization.weight_decay=0.1", *common], [0.70, 0.75, 0.79],
             [2.1, 1.2, 0.9])
    make_run(root / "2", ["optimizer.lr=0.01", "regularization.weight_decay=0.0", *common], [0.90, 0.95, 0.93],
             [1.5, 0.5, 0.3])
    make_run(root / "3", ["optimizer.lr=0.01", "regularization.weight_decay=0.1", *common], None, status="failed",
             stop_reason="config_error", error="model: model=cnn needs image inputs\n  fix: set model=mlp")
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root


def test_the_table_lists_every_run_best_first_with_what_differs(sweep):
    report = build_report(find_runs([str(sweep)]))
    assert [report.names[r.path] for r in report.runs] == ["2", "0", "1", "3"]
    assert report.best is report.runs[0] and report.label == "best val/acc" and report.mode == "max"
    assert report.varying == ["optimizer.lr", "regularization.weight_decay"]
    assert report.common == {"trainer.max_epochs": "3"}
    best, _, _, failed = (table_cells(report, r) for r in report.runs)
    assert best[:4] == ["★ 2", "0.01", "0.0", "0.9500"] and best[4] == "0.9300", "best, then final val/acc"
    assert best[5] == "0.3000" and best[6] == "30" and best[-1] == "completed"
    assert failed[:3] == ["3", "0.01", "0.1"] and failed[3] == "—"
    assert failed[-1] == "config_error: model: model=cnn needs image inputs; fix: set model=mlp"


def test_sorting_follows_the_optimized_metric_and_its_direction(sweep):
    report = build_report(find_runs([str(sweep)]), metric="final:val/acc")
    assert [report.names[r.path] for r in report.runs] == ["2", "0", "1", "3"] and report.label == "final val/acc"
    report = build_report(find_runs([str(sweep)]), metric="val/loss")
    assert report.mode == "min" and report.names[report.best.path] == "2"
    assert report.value(report.best) == pytest.approx(0.05)
    report = build_report(find_runs([str(sweep)]), metric="final:train/loss")
    assert [report.names[r.path] for r in report.runs][:3] == ["2", "0", "1"]


def test_the_runs_optimized_metric_is_read_from_hydras_record(tmp_path):
    make_run(tmp_path / "a", ["optimizer.lr=1"], [0.9, 0.5], optimized_metric="final:val/acc")
    make_run(tmp_path / "b", ["optimizer.lr=2"], [0.6, 0.7], optimized_metric="final:val/acc")
    report = build_report(find_runs([str(tmp_path)]))
    assert report.optimized_metric == "final:val/acc" and report.names[report.best.path] == "b"


def test_json_output_and_report_md(sweep, capsys):
    main(["report", str(sweep), "--format", "json", "--no-plots"])
    data = json.loads(capsys.readouterr().out)
    assert data["best_run"] == "2" and data["varying"] == ["optimizer.lr", "regularization.weight_decay"]
    rows = {row["run"]: row for row in data["runs"]}
    assert set(rows) == {"0", "1", "2", "3"}
    assert rows["1"]["varying"] == {"optimizer.lr": "0.001", "regularization.weight_decay": "0.1"}
    assert rows["2"]["best"] == 0.95 and rows["2"]["final"] == 0.93 and rows["2"]["best_run"]
    assert rows["3"]["status"] == "failed" and rows["3"]["objective"] is None and "needs image" in rows["3"]["reason"]
    md = (sweep / "report.md").read_text()
    assert data["files"] == {"report.md": str(sweep / "report.md")}
    table = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    assert len(table) == 5 and table[1].startswith("| **★ 2** | **0.01** | **0.0** |")
    assert "| 3 | 0.01 | 0.1 |" in md and "config_error: model: model=cnn needs image inputs" in md


def test_the_rich_table_shows_every_run_and_the_failure(sweep, capsys):
    main(["report", str(sweep), "--no-plots"])
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith((" ★", " 0 ", " 1 ", " 2 ", " 3 "))]
    assert [line.split()[:3] for line in lines] == [["★", "2", "0.01"], ["0", "0.001", "0.0"], ["1", "0.001", "0.1"],
                                                    ["3", "0.01", "0.1"]]
    assert lines[0].split()[3:6] == ["0.0", "0.9500", "0.9300"] and lines[3].split()[-1] == "config_error"
    assert "best: 2 (best val/acc 0.9500): optimizer.lr=0.01 regularization.weight_decay=0.0" in out
    assert "3 config_error: model: model=cnn needs image inputs" in out
    assert "common: trainer.max_epochs=3" in out


def test_several_directories_and_globs(sweep, capsys):
    dirs = find_runs([str(sweep / "0"), str(sweep / "2")])
    assert [d.name for d in dirs] == ["0", "2"]
    assert [d.name for d in find_runs([str(sweep / "[01]")])] == ["0", "1"]
    assert len(find_runs([str(sweep.parent.parent / "*" / "*")])) == 4
    with pytest.raises(ConfigError, match="no such file"):
        find_runs([str(sweep / "nope")])
    (sweep.parent / "empty").mkdir()
    with pytest.raises(ConfigError, match="no run directories"):
        find_runs([str(sweep.parent / "empty")])


def test_a_bad_path_exits_2(tmp_path):
    out = subprocess.run([sys.executable, "-m", "trainctl", "report", str(tmp_path / "missing")],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "no such file or directory" in out.stderr and "Traceback" not in out.stderr


def test_a_run_in_progress_is_read_from_its_metrics(tmp_path, capsys):
    run = make_run(tmp_path / "run", [], [0.5, 0.7, 0.6], [2.0, 1.0], status="running", steps=0, best_metric=None)
    record = RunRecord.load(run)
    assert record.status == "running" and record.steps == 30 and record.best() == 0.7
    assert record.final("val/acc") == 0.6 and record.final("train/loss") == 1.0
    main(["report", str(run), "--no-plots"])
    out = capsys.readouterr().out
    assert "running (step 30)" in out and "best val/acc" in out and "0.7000" in out
    assert (run / "report.md").is_file() and "running (step 30)" in (run / "report.md").read_text()


def test_objective_values_and_failed_runs(sweep):
    assert objective_value(sweep / "2", "auto") == 0.95
    assert objective_value(sweep / "2", "val/loss") == pytest.approx(0.05)
    assert objective_value(sweep / "2", "final:val/acc") == 0.93
    assert math.isnan(objective_value(sweep / "3", "auto")), "a failed job is NaN to the sweeper"


def test_optuna_results_name_the_best_run(sweep):
    (sweep / "optimization_results.yaml").write_text(
        "name: optuna\nbest_params:\n  optimizer.lr: 0.01\n  regularization.weight_decay: 0.0\nbest_value: 0.95\n")
    report = build_report(find_runs([str(sweep)]))
    assert report.optuna["best_params"] == {"optimizer.lr": 0.01, "regularization.weight_decay": 0.0}
    assert report.optuna["best_run"] == "2"
    assert "optuna best trial: 0.95 with optimizer.lr=0.01 regularization.weight_decay=0.0 (run 2)" in markdown(
        report, {}, None)


# --- plots ---------------------------------------------------------------------------------------------

def test_curves_lr_and_heatmap_figures(sweep):
    from trainctl import plots

    report = build_report(find_runs([str(sweep)]))
    val_ax, loss_ax = plots.curves_figure(report).axes
    assert len(val_ax.get_lines()) == 3, "one line per run with data"
    assert len(loss_ax.get_lines()) == 6, "val/loss (solid) and train/loss (dashed) of each run"
    best_line = val_ax.get_lines()[0]
    assert list(best_line.get_ydata()) == [0.90, 0.95, 0.93] and best_line.get_linewidth() > 2
    assert len(plots.lr_figure(report).axes[0].get_lines()) == 3
    heatmap = plots.heatmap_figure(report)
    image = heatmap.axes[0].images[0].get_array()
    assert image.shape == (2, 2)  # rows: weight decay 0.0, 0.1; columns: lr 0.001, 0.01
    assert image[0, 0] == 0.85 and image[1, 0] == 0.79 and image[0, 1] == 0.95
    assert bool(image.mask[1, 1]) or math.isnan(image.data[1, 1]), "the failed run's cell is empty"
    assert "failed" in [t.get_text() for t in heatmap.axes[0].texts]


def test_no_heatmap_without_two_numeric_axes_and_a_scatter_for_sampled_values(tmp_path):
    from trainctl import plots

    make_run(tmp_path / "0", ["optimizer=adamw", "optimizer.lr=0.001"], [0.8])
    make_run(tmp_path / "1", ["optimizer=sgd", "optimizer.lr=0.01"], [0.9])
    assert plots.heatmap_figure(build_report(find_runs([str(tmp_path)]))) is None
    make_run(tmp_path / "2", ["optimizer=sgd", "optimizer.lr=0.02", "regularization.weight_decay=0.01"], [0.7])
    for i, (lr, wd) in enumerate([(0.001, 0.05), (0.01, 0.07)]):
        (tmp_path / str(i) / ".hydra" / "overrides.yaml").write_text(
            f"- optimizer=x\n- optimizer.lr={lr}\n- regularization.weight_decay={wd}\n")
    fig = plots.heatmap_figure(build_report(find_runs([str(tmp_path)])))
    assert not fig.axes[0].images and len(fig.axes[0].collections[0].get_offsets()) == 3


def test_the_pngs_are_real_images(sweep):
    from PIL import Image

    report = build_report(find_runs([str(sweep)]))
    files, note = write_report(report, sweep)
    assert note is None and set(files) == {"report.md", "curves.png", "lr.png", "heatmap.png"}
    for name in ("curves.png", "lr.png", "heatmap.png"):
        data = (sweep / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5000
        with Image.open(sweep / name) as image:
            assert image.width > 400 and image.height > 300
            assert len(image.convert("L").getcolors(maxcolors=100000)) > 20, "more than a blank canvas"
    assert "![curves.png](curves.png)" in (sweep / "report.md").read_text()


def test_without_matplotlib_the_table_and_report_md_still_come(sweep):
    code = ("import sys; sys.modules['matplotlib'] = None; "  # `import matplotlib` now raises ImportError
            "from trainctl.cli import main; main(['report', sys.argv[1]])")
    run = subprocess.run([sys.executable, "-c", code, str(sweep)], capture_output=True, text=True)
    out = run.stdout
    assert run.returncode == 0, run.stderr
    assert "★ 2" in out and 'plots skipped: matplotlib is not installed (pip install "trainctl[report]")' in out
    assert (sweep / "report.md").is_file() and not (sweep / "curves.png").exists()
    assert "plots skipped" in (sweep / "report.md").read_text()


def test_report_does_not_import_torch_or_hydra(sweep):
    code = ("import sys; from trainctl.cli import main; main(['report', sys.argv[1], '--no-plots']); "
            "print('torch' in sys.modules, 'hydra' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(sweep)], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False False"


def test_the_report_goes_where_it_is_asked(sweep, tmp_path, capsys):
    main(["report", str(sweep / "0"), str(sweep / "2"), "-o", str(tmp_path / "out"), "--no-plots"])
    assert "★ 2" in capsys.readouterr().out
    md = (tmp_path / "out" / "report.md").read_text()
    assert "2 runs in" in md and not (sweep / "report.md").exists()
