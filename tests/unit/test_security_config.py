"""Specification of the security settings and checks (pdserve.common.security),
without servers: how the settings map from flags, environment and files, what
they require of each other, and which calls each credential admits."""

from __future__ import annotations

import argparse

import grpc
import pytest

from pdserve.common import errors
from pdserve.common.grpc_errors import relayed_error, status_code_for
from pdserve.common.security import TOKEN_KEY, ApiKeys, Authenticator, SecurityConfig, check_token, from_environment
from pdserve.common.worker_config import WorkerConfig
from pdserve.kvstore.config import KVStoreConfig
from pdserve.router.config import RouterConfig


@pytest.fixture
def pem(tmp_path):
    """Stand-ins for PEM files: the settings only check that they can be read."""
    for name in ("ca.pem", "svc.crt", "svc.key"):
        (tmp_path / name).write_text("-----BEGIN PLACEHOLDER-----\n")
    return {
        "tls_ca": str(tmp_path / "ca.pem"),
        "tls_cert": str(tmp_path / "svc.crt"),
        "tls_key": str(tmp_path / "svc.key"),
    }


def resolve(cls, argv=(), env=None):
    parser = cls.add_cli_args(argparse.ArgumentParser())
    return cls.from_cli_args(parser.parse_args(list(argv)), environ=env or {})


# ---- mapping: flags, environment, files ----------------------------------------------
def test_every_service_takes_the_tls_settings_as_flags(pem):
    argv = [
        "--tls-cert",
        pem["tls_cert"],
        "--tls-key",
        pem["tls_key"],
        "--tls-ca",
        pem["tls_ca"],
        "--tls-require-client-cert",
        "--tls-server-name",
        "pdserve.internal",
    ]
    for cls in (WorkerConfig, KVStoreConfig, RouterConfig):
        c = resolve(cls, argv)
        assert (c.tls_cert, c.tls_key, c.tls_ca) == (pem["tls_cert"], pem["tls_key"], pem["tls_ca"])
        assert c.tls_require_client_cert is True and c.tls_server_name == "pdserve.internal"


def test_secrets_come_from_the_environment(pem):
    env = {
        "PDSERVE_TLS_CERT": pem["tls_cert"],
        "PDSERVE_TLS_KEY": pem["tls_key"],
        "PDSERVE_TLS_CA": pem["tls_ca"],
        "PDSERVE_TLS_REQUIRE_CLIENT_CERT": "false",
        "PDSERVE_INTERNAL_TOKEN": "tok",
        "PDSERVE_API_KEYS": "k1, k2",
    }
    c = resolve(RouterConfig, env=env)
    assert c.tls_require_client_cert is False and c.internal_token == "tok" and c.api_keys == ["k1", "k2"]
    assert resolve(WorkerConfig, env=env).internal_token == "tok"  # workers ignore PDSERVE_API_KEYS


def test_settings_file_holds_tls_paths_and_token(tmp_path, pem):
    path = tmp_path / "kvstore.toml"
    path.write_text(
        f'tls-cert = "{pem["tls_cert"]}"\ntls_key = "{pem["tls_key"]}"\n'
        f'tls_ca = "{pem["tls_ca"]}"\ninternal_token = "from-file"\n'
    )
    c = resolve(KVStoreConfig, ["--config", str(path)])
    assert c.tls_cert == pem["tls_cert"] and c.internal_token == "from-file"


def test_api_keys_file_holds_one_key_per_line_with_comments(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# team a\nsk-a\n\n  sk-b  \n")
    c = RouterConfig(api_keys_file=str(keys), api_keys=["sk-c"])
    loaded = c.load_api_keys()
    assert len(loaded) == 3
    for key in ("sk-a", "sk-b", "sk-c"):
        loaded.check(f"Bearer {key}")


def test_secrets_stay_out_of_the_config_repr():
    c = RouterConfig(api_keys=["sk-very-secret"], internal_token="tok-very-secret")
    assert "very-secret" not in repr(c)
    assert "tok-very-secret" not in repr(WorkerConfig(internal_token="tok-very-secret"))


def test_defaults_are_open_plaintext():
    for c in (WorkerConfig(), KVStoreConfig(), RouterConfig()):
        assert not c.tls_enabled and c.client_tls() is None and c.server_credentials() is None
        assert not c.internal_token
    assert not RouterConfig().load_api_keys()


# ---- validation ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "settings, message",
    [
        ({"tls_cert": "c"}, "give both or neither"),
        ({"tls_key": "k"}, "give both or neither"),
        ({"tls_require_client_cert": True}, "needs tls_cert, tls_key and tls_ca"),
    ],
)
def test_inconsistent_tls_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        WorkerConfig(**settings)


def test_unreadable_pem_file_is_refused_naming_the_setting(pem, tmp_path):
    with pytest.raises(ValueError, match="tls_ca: cannot read"):
        KVStoreConfig(**{**pem, "tls_ca": str(tmp_path / "missing.pem")})


def test_empty_api_keys_file_is_refused_rather_than_leaving_the_router_open(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# nothing yet\n\n")
    with pytest.raises(ValueError, match="holds no keys"):
        RouterConfig(api_keys_file=str(keys))


def test_bad_setting_from_the_command_line_exits_with_usage(capsys):
    with pytest.raises(SystemExit) as exit_:
        WorkerConfig.from_argv(["--tls-cert", "only-a-cert.pem"], environ={})
    assert exit_.value.code == 2 and "tls_cert and tls_key" in capsys.readouterr().err


# ---- what the settings mean ------------------------------------------------------------
def test_client_certificates_are_required_by_worker_facing_services_by_default(pem):
    assert WorkerConfig(**pem).require_client_cert and KVStoreConfig(**pem).require_client_cert
    assert not RouterConfig(**pem).require_client_cert  # end users need no certificate...
    assert RouterConfig(**pem, tls_require_client_cert=True).require_client_cert  # ...unless told
    assert not WorkerConfig(**pem, tls_require_client_cert=False).require_client_cert
    no_ca = {k: v for k, v in pem.items() if k != "tls_ca"}
    assert not WorkerConfig(**no_ca).require_client_cert  # nothing to verify clients against


def test_a_ca_alone_dials_tls_and_serves_plaintext(pem):
    c = WorkerConfig(tls_ca=pem["tls_ca"], tls_server_name="pdserve.internal")
    assert c.tls_enabled and c.server_credentials() is None
    tls = c.client_tls()
    assert tls.ca == pem["tls_ca"] and not tls.cert
    assert tls.channel_options() == [("grpc.ssl_target_name_override", "pdserve.internal")]


def test_tools_read_the_services_tls_settings_from_the_environment(pem, tmp_path):
    config_file = tmp_path / "router.toml"
    config_file.write_text('mode = "colocated"\n')  # a router setting: not the tool's concern
    c = from_environment(
        {"PDSERVE_TLS_CA": pem["tls_ca"], "PDSERVE_CONFIG": str(config_file), "PDSERVE_INTERNAL_TOKEN": "tok"}
    )
    assert c.client_tls().ca == pem["tls_ca"] and c.internal_token == "tok"


# ---- checks ----------------------------------------------------------------------------
def test_api_key_check_accepts_only_a_bearer_of_a_configured_key():
    keys = ApiKeys(["sk-a", "sk-b"])
    keys.check("Bearer sk-b")
    keys.check("bearer sk-a")  # the scheme is case-insensitive (RFC 7235)
    for header, message in [
        (None, "missing API key"),
        ("", "missing API key"),
        ("sk-a", "malformed"),
        ("Basic sk-a", "malformed"),
        ("Bearer ", "malformed"),
        ("Bearer sk-c", "invalid API key"),
        ("Bearer sk-a2", "invalid API key"),
    ]:
        with pytest.raises(errors.UnauthenticatedError, match=message):
            keys.check(header)


def test_no_api_keys_means_no_check():
    ApiKeys().check(None)
    ApiKeys([""]).check(None)  # an empty entry is no key


def test_internal_token_check():
    check_token("", None)  # none configured: open
    check_token("tok", "tok")
    for given, message in [(None, "missing internal token"), ("", "missing internal token"), ("tik", "invalid")]:
        with pytest.raises(errors.UnauthenticatedError, match=message):
            check_token("tok", given)


def test_router_methods_need_the_api_key_or_the_token_by_who_calls_them():
    auth = RouterConfig(api_keys=["sk-a"], internal_token="tok").authenticator()
    user, worker = {"authorization": "Bearer sk-a"}, {TOKEN_KEY: "tok"}
    auth.check("/pdserve.v1.Router/Generate", user)
    auth.check("/pdserve.v1.Router/ListWorkers", user)
    auth.check("/pdserve.v1.Router/RegisterWorker", worker)
    auth.check("/pdserve.v1.Router/Heartbeat", worker)
    with pytest.raises(errors.UnauthenticatedError, match="internal token"):
        auth.check("/pdserve.v1.Router/RegisterWorker", user)  # a user is no worker
    with pytest.raises(errors.UnauthenticatedError, match="API key"):
        auth.check("/pdserve.v1.Router/Generate", worker)
    for open_method in (
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    ):
        auth.check(open_method, {})


def test_worker_services_need_the_token_on_every_method_but_health():
    auth = SecurityConfig(internal_token="tok").authenticator()
    for method in ("/pdserve.v1.KVStore/ReserveRead", "/pdserve.v1.Decode/Reserve", "/pdserve.v1.Prefill/Prefill"):
        auth.check(method, {TOKEN_KEY: "tok"})
        auth.check(method, {TOKEN_KEY: b"tok"})  # metadata values may arrive as bytes
        with pytest.raises(errors.UnauthenticatedError):
            auth.check(method, {"authorization": "Bearer tok"})
    auth.check("/grpc.health.v1.Health/Check", {})
    Authenticator().check("/pdserve.v1.KVStore/ReserveRead", {})  # no token configured: open


def test_refusals_map_to_unauthenticated_and_a_downstream_refusal_does_not_blame_the_client():
    assert status_code_for(errors.UnauthenticatedError("invalid API key")) == grpc.StatusCode.UNAUTHENTICATED
    downstream = grpc.aio.AioRpcError(
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(("pdserve-error-type", "UnauthenticatedError")),
        details="invalid internal token",
    )
    relayed = relayed_error(downstream)
    assert isinstance(relayed, errors.NotReadyError)  # the router's credentials are wrong: UNAVAILABLE


def test_a_downstream_bug_reaches_the_client_as_internal_and_a_worker_leaving_as_unavailable():
    # After the router's own retries on other workers: UNAVAILABLE would have the SDK call again,
    # three more times over every worker, for a prompt every worker fails the same way.
    def relayed(code):
        return status_code_for(relayed_error(grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata())))

    for bug in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS):
        assert relayed(bug) == grpc.StatusCode.INTERNAL
    assert relayed(grpc.StatusCode.CANCELLED) == grpc.StatusCode.UNAVAILABLE
    assert relayed(grpc.StatusCode.UNAVAILABLE) == grpc.StatusCode.UNAVAILABLE
