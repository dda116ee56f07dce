"""The benchmark suite: ``pytest bench/ --benchmark-only`` (see bench/README.md) and its report,
``python -m bench.report results.json``."""
