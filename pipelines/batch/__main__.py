"""``python -m pipelines.batch ARGS`` runs ``instdiff batch ARGS`` (the ``ray job submit`` entry point)."""

import sys

from pipelines.batch.cli import main

if __name__ == "__main__":
    sys.exit(main())
