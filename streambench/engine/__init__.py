"""One stream through one model under one cache policy: the evicting cache, exact re-indexing,
exact chunked feeding, observations for policies, CUDA graphs and generation. The only
torch-heavy core; `tests/engine/test_exactness.py` is its contract."""
