"""streambench: evaluate and benchmark KV-cache policies for streaming LLM inference.

The public entry points are `streambench.run(config)` and the `streambench` command.
Heavy modules (torch, transformers) load only when a run starts.
"""

__version__ = "0.1.0"


def run(config):
    """Run `config` (a `RunConfig`); yields one result dict per policy, each written to disk."""
    from streambench.runs.runner import run as _run

    return _run(config)


__all__ = ["__version__", "run"]
