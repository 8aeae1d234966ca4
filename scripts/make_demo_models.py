#!/usr/bin/env python3
"""Build the tiny demo models used to show evolutionary merge search on CPU (evolve/demo_models.py).

    python scripts/make_demo_models.py [--out demo_models] [--seed 0] [--force] [--write-task-data]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evolve.demo_models import main  # noqa: E402 - after the repository is on the path

if __name__ == "__main__":
    sys.exit(main())
