"""`python -m pdserve.common.engine.kernels`: build the kernels ahead of the first start (exit 1 if they can't be)."""

import logging

from pdserve.common.engine.kernels import load

logging.basicConfig(level=logging.INFO, format="%(message)s")
raise SystemExit(0 if load() else 1)
