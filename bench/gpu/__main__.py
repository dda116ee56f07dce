import sys

from bench.gpu.cli import main

if __name__ == "__main__":  # not when a spawned worker process re-imports this module as __mp_main__
    sys.exit(main())
