"""Thin entry: same as `python -m fastclip.benchmark` (see fastclip/benchmark)."""
import sys

from fastclip.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
