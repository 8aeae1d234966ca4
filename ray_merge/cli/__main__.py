import sys

from ray_merge.cli import main

sys.exit(main())
