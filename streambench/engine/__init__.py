"""One stream through one model under one cache policy: the session (and the recompute session,
which keeps no cache), the evicting cache (cache/), the policy contract it enforces, exact chunked
feeding, observations for policies, CUDA graphs, generation and the meter. The only torch-heavy
core; `tests/engine/test_exactness.py` is its contract."""
