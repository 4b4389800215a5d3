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

from streambench.cli import cli
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
    (["--policy", "longmem", "-p", "bank_device=cuda:0"], ""),  # CUDA missing here, or present: either way before loading
    (["--seed", "-1"], "seed must be an integer from 0 to 4294967295"),
    (["--seed", "4294967296"], "seed must be an integer from 0 to 4294967295"),
    (["--seed", "x"], "is not a valid integer"),
    (["--device", "mps"], "unsupported device 'mps'"),
    (["--device", "meta"], "unsupported device 'meta'"),
    (["--device", "cuda:99"], ""),
    (["--dtype", "int8"], "unknown dtype 'int8'"),
    (["--device-map", "everywhere"], "device_map must be one of"),
    (["--batch-size", "0"], "batch size must be an integer >= 1"),
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
    (["--model", TINY, "--policy", "window", "--text", TEXT, "--tokens", "8", "--cuda-graphs"], "--cuda-graphs needs a CUDA device"),
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
    spec = {"models": [str(tiny_model_dir)], "policies": ["window"], "budgets": [8],
            "tasks": [{"task": "perplexity", "text": str(small_text), "tokens": 20}],
            "store": "store.sqlite", "out": "json", "device": "cpu", **content}
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
    from streambench import config

    def boom(*_args, **_kwargs):
        raise ZeroDivisionError("planted")

    monkeypatch.setattr(config, "build_task", boom)
    monkeypatch.setattr("streambench.runner.build_task", boom)
    result = CliRunner().invoke(cli, ["run", "-q", "--out", "out"])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "unexpected ZeroDivisionError: planted" in lines[0] and "--debug" in lines[0]
    debug = CliRunner().invoke(cli, ["--debug", "run", "-q", "--out", "out"])
    assert isinstance(debug.exception, ZeroDivisionError)  # the traceback, for a bug report


# ---- property-based: random values through every validation path ------------------------------
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=12), st.sampled_from(["cpu", "cuda", "faiss", "exact", "upstream", "surprisal"]))
values = st.one_of(scalars, st.lists(scalars, max_size=3), st.dictionaries(st.text(max_size=4), scalars, max_size=2))
POLICY_NAMES = ["dense", "window", "recompute-window", "streamingllm", "sirllm", "longmem"]
FIELDS = ["budget", "size", "start_size", "recent_size", "entropy_size", "decay", "score", "block_size", "top_k",
          "bank_tokens", "bank_device", "refresh", "index"]
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
@given(name=st.sampled_from(POLICY_NAMES), args=st.dictionaries(st.sampled_from(FIELDS), values, max_size=4),
       budget=st.one_of(st.none(), st.integers(-3, 2**20)))
def test_policy_args_are_validated_or_refused(name, args, budget):
    from streambench.config import PolicySpec, apply_overrides, build_policy

    def build():
        spec = PolicySpec(name)
        apply_overrides([spec], dict(args))
        return build_policy(spec, budget)

    policy = _accepts_or_refuses(build)
    if policy is not None:
        _sane(policy)


@SETTINGS
@given(data=st.dictionaries(st.sampled_from(["policy", "include", "version", "description", *FIELDS]), values, max_size=5))
def test_presets_are_validated_or_refused(data, tmp_path):
    from streambench.config import build_policy, resolve_policy

    preset = tmp_path / "random.yaml"
    preset.write_text(yaml.safe_dump(data))
    spec = _accepts_or_refuses(lambda: resolve_policy(str(preset), {}))
    if spec is not None:
        policy = _accepts_or_refuses(lambda: build_policy(spec, 64))
        if policy is not None:
            _sane(policy)


SPEC_KEYS = ["models", "budgets", "policies", "tasks", "device", "dtype", "seed", "batch_size", "device_map",
             "resources", "retries"]


@SETTINGS
@given(data=st.dictionaries(st.sampled_from(SPEC_KEYS), values, max_size=4))
def test_sweep_specs_are_validated_or_refused(data, tmp_path):
    from streambench.sweep import load_spec

    data.setdefault("policies", ["window"])
    data.setdefault("models", ["smollm2-135m"])
    data["tasks"] = [{"task": "perplexity", "tokens": 16}] if "tasks" not in data else data["tasks"]
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    _accepts_or_refuses(lambda: load_spec(path))


@SETTINGS
@given(items=st.lists(st.text(max_size=20), max_size=4))
def test_assignments_parse_or_refuse(items):
    from streambench.config import parse_assignments

    _accepts_or_refuses(lambda: parse_assignments(items, "-p"))


def test_hostile_labels_make_safe_file_names_inside_out(workdir, tiny_model_dir, small_text):
    labels = ["/../../../escaped", "a/b/c", "..", "<script>alert(1)</script>", "$x^2$", "_hidden", "ünïcödé ✓", "C:\\evil"]
    spec = {"models": [str(tiny_model_dir)], "budgets": [8], "device": "cpu",
            "policies": [{"policy": "window", "label": label} for label in labels],  # (labels alone make runs apart)
            "tasks": [{"task": "perplexity", "text": str(small_text), "tokens": 16}],
            "store": "deep/dir/store.sqlite", "out": "deep/dir/json"}
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
    from streambench.safety import inside, slug

    assert slug("/../../../escaped") == "escaped" and slug("..") == "run" and slug("") == "run"
    assert slug("a/b\\c:d") == "a-b-c-d" and len(slug("x" * 500)) <= 60
    with pytest.raises(OutputError):
        inside("/tmp/out", "../x.json")
    with pytest.raises(OutputError):
        inside("/tmp/out", "sub/x.json")
    assert inside("/tmp/out", "x.json") == Path("/tmp/out/x.json").resolve()


def test_environment_does_not_leak_into_file_modes(tmp_path):
    from streambench.results import write_json_atomic

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
    result = CliRunner().invoke(cli, ["run", "-q", "--model", str(bad), "--policy", "window", "--out", str(tmp_path / "o")])
    assert_one_line_exit_2(result, "cannot load model")
    assert not any((tmp_path / "o").iterdir()) if (tmp_path / "o").exists() else True
