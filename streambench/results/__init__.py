"""What runs leave behind: the result schema, the SQLite store, the regression gate and the
report. Torch-free: a report machine or a Ray driver imports it without a model."""
