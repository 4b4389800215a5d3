"""Hostile input of every kind, on every command: exit 2, one `Error:` line, no traceback, and no
file written anywhere (each case runs in an empty folder and fails before any model loads).
Property-based cases (hypothesis) throw random values at `-p`, presets and sweep specs: validation
either accepts them or raises the library's typed error, never anything else."""

import json
import os
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streambench.cli.app import cli
from streambench.errors import StreambenchError


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def assert_one_line_exit_2(result, needle=""):
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("Error: "), lines[0]
    assert "Traceback" not in result.output
    assert needle in lines[0], lines[0]


@pytest.fixture
def workdir(tmp_path, monkeypatch, tiny_model_dir, small_text):
    """An empty folder as the working directory, holding only the inputs a case names."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad-preset.yaml").write_text("policy: [streamingllm]\n")
    (tmp_path / "cycle.yaml").write_text("include: cycle.yaml\npolicy: window\n")
    (tmp_path / "binary.txt").write_bytes(bytes(range(256)) * 40)
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "bad-results").mkdir()
    (tmp_path / "bad-results" / "r.json").write_text("{")
    return tmp_path


TINY = "@tiny"  # replaced by the tiny model folder
TEXT = "@text"  # replaced by a short prose file

RUN_CASES = [
    (["--budget", "abc"], "must be a positive integer or a percentage (25%)"),
    (["--policy", "streamingllm", "-p", "budget=abc"], "budget must be an integer or null, got 'abc'"),
    (["--policy", "sirllm", "-p", "budget=abc"], "budget must be"),
    (["--policy", "longmem", "-p", "budget=abc"], "budget must be"),
    (["--policy", "streamingllm", "-p", "start_size=[1]"], "start_size must be an integer"),
    (["--policy", "streamingllm", "-p", "start_size=true"], "start_size must be an integer"),
    (["--policy", "streamingllm", "-p", "recent_size=1e400"], "recent_size must be"),
    (["--policy", "streamingllm", "-p", "recent_size=100000000000000000000"], "out of range"),
    (["--policy", "sirllm", "-p", "decay=.nan"], "decay must be finite"),
    (["--policy", "sirllm", "-p", "score=null"], "score must be a string"),
    (["--policy", "longmem", "-p", "bank_device=bogus"], "unsupported bank_device 'bogus'"),
    (
        ["--policy", "longmem", "-p", "bank_device=cuda:0"],
        "",
    ),  # CUDA missing here, or present: either way before loading
    (["--seed", "-1"], "seed must be an integer from 0 to 4294967295"),
    (["--seed", "4294967296"], "seed must be an integer from 0 to 4294967295"),
    (["--seed", "x"], "is not a valid integer"),
    (["--device", "mps"], "unsupported device 'mps'"),
    (["--device", "meta"], "unsupported device 'meta'"),
    (["--device", "cuda:99"], ""),
    (["--dtype", "int8"], "unknown dtype 'int8'"),
    (["--device-map", "everywhere"], "device_map must be one of"),
    (["--batch-size", "0"], "batch size must be an integer >= 1"),
    (["--kv-bits", "3"], "--kv-bits: '3' is not one of 16, 8, 4, 2"),
    (["--kv-bits", "16,abc"], "is not one of 16, 8, 4, 2"),
    (["--kv-bits", ","], "--kv-bits: no bit width given"),
    (["--kv-bits", "4", "--kv-group", "0"], "KV group size must be a positive integer"),
    (["--model", TINY, "--kv-bits", "4", "--kv-group", "12"], "does not divide the model's head size 16"),
    (["--kv-bits", "4", "--kv-group", "8", "--policy", "recompute-window"], "holds no cache to quantize"),
    (["--chunk-size", "0"], "chunk_size must be an integer >= 1"),
    (["--feed", "fast"], "Invalid value for '--feed'"),
    (["-t", "feed=fast"], "feed must be one of exact, token, approximate"),
    (["-t", "chunk_size=true"], "chunk_size must be an integer"),
    (["-t", "decode_probe=-1"], "decode_probe must be an integer >= 0"),
    (["--tokens", "-3"], "tokens must be an integer >= 2"),
    (["-t", "tokens=abc"], "tokens must be an integer"),
    (["-t", "text=[a, b]"], "text must be a string"),
    (["-t", "nope=1"], "unknown argument(s) nope"),
    (["--policy", ""], "no policy given"),
    (["--policy", ",,,"], "no policy given"),
    (["--policy", "../../etc/passwd"], "unknown policy"),
    (["--preset", "bad-preset.yaml"], "'policy' must be a string"),
    (["--preset", "cycle.yaml"], "preset include cycle"),
    (["--text", "/"], "text file not found"),
    (["--out", "a-file"], "is a file"),
    (["--task", "rps", "--player", "lizard"], "unknown player 'lizard'"),
    (["--task", "grocery", "--limit", "0"], "limit must be >= 1"),
    (["--task", "grocery", "--data", "/nonexistent/keys.jsonl"], "data not found"),
    (["--model", TINY, "--budget", "4000000000", "--task", "grocery", "--policy", "streamingllm"], "needs"),
    (["--model", TINY, "--text", "binary.txt", "--tokens", "8", "--policy", "window"], "looks binary"),
    (
        ["--model", TINY, "--policy", "window", "--text", TEXT, "--tokens", "8", "--cuda-graphs"],
        "--cuda-graphs needs a CUDA device",
    ),
]


@pytest.mark.parametrize("args,needle", RUN_CASES, ids=[" ".join(a)[:60] for a, _ in RUN_CASES])
def test_run_refuses_bad_input_in_one_line(args, needle, workdir, tiny_model_dir, small_text):
    import torch

    if torch.cuda.is_available() and any("cuda" in a for a in args):
        pytest.skip("this machine has CUDA")
    args = [str(tiny_model_dir) if a == TINY else str(small_text) if a == TEXT else a for a in args]
    if args[:2] == ["--budget", "abc"] or "--model" not in args:
        args += ["--model", str(tiny_model_dir)]
    before = files_under(workdir)
    result = CliRunner().invoke(cli, ["run", "-q", *([] if "--out" in args else ["--out", "out"]), *args])
    assert_one_line_exit_2(result, needle)
    assert files_under(workdir) == before  # nothing written: not even the output folder


SPEC_CASES = [
    ({"seed": "abc"}, "seed must be an integer"),
    ({"seed": -5}, "seed must be an integer from 0"),
    ({"models": [["a", "b"]]}, "models are names"),
    ({"policies": [{"policy": "window", "label": ["x"]}]}, "label of window must be a string"),
    ({"policies": [{"policy": "window", "label": "two\nlines"}]}, "control characters"),
    ({"policies": [{"policy": ["window"]}]}, "'policy' is a policy or preset name"),
    ({"policies": [{"policy": "window", "size": "big"}]}, "size must be an integer"),
    ({"policies": [42]}, "a policy is a name or a mapping"),
    ({"tasks": [{"task": 5}]}, "'task' is a task or preset name"),
    ({"tasks": [{"task": "perplexity", "tokens": "many"}]}, "tokens must be an integer"),
    ({"budgets": [True]}, "budget must be a positive integer or a percentage"),
    ({"budgets": [0]}, "budget must be a positive integer or a percentage"),
    ({"device": 5}, "device must be a string"),
    ({"device": "mps"}, "unsupported device"),
    ({"batch_size": "4"}, "batch_size must be an integer"),
    ({"device_map": "anywhere"}, "device_map must be one of"),
    ({"resources": {"num_gpus": "one"}}, "resources.num_gpus must be a number"),
    ({"retries": -1}, "retries must be an integer >= 0"),
    ({"colour": "blue"}, "unknown key(s) colour"),
    ({"out": ["a"]}, "out must be a string"),
]


@pytest.mark.parametrize("content,needle", SPEC_CASES, ids=[json.dumps(c)[:50] for c, _ in SPEC_CASES])
def test_sweep_spec_refused_before_anything_runs(content, needle, workdir, tiny_model_dir, small_text):
    spec = {
        "models": [str(tiny_model_dir)],
        "policies": ["window"],
        "budgets": [8],
        "tasks": [{"task": "perplexity", "text": str(small_text), "tokens": 20}],
        "store": "store.sqlite",
        "out": "json",
        "device": "cpu",
        **content,
    }
    (workdir / "spec.yaml").write_text(yaml.safe_dump(spec))
    before = files_under(workdir)
    result = CliRunner().invoke(cli, ["sweep", "-q", "spec.yaml"])
    assert_one_line_exit_2(result, needle)
    assert files_under(workdir) == before


@pytest.mark.parametrize("text", ["- just\n- a list\n", "\xff\xfe garbage", "a: [unclosed\n", "include: 5\n"])
def test_sweep_spec_files_that_are_not_specs(text, workdir):
    (workdir / "spec.yaml").write_bytes(text.encode("latin-1"))
    before = files_under(workdir)
    assert_one_line_exit_2(CliRunner().invoke(cli, ["sweep", "spec.yaml"]))
    assert files_under(workdir) == before


OTHER_CASES = [
    (["report"], "nothing to report on"),
    (["report", "--store", "missing.sqlite"], "store not found"),
    (["report", "--store", "a-file"], "not an SQLite database"),
    (["report", "bad-results"], "corrupt results file"),
    (["report", "bad-results", "--filter", "colour=red"], "unknown --filter key"),
    (["report", "bad-results", "--filter", "task"], "malformed --filter"),
    (["export", "--store", "missing.sqlite"], "store not found"),
    (["export", "--store", "a-file", "--format", "xml"], "Invalid value for '--format'"),
    (["gate", "bad-results"], "Missing option '--baseline'"),
    (["gate", "--baseline", "missing.json", "bad-results"], "corrupt results file"),
    (["gate", "--baseline", "missing.json"], "nothing to gate"),
    (["import", "bad-results", "--store", "s.sqlite"], "nothing imported: corrupt results file"),
    (["import", "missing-folder"], "does not exist"),
    (["bench", "--budgets", "abc"], "--budgets, --batch-sizes and --exact-budgets take comma-separated integers"),
    (["bench", "--policy", "nope"], "unknown policy 'nope'"),
    (["bench", "--steps", "1"], "--steps must be >= 2"),
    (["lm-eval", "--policy", "nope"], "unknown policy 'nope'"),
    (["lm-eval", "--budget", "x"], "is not a valid integer"),
    (["list", "colours"], "'colours' is not one of"),
    (["no-such-command"], "No such command"),
]


@pytest.mark.parametrize("args,needle", OTHER_CASES, ids=[" ".join(a)[:60] for a, _ in OTHER_CASES])
def test_other_commands_refuse_bad_input_in_one_line(args, needle, workdir):
    before = files_under(workdir)
    assert_one_line_exit_2(CliRunner().invoke(cli, args), needle)
    assert files_under(workdir) == before


def test_unexpected_errors_are_one_line_and_debug_shows_the_traceback(workdir, monkeypatch):
    def boom(*_args, **_kwargs):
        raise ZeroDivisionError("planted")

    monkeypatch.setattr("streambench.runs.runner.build_task", boom)
    result = CliRunner().invoke(cli, ["run", "-q", "--out", "out"])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "unexpected ZeroDivisionError: planted" in lines[0] and "--debug" in lines[0]
    debug = CliRunner().invoke(cli, ["--debug", "run", "-q", "--out", "out"])
    assert isinstance(debug.exception, ZeroDivisionError)  # the traceback, for a bug report


# ---- property-based: random values through every validation path ------------------------------
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["cpu", "cuda", "faiss", "exact", "upstream", "surprisal"]),
)
values = st.one_of(scalars, st.lists(scalars, max_size=3), st.dictionaries(st.text(max_size=4), scalars, max_size=2))
POLICY_NAMES = ["dense", "window", "recompute-window", "streamingllm", "sirllm", "longmem"]
FIELDS = [
    "budget",
    "size",
    "start_size",
    "recent_size",
    "entropy_size",
    "decay",
    "score",
    "block_size",
    "top_k",
    "bank_tokens",
    "bank_device",
    "refresh",
    "index",
]
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _accepts_or_refuses(fn):
    try:
        return fn()
    except StreambenchError:
        return None


def _sane(policy):
    assert policy.budget is None or (isinstance(policy.budget, int) and policy.budget >= 1)
    json.dumps(policy.args())  # what results record


@SETTINGS
@given(
    name=st.sampled_from(POLICY_NAMES),
    args=st.dictionaries(st.sampled_from(FIELDS), values, max_size=4),
    budget=st.one_of(st.none(), st.integers(-3, 2**20)),
)
def test_policy_args_are_validated_or_refused(name, args, budget):
    from streambench.policies.build import PolicySpec, apply_overrides, build_policy

    def build():
        spec = PolicySpec(name)
        apply_overrides([spec], dict(args))
        return build_policy(spec, budget)

    policy = _accepts_or_refuses(build)
    if policy is not None:
        _sane(policy)


@SETTINGS
@given(
    data=st.dictionaries(st.sampled_from(["policy", "include", "version", "description", *FIELDS]), values, max_size=5)
)
def test_presets_are_validated_or_refused(data, tmp_path):
    from streambench.policies.build import build_policy, resolve_policy

    preset = tmp_path / "random.yaml"
    preset.write_text(yaml.safe_dump(data))
    spec = _accepts_or_refuses(lambda: resolve_policy(str(preset), {}))
    if spec is not None:
        policy = _accepts_or_refuses(lambda: build_policy(spec, 64))
        if policy is not None:
            _sane(policy)


SPEC_KEYS = [
    "models",
    "budgets",
    "policies",
    "tasks",
    "device",
    "dtype",
    "seed",
    "batch_size",
    "device_map",
    "resources",
    "retries",
]


@SETTINGS
@given(data=st.dictionaries(st.sampled_from(SPEC_KEYS), values, max_size=4))
def test_sweep_specs_are_validated_or_refused(data, tmp_path):
    from streambench.runs.sweep import load_spec

    data.setdefault("policies", ["window"])
    data.setdefault("models", ["smollm2-135m"])
    data["tasks"] = [{"task": "perplexity", "tokens": 16}] if "tasks" not in data else data["tasks"]
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    _accepts_or_refuses(lambda: load_spec(path))


@SETTINGS
@given(items=st.lists(st.text(max_size=20), max_size=4))
def test_assignments_parse_or_refuse(items):
    from streambench.values import parse_assignments

    _accepts_or_refuses(lambda: parse_assignments(items, "-p"))


def test_hostile_labels_make_safe_file_names_inside_out(workdir, tiny_model_dir, small_text):
    labels = [
        "/../../../escaped",
        "a/b/c",
        "..",
        "<script>alert(1)</script>",
        "$x^2$",
        "_hidden",
        "ünïcödé ✓",
        "C:\\evil",
    ]
    spec = {
        "models": [str(tiny_model_dir)],
        "budgets": [8],
        "device": "cpu",
        "policies": [{"policy": "window", "label": label} for label in labels],  # (labels alone make runs apart)
        "tasks": [{"task": "perplexity", "text": str(small_text), "tokens": 16}],
        "store": "deep/dir/store.sqlite",
        "out": "deep/dir/json",
    }
    (workdir / "spec.yaml").write_text(yaml.safe_dump(spec))
    before = files_under(workdir)
    result = CliRunner().invoke(cli, ["sweep", "-q", "spec.yaml"])
    assert result.exit_code == 0, result.output
    written = files_under(workdir) - before
    assert all(w.startswith("deep") for w in written), written
    jsons = sorted((workdir / "deep" / "dir" / "json").iterdir())
    assert len(jsons) == len(labels) and all(p.parent == workdir / "deep" / "dir" / "json" for p in jsons)
    assert all(p.name[0].isalnum() and "/" not in p.name and "\\" not in p.name for p in jsons)
    stored = {json.loads(p.read_text())["label"] for p in jsons}
    assert stored == set(labels)  # the label itself is kept as given, for tables; only file names are slugs


def test_safe_path_helpers():
    from streambench.errors import OutputError
    from streambench.sanitize import inside, slug

    assert slug("/../../../escaped") == "escaped" and slug("..") == "run" and slug("") == "run"
    assert slug("a/b\\c:d") == "a-b-c-d" and len(slug("x" * 500)) <= 60
    with pytest.raises(OutputError):
        inside("/tmp/out", "../x.json")
    with pytest.raises(OutputError):
        inside("/tmp/out", "sub/x.json")
    assert inside("/tmp/out", "x.json") == Path("/tmp/out/x.json").resolve()


def test_environment_does_not_leak_into_file_modes(tmp_path):
    from streambench.results.schema import write_json_atomic

    old = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "r.json", {"a": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644  # like the store beside it, not mkstemp's 0600


def test_a_gguf_header_declaring_a_huge_string_is_one_line(tmp_path):
    import struct

    bad = tmp_path / "huge.gguf"  # magic, version 3, 0 tensors, 1 key whose name claims 2^40 bytes
    bad.write_bytes(b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, 2**40) + b"general.name")
    result = CliRunner().invoke(
        cli, ["run", "-q", "--model", str(bad), "--policy", "window", "--out", str(tmp_path / "o")]
    )
    assert_one_line_exit_2(result, "cannot load model")
    assert not any((tmp_path / "o").iterdir()) if (tmp_path / "o").exists() else True


# ---- plugins that lie or break, sampling values, text that is not text (issue 24) ---------------
PLUGIN = """
import abc
from dataclasses import dataclass

import numpy as np

from streambench.policies.base import Band, CachePolicy


@dataclass
class Valid(CachePolicy):
    def configure(self):
        self._require(self.budget is not None and self.budget >= 2, "needs a budget >= 2")

    def select(self, view):
        return np.arange(max(view.length - view.target, 0), view.length)


@dataclass
class HonestBand(Valid):
    @property
    def band(self):
        return Band(sinks=0, width=self.budget, budget=self.budget)


@dataclass
class Raises(Valid):
    def select(self, view):
        raise ValueError("boom in select")


@dataclass
class GrowsBudget(Valid):
    def select(self, view):
        self.budget = self.budget + 8
        return np.arange(view.length)


@dataclass
class LyingBand(Valid):
    @property
    def band(self):
        return Band(sinks=0, width=self.budget, budget=self.budget)

    def select(self, view):  # keeps the oldest tokens, not the recent window it declares
        return np.arange(0, min(view.target, view.length))


@dataclass
class LiesLate(HonestBand):
    def select(self, view):  # honest while the probe could see (positions < 40), then keeps the oldest
        if view.length == 0 or view.positions[-1] < 40:
            return super().select(view)
        return np.arange(0, view.target)


@dataclass
class RaisesInConfigure(Valid):
    def configure(self):
        raise RuntimeError("bad configure")


@dataclass
class Unimplemented(Valid):
    def select(self, view):
        raise NotImplementedError


@dataclass
class Ragged(Valid):
    def select(self, view):
        return [[0, 1], [2]]


@dataclass
class NoRoom(Valid):
    @property
    def max_incoming(self):
        return 0


@dataclass
class ExitsInSelect(Valid):
    def select(self, view):
        raise SystemExit(0)


@dataclass
class NoSelect(CachePolicy):
    pass


class Abstract(CachePolicy, abc.ABC):
    @abc.abstractmethod
    def helper(self): ...
"""

TASK_PLUGIN = """
from dataclasses import dataclass

from streambench.tasks.base import Task


@dataclass
class RaisesInRun(Task):
    def run(self, session, tokenizer, meter, progress):
        raise RuntimeError("task broke")


@dataclass
class NoRun(Task):
    pass
"""


@pytest.fixture(scope="module")
def plugins(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plugins")
    (folder / "p.py").write_text(PLUGIN)
    (folder / "t.py").write_text(TASK_PLUGIN)
    (folder / "exits.py").write_text("raise SystemExit(3)\n")
    return folder


def run_tiny(tiny_model_dir, small_text, *args, out="out"):
    return CliRunner().invoke(
        cli,
        [
            "run",
            "-q",
            "--model",
            str(tiny_model_dir),
            "--text",
            str(small_text),
            "--device",
            "cpu",
            "--out",
            out,
            *map(str, args),
        ],
    )


def results_in(folder) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(Path(folder).glob("*.json"))]


def test_the_configured_budget_is_the_enforced_one_whatever_the_plugin_does(
    plugins, workdir, tiny_model_dir, small_text
):
    result = run_tiny(
        tiny_model_dir,
        small_text,
        "--policy",
        f"{plugins}/p.py:GrowsBudget",
        "--feed",
        "token",
        "--tokens",
        16,
        "--budget",
        8,
    )
    assert_one_line_exit_2(result, "select() kept 8 tokens, more than the 7")
    assert "it set its budget to 16; the run's budget 8 is the one enforced" in result.output
    assert not results_in(workdir / "out")
    ok = run_tiny(
        tiny_model_dir,
        small_text,
        "--policy",
        f"{plugins}/p.py:Valid",
        "--feed",
        "token",
        "--tokens",
        16,
        "--budget",
        8,
    )
    assert ok.exit_code == 0, ok.output
    (r,) = results_in(workdir / "out")
    assert r["config"]["policy"]["args"]["budget"] == 8 and r["metrics"]["kv_tokens_peak"] <= 8


@pytest.mark.parametrize("cls,chunk", [("LyingBand", None), ("LyingBand", 4), ("LiesLate", 8)])
def test_a_declared_band_is_verified_never_trusted(cls, chunk, plugins, workdir, tiny_model_dir, small_text):
    """A band that the policy's own keep-set contradicts is refused: when the whole stream is one
    exact chunk (the probe, before the first forward), and when it lies only past the probe (the
    keep-set at a chunk's end)."""
    args = [
        "--policy",
        f"{plugins}/p.py:{cls}",
        "--feed",
        "exact",
        "--tokens",
        64 if cls == "LiesLate" else 16,
        "--budget",
        8,
    ]
    result = run_tiny(tiny_model_dir, small_text, *args, *(["--chunk-size", chunk] if chunk else []))
    assert_one_line_exit_2(result, f"p.py:{cls} declares Band(sinks=0, width=8, budget=8) but")
    assert not results_in(workdir / "out")


def test_an_honest_band_plugin_feeds_exact_chunks_equal_to_token_by_token(plugins, workdir, tiny_model_dir, small_text):
    exact = run_tiny(
        tiny_model_dir,
        small_text,
        "--policy",
        f"{plugins}/p.py:HonestBand,window",
        "--feed",
        "exact",
        "--tokens",
        48,
        "--budget",
        8,
        out="exact",
    )
    token = run_tiny(
        tiny_model_dir,
        small_text,
        "--policy",
        f"{plugins}/p.py:HonestBand",
        "--feed",
        "token",
        "--tokens",
        48,
        "--budget",
        8,
        out="token",
    )
    assert exact.exit_code == 0 and token.exit_code == 0, exact.output + token.output
    ppl = {r["label"]: r["metrics"]["ppl"] for r in results_in(workdir / "exact")}
    (by_token,) = results_in(workdir / "token")
    assert ppl[f"{plugins}/p.py:HonestBand"] == pytest.approx(by_token["metrics"]["ppl"], rel=1e-5)
    assert ppl[f"{plugins}/p.py:HonestBand"] == pytest.approx(ppl["window"], rel=1e-5)  # it is the window


def test_a_reference_cannot_rename_a_registered_policy(plugins, workdir, tiny_model_dir, small_text):
    from streambench.policies import POLICIES

    result = run_tiny(
        tiny_model_dir, small_text, "--policy", "streambench.policies.window:WindowPolicy,window", "--tokens", 16
    )
    assert_one_line_exit_2(result, "streambench.policies.window:WindowPolicy is the policy already known as 'window'")
    assert POLICIES.get("window").name == "window"
    again = run_tiny(
        tiny_model_dir, small_text, "--policy", f"{plugins}/p.py:Valid,{plugins}/./p.py:Valid", "--tokens", 16
    )
    assert_one_line_exit_2(again, f"is the policy already known as '{plugins}/p.py:Valid'")
    ok = run_tiny(tiny_model_dir, small_text, "--policy", "window", "--tokens", 16)
    assert ok.exit_code == 0 and results_in(workdir / "out")[0]["config"]["policy"]["name"] == "window"


def test_an_explicit_budget_is_never_replaced_by_policy_sizes(workdir, tiny_model_dir, small_text):
    sizes = ["--policy", "h2o", "-p", "heavy_size=8", "-p", "recent_size=8"]
    assert_one_line_exit_2(
        run_tiny(tiny_model_dir, small_text, *sizes, "--budget", 8, "--tokens", 16),
        "heavy_size + recent_size = 16 disagrees with budget 8",
    )
    assert_one_line_exit_2(
        run_tiny(tiny_model_dir, small_text, *sizes, "--budget", "50%", "--tokens", 16), "disagrees with budget 8"
    )
    assert run_tiny(tiny_model_dir, small_text, *sizes, "--tokens", 16).exit_code == 0  # sizes alone fix it
    assert results_in(workdir / "out")[0]["config"]["policy"]["args"]["budget"] == 16
    assert run_tiny(tiny_model_dir, small_text, *sizes, "--budget", 16, "--tokens", 16, out="o2").exit_code == 0
    # a preset that fixes every size is named for its budget (streamingllm-4-252): it keeps it beside
    # an explicit budget for the others; a size given on top of it is the user's again
    mixed = run_tiny(
        tiny_model_dir, small_text, "--policy", "streamingllm-4-252,window", "--budget", 24, "--tokens", 16, out="o3"
    )
    assert mixed.exit_code == 0, mixed.output
    assert {r["label"]: r["config"]["policy"]["args"]["budget"] for r in results_in(workdir / "o3")} == {
        "streamingllm-4-252": 256,
        "window": 24,
    }
    assert_one_line_exit_2(
        run_tiny(
            tiny_model_dir,
            small_text,
            "--policy",
            "streamingllm-4-252",
            "-p",
            "recent_size=200",
            "--budget",
            24,
            "--tokens",
            16,
        ),
        "start_size + recent_size = 204 disagrees with budget 24",
    )


PLUGIN_FAULTS = [  # (class, what the one line says): plugin, method, the exception's text
    ("Raises", "policy plugin '{p}/p.py:Raises' failed in select(): ValueError: boom in select"),
    (
        "RaisesInConfigure",
        "policy plugin '{p}/p.py:RaisesInConfigure' failed in configure(): RuntimeError: bad configure",
    ),
    ("Unimplemented", "policy plugin '{p}/p.py:Unimplemented' failed in select(): NotImplementedError"),
    (
        "ExitsInSelect",
        "policy plugin '{p}/p.py:ExitsInSelect' failed in select(): SystemExit(0) (a plugin cannot end streambench)",
    ),
    ("Ragged", "policy {p}/p.py:Ragged: select() must return integer ranks"),
    ("NoRoom", "policy {p}/p.py:NoRoom: max_incoming must be None or an integer from 1 to the budget (8), got 0"),
    ("NoSelect", "policy {p}/p.py:NoSelect does not implement select(view)"),
    ("Abstract", "{p}/p.py:Abstract is abstract: it does not implement helper"),
]


@pytest.mark.parametrize("cls,message", PLUGIN_FAULTS, ids=[c for c, _ in PLUGIN_FAULTS])
def test_a_plugin_defect_is_one_line_naming_the_plugin(cls, message, plugins, workdir, tiny_model_dir, small_text):
    result = run_tiny(
        tiny_model_dir,
        small_text,
        "--policy",
        f"{plugins}/p.py:{cls}",
        "--feed",
        "token",
        "--tokens",
        16,
        "--budget",
        8,
    )
    assert_one_line_exit_2(result, message.format(p=plugins))
    assert not results_in(workdir / "out")


@pytest.mark.parametrize(
    "reference,message",
    [
        (
            "streambench.policies.base:CachePolicy",
            "streambench.policies.base:CachePolicy is streambench's base class itself",
        ),
        (
            "{p}/exits.py:Anything",
            "plugin {p}/exits.py failed to import: SystemExit(3) (a plugin cannot end streambench)",
        ),
    ],
)
def test_a_plugin_that_is_no_policy_or_exits_at_import_is_one_line(
    reference, message, plugins, workdir, tiny_model_dir, small_text
):
    result = run_tiny(
        tiny_model_dir, small_text, "--policy", reference.format(p=plugins), "--tokens", 16, "--budget", 8
    )
    assert_one_line_exit_2(result, message.format(p=plugins))


@pytest.mark.parametrize(
    "cls,message",
    [
        ("RaisesInRun", "task plugin '{p}/t.py:RaisesInRun' failed in run(): RuntimeError: task broke"),
        ("NoRun", "task {p}/t.py:NoRun does not implement run("),
    ],
)
def test_a_task_plugin_defect_is_one_line_naming_the_plugin(cls, message, plugins, workdir, tiny_model_dir):
    result = CliRunner().invoke(
        cli,
        [
            "run",
            "-q",
            "--model",
            str(tiny_model_dir),
            "--device",
            "cpu",
            "--out",
            "out",
            "--policy",
            "window",
            "--budget",
            "8",
            "--task",
            f"{plugins}/t.py:{cls}",
        ],
    )
    assert_one_line_exit_2(result, message.format(p=plugins))


def test_a_sweep_records_a_plugin_defect_and_goes_on(plugins, workdir, tiny_model_dir, small_text):
    """In a sweep a plugin's SystemExit is a failed run like any other: recorded with the plugin's
    name, the other runs finish, exit 1."""
    spec = {
        "models": [str(tiny_model_dir)],
        "budgets": [8],
        "device": "cpu",
        "policies": [f"{plugins}/p.py:ExitsInSelect", "window"],
        "tasks": [{"task": "perplexity", "text": str(small_text), "tokens": 16, "feed": "token"}],
        "store": "store.sqlite",
        "out": "json",
    }
    (workdir / "spec.yaml").write_text(yaml.safe_dump(spec))
    result = CliRunner().invoke(cli, ["sweep", "-q", "spec.yaml"])
    assert result.exit_code == 1, result.output
    import sqlite3

    with sqlite3.connect(workdir / "store.sqlite") as db:
        rows = dict(db.execute("select label, coalesce(error, '') from runs").fetchall())
    assert rows["window"] == ""
    assert (
        "failed in select(): SystemExit(0) (a plugin cannot end streambench)" in rows[f"{plugins}/p.py:ExitsInSelect"]
    )


CHAT_CASES = [
    (["--temperature", "nan"], "temperature must be a finite number >= 0, got nan"),
    (["--temperature", "inf"], "temperature must be a finite number >= 0"),
    (["--seed", "99999999999999999999999"], "seed must be an integer from 0 to 4294967295"),
    (["--seed", "-1"], "seed must be an integer from 0 to 4294967295"),
]


@pytest.mark.parametrize("args,needle", CHAT_CASES, ids=[" ".join(a) for a, _ in CHAT_CASES])
def test_chat_sampling_values_are_refused_before_the_model_loads(args, needle, workdir):
    result = CliRunner().invoke(cli, ["chat", "--model", "/no/such/model", *args], input="hi\n")
    assert_one_line_exit_2(result, needle)  # (a load would have said "cannot load model")


def test_chat_reads_undecodable_input_as_replacement_characters(workdir, tiny_model_dir):
    result = CliRunner().invoke(
        cli,
        ["chat", "--model", str(tiny_model_dir), "--device", "cpu", "--max-new-tokens", "3", "--temperature", "1e-45"],
        input=b"caf\xe9 au lait\n",
    )
    assert result.exit_code == 0, result.output
    assert "warning: 1 undecodable byte sequence(s) in this line read as U+FFFD" in result.output
    assert "[turn 1 | 3 tokens" in result.output


def test_chat_exits_2_when_every_turn_was_refused(workdir, tiny_model_dir):
    result = CliRunner().invoke(
        cli, ["chat", "--model", str(tiny_model_dir), "--device", "cpu", "--budget", "16"], input="x" * 300 + "\n"
    )
    assert result.exit_code == 2, result.output
    assert result.output.splitlines()[-1].startswith("Error: every turn (1) was refused: streamingllm: a turn of")


MTBENCH_LINES = [  # (second line of the file, the one-line error)
    ("[" * 200_000 + "]" * 200_000, "mt.jsonl:2: invalid JSON (nested too deeply)"),
    ('{"question_id": NaN, "turns": ["hi"]}', "mt.jsonl:2: invalid JSON (NaN is not a JSON value)"),
    ('{"question_id": [1, 2], "turns": ["hi"]}', "mt.jsonl:2: question_id must be an integer or a string, got [1, 2]"),
    ('{"question_id": true, "turns": ["hi"]}', "mt.jsonl:2: question_id must be an integer or a string, got True"),
]


@pytest.mark.parametrize("line,needle", MTBENCH_LINES, ids=["deep", "nan-id", "list-id", "bool-id"])
def test_malformed_mtbench_lines_name_file_and_line_before_the_model_loads(line, needle, workdir):
    (workdir / "mt.jsonl").write_text('{"question_id": 1, "turns": ["fine"]}\n' + line + "\n")
    result = CliRunner().invoke(
        cli,
        [
            "run",
            "-q",
            "--model",
            "/no/such/model",
            "--task",
            "mtbench",
            "--data",
            "mt.jsonl",
            "--policy",
            "window",
            "--out",
            "out",
        ],
    )
    assert_one_line_exit_2(result, needle)


def test_lone_surrogates_in_mtbench_prompts_are_replaced_and_recorded(workdir, tiny_model_dir):
    (workdir / "mt.jsonl").write_text(
        '{"question_id": "a\\udce9", "turns": ["caf\\udce9 au lait", "ok \\ud83d\\ude00"]}\n'
    )
    result = CliRunner().invoke(
        cli,
        [
            "run",
            "-q",
            "--model",
            str(tiny_model_dir),
            "--device",
            "cpu",
            "--task",
            "mtbench",
            "--data",
            "mt.jsonl",
            "-t",
            "max_new_tokens=2",
            "--policy",
            "window",
            "--budget",
            "200",
            "--out",
            "out",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "warning: mt.jsonl: 1 lone surrogate escape(s) in the prompts read as U+FFFD" in result.output
    (r,) = results_in(workdir / "out")
    assert r["info"]["undecodable_replaced"] == 1
    assert [x["prompt"] for x in r["records"]] == ["caf\ufffd au lait", "ok \U0001f600"]  # a real pair is kept
    assert r["records"][0]["question_id"] == "a\ufffd"


@pytest.mark.parametrize("budget", ["²", "٣", "٣%", "１２"])
def test_budgets_are_ascii_digits(budget, workdir):
    assert_one_line_exit_2(CliRunner().invoke(cli, ["run", "--budget", budget, "--model", "/no/such/model"]), "budget")


def test_a_needle_grid_is_bounded_and_names_trials(workdir):
    result = CliRunner().invoke(
        cli, ["run", "--model", "/no/such/model", "--task", "needle", "-t", "trials=50000000", "--policy", "window"]
    )
    assert_one_line_exit_2(
        result,
        "3 lengths x 5 depths x 50,000,000 trials = 750,000,000 cells, more than the 100,000 "
        "one run may hold: lower trials",
    )


@pytest.mark.parametrize(
    "config,needle",
    [
        ({"model_type": "gpt2"}, "model type 'gpt2' has no rotary position embedding (learned absolute positions)"),
        ({"model_type": "mpt"}, "model type 'mpt' uses ALiBi"),
        ({"model_type": "llama", "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "uses dynamic RoPE scaling"),
        ({"model_type": "mamba"}, "model type 'mamba' has linear-attention or recurrent layers"),
        ({"model_type": "persimmon"}, "model type 'persimmon' is not among the tested families"),
        (None, "no config.json in that folder"),
    ],
)
def test_a_refused_model_is_refused_from_its_config_before_any_weight(config, needle, workdir):
    folder = workdir / "model"
    folder.mkdir()
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(cli, ["run", "-q", "--model", str(folder), "--policy", "window", "--out", "out"])
    assert_one_line_exit_2(result, needle)


def test_snapkv_refuses_a_window_that_does_not_fit_instead_of_shrinking_it():
    from streambench.policies.build import PolicySpec, build_policy

    with pytest.raises(StreambenchError, match="window must be at most budget - 1 = 31"):
        build_policy(PolicySpec("snapkv", {"window": 64}), 32)
    with pytest.raises(StreambenchError, match="interval must be at most budget - window = 8"):
        build_policy(PolicySpec("snapkv", {"window": 24, "interval": 9}), 32)
    kept = build_policy(PolicySpec("snapkv", {"window": 31}), 32)
    assert kept.args()["window"] == 31 and kept.observation_window == 31  # what runs is what is recorded


def test_control_characters_reach_reports_escaped(tmp_path):
    from streambench.results.report.tables import html_cell as _html_cell
    from streambench.results.report.tables import md_cell as _md_cell

    hostile = "a\x00b\x1b[31mc\x85d\udce9<e>|"
    for cell in (_html_cell(hostile), _md_cell(hostile)):
        assert not any(ord(ch) < 32 or 0x7F <= ord(ch) <= 0x9F or 0xD800 <= ord(ch) <= 0xDFFF for ch in cell)
        assert "\\x00" in cell and "\\x1b" in cell and "\\udce9" in cell and "<e>" not in cell
        cell.encode("utf-8")
