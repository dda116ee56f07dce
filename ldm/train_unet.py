"""`python -m ldm.train_unet`: not built yet."""

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ldm.train_unet", description=__doc__)
    parser.parse_known_args(argv)
    print("ldm.train_unet is not built yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
