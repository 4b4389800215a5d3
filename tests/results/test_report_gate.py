"""Reports from a fixture store, and the regression gate's verdicts and exit codes."""

import json
import shutil
import subprocess

import numpy as np
import pytest
from click.testing import CliRunner

from streambench.cli.app import cli
from streambench.results.store import Store


@pytest.fixture(scope="module")
def fixture_store(tmp_path_factory, tiny_model_dir, small_text):
    """Perplexity at two budgets plus RPS and grocery runs of a tiny model, in one store."""
    root = tmp_path_factory.mktemp("fixture")
    runner = CliRunner()
    for budget in ("8", "16"):
        result = runner.invoke(
            cli,
            [
                "run",
                "-q",
                "--model",
                str(tiny_model_dir),
                "--policy",
                "dense,window,streamingllm",
                "--budget",
                budget,
                "--text",
                str(small_text),
                "--tokens",
                "48",
                "--out",
                str(root / "json"),
            ],
        )
        assert result.exit_code == 0, result.output
    for task, extra in (("rps", ["--limit", "6", "--player", "rock"]), ("grocery", ["--limit", "1"])):
        result = runner.invoke(
            cli,
            [
                "run",
                "-q",
                "--model",
                str(tiny_model_dir),
                "--task",
                task,
                *extra,
                "--policy",
                "streamingllm",
                "--budget",
                "400",
                "--out",
                str(root / "json"),
            ],
        )
        assert result.exit_code == 0, result.output
    for budget in ("25%", "50%"):  # a needle grid at two ratio budgets: heatmaps, cache maps, a Pareto plot
        result = runner.invoke(
            cli,
            [
                "run",
                "-q",
                "--model",
                str(tiny_model_dir),
                "--task",
                "needle",
                "--text",
                str(small_text),
                "-t",
                "lengths=128,160",
                "-t",
                "depths=0,100",
                "-t",
                "answer_tokens=2",
                "--policy",
                "dense,streamingllm,sirllm",
                "--budget",
                budget,
                "--out",
                str(root / "json"),
            ],
        )
        assert result.exit_code == 0, result.output
    store = root / "store.sqlite"
    with Store(store) as s:
        s.import_dir(root / "json")
    return store


def run_ids(store):
    with Store(store) as s:
        return [r["run_id"] for r in s.rows()]


def test_report_contains_every_run_tables_and_plots(fixture_store, tmp_path):
    out = tmp_path / "report"
    result = CliRunner().invoke(cli, ["report", "--store", str(fixture_store), "--out", str(out)])
    assert result.exit_code == 0, result.output
    md = (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    ids = run_ids(fixture_store)
    assert (
        len(ids) == 12
    )  # perplexity: dense once (budget-free) + 2 policies x 2 budgets; rps; grocery; needle: 1 + 2 x 2
    for run_id in ids:
        assert run_id in md and run_id in page
    for heading in ("## perplexity on", "## rps on", "## grocery on", "## needle on"):
        assert heading in md
    assert "40 (25%)" in md and "80 (50%)" in md  # ratio budgets resolved against the longest haystack (160)
    assert "**" in md and "<b>" in page  # best values marked
    plots = {p.name for p in out.glob("*.png")}
    assert {
        "perplexity_ppl_over_stream_b8.png",
        "perplexity_ppl_over_stream_b16.png",
        "perplexity_kv_over_stream.png",
        "perplexity_tokens_per_s_vs_budget.png",
        "perplexity_pareto_ppl_vs_kv.png",
        "rps_rps_rolling_win_rate.png",
        "rps_cache_map_b400.png",
        "grocery_cache_map_b400.png",
        "grocery_retention_b400.png",
        "needle_needle_heatmap_b40.png",
        "needle_needle_heatmap_b80.png",
        "needle_cache_map_b40.png",
        "needle_pareto_exact_match_vs_kv.png",
    } <= plots
    from streambench.results.report import comparable

    with Store(fixture_store) as s:
        results = list(s.results())
    for grp in comparable(results):  # every run of a plotted kind has the data its plot draws
        for r in grp["rows"]:
            curves = r["curves"]
            if grp["task"] == "needle":
                assert np.asarray(curves["needle_grid"]["match"]).shape == (2, 2) and curves["cache_map"]["columns"]
            if grp["task"] in ("grocery", "rps"):
                assert curves["retention_by_turns"]["value"] and curves["cache_map"]["columns"]
    assert all((out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots)
    assert page.count('src="data:image/png;base64,') == len(plots)  # self-contained
    assert "http://" not in page and "https://" not in page


def test_report_filters_and_bad_input(fixture_store, tmp_path):
    runner = CliRunner()
    result = runner.invoke(
        cli, ["report", "--store", str(fixture_store), "--filter", "task=rps", "--out", str(tmp_path / "r")]
    )
    assert result.exit_code == 0
    assert "## perplexity" not in (tmp_path / "r" / "report.md").read_text()
    assert runner.invoke(cli, ["report", "--store", str(fixture_store), "--filter", "colour=red"]).exit_code == 2
    assert (
        "no results match"
        in runner.invoke(cli, ["report", "--store", str(fixture_store), "--filter", "task=nope"]).output
    )


@pytest.mark.skipif(
    not (shutil.which("chromium") or shutil.which("chromium-browser")),
    reason="headless Chromium not installed (Debian package 'chromium'); the HTML is not rendered",
)
def test_report_html_renders_in_headless_chromium(fixture_store, tmp_path):
    out = tmp_path / "report"
    CliRunner().invoke(cli, ["report", "--store", str(fixture_store), "--out", str(out)])
    shot = tmp_path / "shot.png"
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}",
            "--window-size=1200,3000",
            (out / "report.html").as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    from PIL import Image

    image = Image.open(shot).convert("L")
    colours = sum(1 for count in image.histogram() if count)
    assert image.size == (1200, 3000) and colours > 50  # tables and plots drawn, not a blank page


def gate(*args):
    return CliRunner().invoke(cli, ["gate", *map(str, args)])


def test_gate_passes_on_its_own_baseline_and_fails_on_a_regression(fixture_store, tmp_path):
    baseline = tmp_path / "baseline.json"
    assert gate("--baseline", baseline, "--store", fixture_store, "--update").exit_code == 0
    data = json.loads(baseline.read_text())
    assert {"ppl", "win_rate", "key_accuracy"} <= set(data["metrics"])
    passed = gate("--baseline", baseline, "--store", fixture_store)
    assert passed.exit_code == 0 and "REGRESSION" not in passed.output
    # plant a regression: the baseline remembers a better PPL than the store holds
    key = next(k for k in data["runs"] if k.startswith("perplexity/") and "/streamingllm/" in k)
    data["runs"][key]["metrics"]["ppl"] *= 0.9
    baseline.write_text(json.dumps(data))
    failed = gate("--baseline", baseline, "--store", fixture_store)
    assert failed.exit_code == 1
    assert f"{key}" in failed.output and "REGRESSION" in failed.output and "1 failed" in failed.output


def fresh_baseline(store, tmp_path):
    """A baseline written by `gate --update` from the store: (its path, its data, perplexity keys)."""
    baseline = tmp_path / "baseline.json"
    gate("--baseline", baseline, "--store", store, "--update")
    data = json.loads(baseline.read_text())
    return baseline, data, sorted(k for k in data["runs"] if k.startswith("perplexity/"))


def test_gate_ratio_and_bad_input(fixture_store, tmp_path):
    baseline, data, keys = fresh_baseline(fixture_store, tmp_path)
    data["ratios"] = [
        {"name": "impossible", "metric": "tokens_per_s", "numerator": keys[0], "denominator": keys[1], "min": 1e9}
    ]
    baseline.write_text(json.dumps(data))
    assert gate("--baseline", baseline, "--store", fixture_store).exit_code == 1
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema": "something else"}')
    result = gate("--baseline", bad, "--store", fixture_store)
    assert result.exit_code == 2 and "malformed baseline" in result.output
    data["ratios"] = []
    data["runs"]["perplexity/other-model/dense/binf"] = {"metrics": {"ppl": 1.0}}
    baseline.write_text(json.dumps(data))
    result = gate("--baseline", baseline, "--store", fixture_store)
    assert result.exit_code == 2 and "no result for baseline run perplexity/other-model/dense/binf" in result.output
    del data["runs"]["perplexity/other-model/dense/binf"]
    data["runs"][keys[0]]["config_hash"] = "0" * 64
    baseline.write_text(json.dumps(data))
    result = gate("--baseline", baseline, "--store", fixture_store)
    assert result.exit_code == 2 and "config differs from the baseline's" in result.output


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda d: d.update(tolerances={"ppl": "0.1"}), "tolerances.ppl must be a mapping"),
        (lambda d: d.update(tolerances={"ppl": {"rel": "0.1"}}), "tolerances.ppl.rel must be a number >= 0"),
        (lambda d: d.update(tolerances={"ppl": {"rel": -1}}), "tolerances.ppl.rel must be a number >= 0"),
        (lambda d: d.update(default_tolerance=0.01), "default_tolerance must be a mapping"),
        (lambda d: d.update(metrics="ppl"), "'metrics' must be a list"),
        (lambda d: d.update(metrics=[1]), "'metrics' must list metric names"),
        (lambda d: d.update(ratios=[{"name": "r", "numerator": "a", "denominator": "b", "min": 1}]), "needs 'metric'"),
        (lambda d: d.update(ratios=["fast"]), "ratios[0] must be a mapping"),
        (
            lambda d: d.update(ratios=[{"name": "r", "metric": "m", "numerator": "a", "denominator": "b"}]),
            "needs 'min' and/or 'max'",
        ),
        (
            lambda d: d.update(ratios=[{"name": "r", "metric": "m", "numerator": "a", "denominator": "b", "min": "1"}]),
            "'min' must be a number",
        ),
        (lambda d: d["runs"][next(iter(d["runs"]))]["metrics"].update(ppl="12"), "must be a finite number"),
        (lambda d: d.update(colour="red"), "unknown key(s) colour"),
        (lambda d: d.update(runs=[]), "'runs' must be a mapping"),
    ],
)
def test_a_malformed_baseline_is_bad_input_not_a_regression(fixture_store, tmp_path, change, message):
    baseline, data, _ = fresh_baseline(fixture_store, tmp_path)
    change(data)
    baseline.write_text(json.dumps(data))
    result = gate("--baseline", baseline, "--store", fixture_store)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "malformed baseline" in lines[0] and message in lines[0], result.output


def test_a_ratio_with_a_zero_denominator_is_bad_input(fixture_store, tmp_path):
    baseline, data, keys = fresh_baseline(fixture_store, tmp_path)
    data["ratios"] = [
        {"name": "zero", "metric": "predictions_zero", "numerator": keys[0], "denominator": keys[1], "min": 1}
    ]
    baseline.write_text(json.dumps(data))
    result = gate("--baseline", baseline, "--store", fixture_store)
    assert result.exit_code == 2 and "has no finite predictions_zero" in result.output, result.output
    data["ratios"][0]["metric"] = "kv_tokens_peak"
    data["ratios"][0]["denominator"] = next(k for k in keys if "/dense/" not in k)
    baseline.write_text(json.dumps(data))
    from streambench.results import gate as gate_module

    results = [
        {
            "config": {"task": {"name": "t"}, "model": "m", "policy": {"name": "p", "args": {}}},
            "label": "x",
            "config_hash": "h",
            "metrics": {"kv_tokens_peak": 0.0},
            "higher_is_better": {},
        }
    ]
    with pytest.raises(Exception, match="is 0"):
        gate_module.compare(
            {
                "runs": {},
                "metrics": [],
                "tolerances": {},
                "ratios": [
                    {
                        "name": "z",
                        "metric": "kv_tokens_peak",
                        "numerator": "t/m/x/binf",
                        "denominator": "t/m/x/binf",
                        "min": 1,
                    }
                ],
            },
            results,
        )


def test_a_plugin_curve_kind_gets_its_own_plot(fixture_store, tmp_path):
    """A task whose results carry a curve of a new kind adds its figure with register_plot."""
    from streambench.results.report import PLOTS, register_plot, write_report

    with Store(fixture_store) as s:
        results = [r for r in s.results() if r["config"]["task"]["name"] == "rps"]
    results[0]["curves"]["loss_by_round"] = {"index": [0, 1, 2], "value": [1.0, 0.5, 0.25]}
    drawn = []

    @register_plot("loss_by_round")
    def loss(figures, grp, rows):
        fig, ax = figures.plt.subplots()
        for r in rows:
            curve = r["curves"]["loss_by_round"]
            ax.plot(curve["index"], curve["value"], **figures.style(r))
        figures.save(fig, f"{grp['prefix']}loss_by_round.png", "loss by round", grp)
        drawn.append(len(rows))

    try:
        write_report(results, tmp_path / "report")
    finally:
        PLOTS.pop("loss_by_round")
    assert drawn == [1] and (tmp_path / "report" / "rps_loss_by_round.png").is_file()
    assert "loss by round" in (tmp_path / "report" / "report.md").read_text()
