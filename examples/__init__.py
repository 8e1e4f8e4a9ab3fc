"""Runnable examples of peft-sparta. Run them as modules from the repository root, e.g.
``python -m examples.quickstart``: they load the offline models through the repository's `benchmarks.offline`."""
