"""``python -m experiments.bench``: the benchmark suite's command line (``cli.main``)."""

from experiments.bench.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
