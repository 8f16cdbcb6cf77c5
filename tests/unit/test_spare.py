"""The launcher's warm spare as a process: it takes a `python -m pdserve` command line and runs it
with the launcher's settings; anything else is refused, a spare of code since changed is dropped,
and spares that keep dying are not restarted."""

from __future__ import annotations

import argparse
import io
import os
import sys

from pdserve.launcher import spare as spare_module
from pdserve.launcher.restarts import RestartPolicy
from pdserve.launcher.spare import Spare
from pdserve.launcher.suite import Suite
from pdserve.launcher.topology import Service
from pdserve.launcher.up import add_up_args

PLAN_HELP = (sys.executable, "-m", "pdserve", "plan", "--help")


def test_a_spare_runs_the_command_it_is_given_with_the_environment_added():
    spare = Spare(sys.executable, dict(os.environ))
    proc = spare.start()
    assert spare.claim(PLAN_HELP) is proc and spare.proc is None  # no longer a spare
    assert spare.hand_over(proc, PLAN_HELP, {"PDSERVE_INSTANCE_ID": "abc"})
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and b"ready in" in out and b"usage: pdserve plan" in out


def test_a_spare_refuses_another_program_and_stays_a_spare():
    spare = Spare(sys.executable, dict(os.environ))
    proc = spare.start()
    try:
        assert spare.claim(("/usr/bin/env", "-m", "pdserve", "plan")) is None
        assert spare.proc is proc and proc.poll() is None
    finally:
        spare.stop()
    assert proc.poll() is not None  # stopped: it holds nothing to drain


def test_a_spare_of_code_changed_since_it_started_is_dropped_not_used(monkeypatch):
    spare = Spare(sys.executable, dict(os.environ))
    proc = spare.start()
    monkeypatch.setattr(spare_module, "code_stamp", lambda: spare.stamp + 1)  # an upgrade in place
    assert spare.claim(PLAN_HELP) is None and spare.proc is None and proc.poll() is not None


def test_spares_that_keep_dying_or_cannot_start_are_given_up():
    spare = Spare("/bin/false", {})  # exits at once, as a spare whose imports fail would
    assert spare.claim(("/bin/false", "-m", "pdserve")) is None  # none yet
    for _ in range(Spare.GIVE_UP_AFTER):
        assert spare.needed()
        spare.start().wait(10)
    assert not spare.needed() and spare.deaths == Spare.GIVE_UP_AFTER


def test_a_spare_that_cannot_start_is_said_and_the_suite_goes_on():
    worker = Service("decode-0", (sys.executable, "-m", "pdserve", "serve", "decode"), "127.0.0.1:1", 0, role="decode")
    out = io.StringIO()
    suite = Suite(services=[worker], out=out, restarts=RestartPolicy())
    suite.spare.python = "/nonexistent/python"
    suite.keep_spare()  # no exception: a spare is an optimisation
    assert "could not start a spare worker process" in out.getvalue() and suite.spare.deaths == 1


def test_only_workers_started_as_pdserve_with_restarts_get_a_spare():
    worker = Service("decode-0", (sys.executable, "-m", "pdserve", "serve", "decode"), "127.0.0.1:1", 0, role="decode")
    other = Service("decode-0", (sys.executable, "-c", "pass"), "127.0.0.1:1", 0, role="decode")
    assert Suite(services=[worker], restarts=RestartPolicy()).spare is not None
    assert Suite(services=[worker], restarts=RestartPolicy(spare=False)).spare is None
    assert Suite(services=[worker]).spare is None  # no restarts, nothing to restart in
    assert Suite(services=[other], restarts=RestartPolicy()).spare is None  # it could never take one over


def test_pdserve_up_keeps_a_spare_unless_told_not_to():
    parser = argparse.ArgumentParser()
    add_up_args(parser)
    assert parser.parse_args([]).spare is True and parser.parse_args(["--no-spare"]).spare is False
