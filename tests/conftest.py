import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tiny_models, reference

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test touches the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def embedded():
    """The real embedded model (SmolLM2-135M-Instruct, fp32, CPU), loaded once per test session."""
    from streambench import models

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
    path.write_text(("It was the best of times, it was the worst of times, it was the age of wisdom. " * 60))
    return path
