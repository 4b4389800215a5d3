"""The lm-eval bridge: streambench as an lm-eval model (`model.py`) and any lm-eval task as a
streambench task (`task.py`)."""
