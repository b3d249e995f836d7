"""On-demand benchmarks: ``python -m benchmarks.<name>``; each writes benchmarks/results/<name>.json and .md."""
