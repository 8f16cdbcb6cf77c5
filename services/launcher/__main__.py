"""python -m pdserve.launcher: the same as `pdserve up`."""

import argparse
import sys

from pdserve.launcher import __doc__ as doc
from pdserve.launcher.up import add_up_args, run_up

parser = argparse.ArgumentParser(prog="pdserve up", description=doc)
add_up_args(parser)
sys.exit(run_up(parser.parse_args()))
