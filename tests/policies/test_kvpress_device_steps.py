"""kvpress presses stepping on the device (engine/cache/device_steps.py): the presses whose own
score() never waits on the device are exactly the bridge's `DEVICE_PRESSES` (counted here, per
press, so a kvpress upgrade that adds a host read fails this), they keep what the host path
keeps, and a press's NaN scores, noted on the device, still end the run in one line."""

import numpy as np
import pytest
import torch
from test_conformance import PRESS_ARGS, PRESSES
from tiny_models import tiny_model

pytest.importorskip("kvpress", reason="kvpress is not installed (./install.sh kvpress)")

from streambench.engine.host_sync import HostSyncCounter  # noqa: E402
from streambench.engine.session import StreamSession  # noqa: E402
from streambench.errors import PolicyContractError  # noqa: E402
from streambench.models.loading import LoadedModel  # noqa: E402
from streambench.policies import POLICIES  # noqa: E402
from streambench.policies import kvpress_bridge as bridge  # noqa: E402
from streambench.policies.build import PolicySpec, build_policy  # noqa: E402

BUDGET = 12
# (a wrapper's step follows the press it wraps, known only when built; the uneven presses keep a
# ragged cache: the host path for both)
EVEN = [name for name in PRESSES if not any(getattr(POLICIES.get(name), a) for a in ("uneven", "blocked", "wraps"))]
DEVICE = sorted(f"kvpress:{name}" for name in bridge.DEVICE_PRESSES)


def policy(name):
    return build_policy(PolicySpec(name, dict(PRESS_ARGS.get(name, {}))), BUDGET)


def ids_of(n, seed, distinct=False):
    generator = torch.Generator().manual_seed(seed)
    if distinct:
        return (torch.randperm(93, generator=generator)[:n] + 3)[None]
    return torch.randint(3, 96, (1, n), generator=generator)


def test_every_device_press_runs_in_the_stream():
    assert set(DEVICE) <= set(EVEN), set(DEVICE) - set(EVEN)


@pytest.mark.parametrize("name", EVEN)
def test_a_press_steps_on_the_device_exactly_when_its_score_never_waits(name, monkeypatch):
    """Forced onto the device path, a full-cache step of each even press is counted: the presses
    that read nothing and copy nothing up are the ones the bridge lets step there."""
    made = policy(name)
    monkeypatch.setattr(type(made), "device_select", True)
    ids = ids_of(40, seed=4)
    with StreamSession(LoadedModel.wrap(tiny_model("llama", layers=2)), made, device_steps=True) as s:
        assert s.device_steps
        for t in range(30):
            s.feed(ids[:, t : t + 1])
        with HostSyncCounter() as syncs:
            for t in range(30, 36):
                s.feed(ids[:, t : t + 1])
    waits = {**syncs.where, **syncs.uploads}
    assert (not waits) == (name in DEVICE), waits


# (not qwen3: its normed keys all have one norm in a tiny model, so norm presses meet ties only)
@pytest.mark.parametrize("arch", ["llama", "phi", "gemma2"])
@pytest.mark.parametrize("name", DEVICE)
def test_a_device_press_keeps_what_the_host_path_keeps(arch, name):
    """Token by token: every step's logits and, at the end, every lane's kept positions equal the
    host path's (kvpress's topk ties fall the same way: the drops are its keep-set's complement).
    No token repeats: a repeated token's layer-0 keys have equal norms, which the two paths'
    re-rotations (every key, or the moved ones) leave apart by float rounding in either order."""
    model = tiny_model(arch, layers=2)
    lm = LoadedModel.wrap(model)
    host, dev = StreamSession(lm, policy(name), device_steps=False), StreamSession(lm, policy(name), device_steps=True)
    assert dev.device_steps and not host.device_steps and policy(name).device_select
    ids = ids_of(50, seed=6, distinct=True)
    with host, dev:
        for t in range(ids.shape[1]):
            torch.testing.assert_close(dev.feed(ids[:, t : t + 1]), host.feed(ids[:, t : t + 1]), atol=2e-5, rtol=0)
        assert dev.cache.on_device
        np.testing.assert_array_equal(dev.cache.positions, host.cache.positions)
        assert dev.cache.evictions == host.cache.evictions > 0


def test_a_press_that_scores_nan_on_the_device_fails_when_the_host_next_asks(tmp_path, monkeypatch):
    """The host path raises at the eviction; the device path notes the NaN there (reading it would
    wait) and raises it between streams or when the session ends, in the same one line."""
    plugin = tmp_path / "presses.py"
    plugin.write_text(
        "from dataclasses import dataclass\n"
        "from kvpress import ScorerPress\n"
        "@dataclass\n"
        "class NaNs(ScorerPress):\n"
        "    def score(self, module, hidden_states, keys, values, attentions, kwargs):\n"
        "        return keys.norm(dim=-1) * float('nan')\n"
    )
    lm = LoadedModel.wrap(tiny_model("llama", layers=1))
    ids = ids_of(20, seed=1)
    made = build_policy(PolicySpec(f"{plugin}:NaNs"), 8)
    assert not made.device_select  # (a user's press is not counted: the host path)
    monkeypatch.setattr(type(made), "device_select", True)
    message = f"policy {plugin}:NaNs: the press's score\\(\\) returned NaN scores \\(in a step on the device\\)"
    with pytest.raises(PolicyContractError, match=message):
        with StreamSession(lm, made, device_steps=True) as session:
            for t in range(20):
                session.feed(ids[:, t : t + 1])
            assert session.cache.evictions > 0  # (fed to the end: nothing was read on the host)
    session = StreamSession(lm, build_policy(PolicySpec(f"{plugin}:NaNs"), 8), device_steps=True)
    for t in range(10):
        session.feed(ids[:, t : t + 1])
    with pytest.raises(PolicyContractError, match=message):
        session.reset()  # (a new stream: what the last one noted is raised first)
    session.close()
    with pytest.raises(PolicyContractError, match="returned NaN scores$"):
        with StreamSession(lm, build_policy(PolicySpec(f"{plugin}:NaNs"), 8), device_steps=False) as session:
            for t in range(10):
                session.feed(ids[:, t : t + 1])
