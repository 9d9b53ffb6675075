"""``make bench``: the speed benchmark (see ``metarun/bench/``; ``--quick`` for a one-minute run)."""

import sys

from metarun.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
