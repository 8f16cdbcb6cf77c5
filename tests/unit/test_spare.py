"""The launcher's warm spare as a process: it takes a `python -m pdserve` command line and runs it
with the launcher's settings; anything else is refused, and spares that keep dying are not restarted."""

from __future__ import annotations

import argparse
import os
import sys

from pdserve.launcher.spare import Spare
from pdserve.launcher.up import add_up_args


def test_a_spare_runs_the_command_it_is_given_with_the_environment_added():
    spare = Spare(sys.executable, dict(os.environ))
    proc = spare.start()
    taken = spare.take((sys.executable, "-m", "pdserve", "plan", "--help"), {"PDSERVE_INSTANCE_ID": "abc"})
    assert taken is proc and spare.proc is None  # it is that process now, not a spare
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and b"usage: pdserve plan" in out


def test_a_spare_refuses_another_program_and_stays_a_spare():
    spare = Spare(sys.executable, dict(os.environ))
    proc = spare.start()
    try:
        assert spare.take(("/usr/bin/env", "-m", "pdserve", "plan"), {}) is None
        assert spare.proc is proc and proc.poll() is None
    finally:
        spare.stop()
    assert proc.poll() is not None  # stopped: it holds nothing to drain


def test_no_spare_has_nothing_to_give_and_spares_that_keep_dying_are_given_up():
    spare = Spare("/bin/false", {})  # exits at once, as a spare whose imports fail would
    assert spare.take(("/bin/false", "-m", "pdserve"), {}) is None
    for _ in range(Spare.GIVE_UP_AFTER):
        assert spare.needed()
        spare.start().wait(10)
    assert not spare.needed() and spare.deaths == Spare.GIVE_UP_AFTER


def test_pdserve_up_keeps_a_spare_unless_told_not_to():
    parser = argparse.ArgumentParser()
    add_up_args(parser)
    assert parser.parse_args([]).spare is True and parser.parse_args(["--no-spare"]).spare is False
