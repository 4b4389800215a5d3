"""From a configuration to finished, written runs: config, plan and runner, sweeps (local and
Ray) and the speed benchmark. Torch-free at import."""
