import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tiny_models, reference

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test touches the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # The suite runs as one worker per core (`-n 2`, pyproject's addopts): each worker, and each
    # subprocess it starts, gets its share of the cores, since oversubscribed OpenMP runs 10-30x slower.
    _threads = str(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = _threads
    import torch

    torch.set_num_threads(int(_threads))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def embedded():
    """The real embedded model (SmolLM2-135M-Instruct, fp32, CPU), loaded once per test session."""
    from streambench.models import loading as models

    return models.load(models.EMBEDDED, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"../shared/data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random 2-layer Llama with a byte tokenizer, saved as a local model folder (loads offline
    through the same path as any local model)."""
    from tiny_models import byte_tokenizer, tiny_model

    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", layers=2, vocab=258).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def small_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "prose.txt"
    path.write_text("It was the best of times, it was the worst of times, it was the age of wisdom. " * 60)
    return path


EXAMPLE_PLUGIN = Path(__file__).resolve().parents[1] / "examples" / "plugin"


@pytest.fixture(scope="session")
def plugin_site(tmp_path_factory):
    """The example plugin package (examples/plugin) "installed" without network or pip: its
    source folder plus a dist-info whose entry points are read from its own pyproject.toml, both
    on a path that importlib.metadata scans. Returns the PYTHONPATH string (for subprocesses)."""
    import tomllib

    project = tomllib.loads((EXAMPLE_PLUGIN / "pyproject.toml").read_text())["project"]
    site = tmp_path_factory.mktemp("site")
    info = site / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    info.mkdir()
    info.joinpath("METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n"
    )
    lines = []
    for group, entries in project["entry-points"].items():
        lines.append(f"[{group}]")
        lines += [f"{name} = {value}" for name, value in entries.items()]
    info.joinpath("entry_points.txt").write_text("\n".join(lines) + "\n")
    info.joinpath("top_level.txt").write_text("streambench_strided\n")
    return os.pathsep.join([str(site), str(EXAMPLE_PLUGIN / "src")])
