"""A bad setting, from a flag, a variable or a file, is one line on stderr and exit 2,
from `pdserve serve` and from `pdserve up` (which refuses before it starts anything)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from pdserve.cli import main
from tests.e2e.conftest import free_port_run


def pdserve(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The real command, in a fresh process; PDSERVE_* variables only from `env`."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PDSERVE_")}
    return subprocess.run(
        [sys.executable, "-m", "pdserve", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        env={**clean, **(env or {})},
    )


def up(*argv: str) -> tuple[str, ...]:
    """`up` on free ports: should a refusal fail to happen, no other suite is disturbed."""
    base = free_port_run(6)
    return ("up", *argv, "--port", str(base), "--base-port", str(base + 1), "--metrics-port", "-1", "--http-port", "-1")


def assert_one_line_naming(result: subprocess.CompletedProcess, *names: str) -> str:
    lines = result.stderr.splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


def test_a_bad_environment_value_names_the_flag_and_the_variable():
    result = pdserve("serve", "decode", env={"PDSERVE_PORT": "abc"})
    assert_one_line_naming(result, "--port", "PDSERVE_PORT", "'abc'", "environment")


def test_a_bad_flag_value_is_one_line_without_the_usage():
    assert_one_line_naming(pdserve("serve", "decode", "--port", "abc"), "--port", "'abc'")


def test_an_unknown_log_level_is_refused_before_up_starts_anything():
    result = pdserve("--log-level", "LOUD", *up())
    assert_one_line_naming(result, "--log-level", "PDSERVE_LOG_LEVEL", "LOUD")
    assert result.stdout == ""  # no service was started, so none printed a line


def test_an_unknown_key_in_a_config_file_is_named_with_a_suggestion(tmp_path):
    path = tmp_path / "router.toml"
    path.write_text("prot = 50051\n")
    line = assert_one_line_naming(pdserve("serve", "router", "--config", str(path)), str(path), "prot")
    assert "did you mean port" in line


def test_a_bad_variable_that_would_reach_every_child_is_refused_by_up():
    result = pdserve(*up(), env={"PDSERVE_KV_CACHE_GIB": "-1"})
    assert_one_line_naming(result, "pdserve up:", "--kv-cache-gib", "PDSERVE_KV_CACHE_GIB", "-1")
    assert result.stdout == ""


def test_a_bad_value_for_one_child_is_refused_by_up_naming_the_child():
    result = pdserve(*up(), env={"PDSERVE_LOG_FORMAT": "xml"})
    assert_one_line_naming(result, "prefill-0", "--log-format", "PDSERVE_LOG_FORMAT", "'xml'")


def test_a_taken_port_is_one_line_naming_its_flag():
    with socket.create_server(("127.0.0.1", 0)) as holder:
        port = holder.getsockname()[1]
        result = pdserve("serve", "router", "--port", "0", "--metrics-port", "-1", "--http-port", str(port))
    assert_one_line_naming(result, "--http-port", str(port), "another process listens")


def test_a_bad_tracing_variable_is_refused_by_up():
    result = pdserve(*up(), env={"OTEL_TRACES_EXPORTER": "zipkin"})
    assert_one_line_naming(result, "pdserve up:", "OTEL_TRACES_EXPORTER", "'zipkin'")
    assert result.stdout == ""


def test_a_range_check_names_the_setting_and_the_value():
    assert_one_line_naming(
        pdserve("serve", "kvstore", "--capacity-gib", "-2"), "--capacity-gib", "PDSERVE_CAPACITY_GIB", "-2.0"
    )


@pytest.mark.parametrize("service, role", [("decode", "both"), ("decode", "prefill"), ("elastic", "colocated")])
def test_a_role_the_service_cannot_take_is_one_line(service, role):
    line = assert_one_line_naming(pdserve("serve", service, "--role", role), "--role", repr(role))
    assert "pdserve serve elastic" in line or service == "elastic"


def test_a_device_that_does_not_exist_is_refused_before_the_model_loads():
    # On any machine: no CUDA at all, or no 100th CUDA device.
    line = assert_one_line_naming(pdserve("serve", "decode", "--device", "cuda:99"), "--device", "cuda:99")
    assert "not available" in line or "does not exist" in line


def test_up_on_cuda_without_cuda_is_one_line():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = pdserve(*up("--device", "cuda:0"))
    assert_one_line_naming(result, "--device", "cuda:0", "CUDA", "not available")
    assert result.stdout == ""


def test_a_model_that_is_not_there_is_one_line_from_serve_and_up(tmp_path):
    missing = str(tmp_path / "no-such-model")
    port = str(free_port_run(1))
    assert_one_line_naming(pdserve("serve", "decode", "--model", missing, "--port", port), "--model", missing)
    assert_one_line_naming(pdserve(*up("--model", missing)), "pdserve up", "--model", missing)
    # With a mode given, the suite's model step refuses it: its one line, then up's.
    result = pdserve(*up("--mode", "colocated", "--model", missing))
    assert result.returncode != 0 and "Traceback" not in result.stdout + result.stderr
    assert f"pdserve up: --model '{missing}'" in result.stdout + result.stderr


def help_text(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # unwrapped


def test_help_shows_the_defaults(capsys):
    assert "the router's gRPC port (default: 50051)" in help_text(capsys, "up")
    assert "tokens to generate at most (default: 128)" in help_text(capsys, "generate")
    demo = help_text(capsys, "demo")
    assert "stream one chat completion" in demo and "(default: disaggregated)" in demo
    assert "(default: 0.0; env PDSERVE_KV_CACHE_GIB)" in help_text(capsys, "serve", "decode")


def test_a_data_host_that_is_not_this_machines_is_one_line():
    # 198.51.100.0/24 is TEST-NET-2: for documentation, held by no interface here.
    result = pdserve(
        "serve", "kvstore", "--port", "0", "--metrics-port", "-1", env={"PDSERVE_DATA_HOST": "198.51.100.77"}
    )
    assert_one_line_naming(result, "--data-host", "198.51.100.77")


def test_a_reader_that_stops_reading_ends_the_command_quietly(tmp_path):
    """`pdserve plan ... | head -1`: the rest of the output goes nowhere, with no traceback about it."""
    from tests.unit.test_planner import profile

    prof = tmp_path / "profile.json"
    profile().save(prof)
    argv = ["plan", "--profile", str(prof), "--cores", "1", "--chunks", "512"]  # a table (of one row: 4 s, not 21)
    r, w = os.pipe()
    os.close(r)  # the reader is gone before anything is written
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pdserve", *argv], stdout=w, stderr=subprocess.PIPE, text=True, timeout=120
        )
    finally:
        os.close(w)
    assert (done.returncode, done.stderr) == (141, "")


@pytest.mark.parametrize("command", [("status",), ("restart", "--rolling")])
@pytest.mark.parametrize("target", ["localhost", "unix:/tmp/x.sock", "localhost:http"])
def test_a_target_without_a_port_is_one_line(command, target):
    assert_one_line_naming(pdserve(*command, "--target", target), "--target", repr(target))


def test_ctrl_c_before_a_command_handles_it_ends_with_130_and_no_traceback():
    """A first `pdserve up` times a profile, `generate --local` loads a model: Ctrl-C then is no crash."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, signal, sys; from pdserve.cli import main; "
            "signal.signal(signal.SIGINT, signal.default_int_handler); "
            "sys.argv = ['pdserve', 'plan', '--help']; import pdserve.cli as c; "
            "c._main = lambda argv: os.kill(os.getpid(), signal.SIGINT); sys.exit(main())",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err


@pytest.mark.parametrize(
    "flags, says",
    [
        (("--model", "Qwen/Qwen2.5-0.5B-Instruct"), "--model is for --local"),  # not silently another model
        (("--tls-key", "k.pem"), "--tls-cert is needed with --tls-key"),  # not silently no client certificate
        (("--tls-cert", "c.pem"), "--tls-key is needed with --tls-cert"),
    ],
)
def test_a_generate_flag_that_would_be_ignored_is_one_line(flags, says):
    result = pdserve("generate", "hi", "--target", "127.0.0.1:1", *flags)
    assert says in assert_one_line_naming(result)
