"""The `streambench` command: Click only. Parse flags, call the layers below, print one table or
one line; every error ends here as one line and an exit status (2 for bad input)."""
