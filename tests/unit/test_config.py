"""Specification of pdserve.common.config: one scheme for every service's config."""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from pdserve.common.config import ArgumentParser, ServiceConfig, SettingError, UsageError, load_config_file, option


@dataclass(frozen=True)
class DemoConfig(ServiceConfig):
    """A config using every supported field type."""

    host: str = "127.0.0.1"
    port: int = option(50051, help="gRPC port")
    max_batch_tokens: int = 2048
    kv_fraction: float = 0.9
    enable_prefix_cache: bool = True
    seed: Optional[int] = None
    mode: Literal["disaggregated", "colocated"] = "disaggregated"
    peers: list[str] = field(default_factory=list)

    def validate(self) -> None:
        if not 0.0 < self.kv_fraction <= 1.0:
            raise SettingError("kv_fraction", "must be in (0, 1]")


def resolve(argv=(), env=None, cls=DemoConfig):
    parser = cls.add_cli_args(argparse.ArgumentParser())
    return cls.from_cli_args(parser.parse_args(list(argv)), environ=env or {})


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_defaults_come_from_the_dataclass():
    assert resolve() == DemoConfig()


def test_flags_are_kebab_case_and_typed():
    config = resolve(
        [
            "--max-batch-tokens",
            "4096",
            "--kv-fraction",
            "0.5",
            "--no-enable-prefix-cache",
            "--seed",
            "7",
            "--mode",
            "colocated",
            "--peers",
            "a:1",
            "b:2",
        ]
    )
    assert config.max_batch_tokens == 4096 and config.kv_fraction == 0.5
    assert config.enable_prefix_cache is False and config.seed == 7
    assert config.mode == "colocated" and config.peers == ["a:1", "b:2"]


def test_environment_fallback_is_prefixed_upper_case():
    env = {
        "PDSERVE_PORT": "6000",
        "PDSERVE_ENABLE_PREFIX_CACHE": "off",
        "PDSERVE_PEERS": "a:1, b:2",
        "PDSERVE_SEED": "none",
    }
    config = resolve(env=env)
    assert config.port == 6000 and config.enable_prefix_cache is False
    assert config.peers == ["a:1", "b:2"] and config.seed is None


@pytest.mark.parametrize(
    "suffix, text",
    [
        (".toml", 'port = 7000\nmax-batch-tokens = 512\npeers = ["x:1"]\nkv_fraction = 1\n'),
        (".json", json.dumps({"port": 7000, "max_batch_tokens": 512, "peers": ["x:1"], "kv_fraction": 1})),
    ],
)
def test_config_file_in_toml_or_json(tmp_path, suffix, text):
    path = write(tmp_path, "pdserve" + suffix, text)
    config = resolve(["--config", path])
    assert (config.port, config.max_batch_tokens, config.peers) == (7000, 512, ["x:1"])
    assert config.kv_fraction == 1.0 and isinstance(config.kv_fraction, float)


def test_config_file_can_be_named_by_environment(tmp_path):
    path = write(tmp_path, "c.toml", "port = 7001\n")
    assert resolve(env={"PDSERVE_CONFIG": path}).port == 7001


def test_precedence_is_flag_then_env_then_file_then_default(tmp_path):
    path = write(tmp_path, "c.toml", "port = 1\nmax_batch_tokens = 1\nkv_fraction = 0.1\n")
    env = {"PDSERVE_PORT": "2", "PDSERVE_MAX_BATCH_TOKENS": "2"}
    config = resolve(["--config", path, "--port", "3"], env)
    assert config.port == 3  # flag beats env and file
    assert config.max_batch_tokens == 2  # env beats file
    assert config.kv_fraction == 0.1  # file beats default
    assert config.host == "127.0.0.1"  # default when nothing else says


def test_an_explicit_flag_wins_even_when_it_equals_the_default():
    assert resolve(["--port", "50051"], {"PDSERVE_PORT": "9"}).port == 50051


def test_empty_list_flag_overrides_a_fallback():
    assert resolve(["--peers"], {"PDSERVE_PEERS": "a,b"}).peers == []


@pytest.mark.parametrize(
    "env, message",
    [
        ({"PDSERVE_PORT": "eighty"}, "PDSERVE_PORT: expected int"),
        ({"PDSERVE_ENABLE_PREFIX_CACHE": "maybe"}, "PDSERVE_ENABLE_PREFIX_CACHE: expected a boolean"),
        ({"PDSERVE_MODE": "both"}, "PDSERVE_MODE: expected one of"),
    ],
)
def test_bad_environment_values_raise_value_error_naming_the_variable(env, message):
    with pytest.raises(ValueError, match=message):
        resolve(env=env)


@pytest.mark.parametrize(
    "text, message",
    [
        ("port = true\n", "expected int"),  # bool is not an int in a config file
        ("port = 1.5\n", "expected int"),
        ('peers = "a"\nprot = 1\n', r"unknown settings \['prot'\]"),  # typos fail loudly
    ],
)
def test_bad_file_values_raise_value_error(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        resolve(["--config", write(tmp_path, "c.toml", text)])


def test_unsupported_or_unreadable_files_raise_value_error(tmp_path):
    with pytest.raises(ValueError, match="use a .toml or .json"):
        load_config_file(write(tmp_path, "c.yaml", "port: 1\n"))
    with pytest.raises(ValueError, match="c.toml"):
        load_config_file(write(tmp_path, "c.toml", "port = \n"))
    with pytest.raises(ValueError, match="No such file"):
        load_config_file(tmp_path / "absent.json")


def test_validate_hook_runs_on_every_construction():
    with pytest.raises(ValueError, match="kv-fraction"):
        resolve(["--kv-fraction", "1.5"])
    with pytest.raises(ValueError, match="kv_fraction"):
        DemoConfig(kv_fraction=0.0)


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        DemoConfig().port = 1  # type: ignore[misc]


def test_bad_flag_value_exits_with_usage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        DemoConfig.from_argv(["--port", "x"], environ={})
    assert exit_info.value.code == 2
    assert "--port" in capsys.readouterr().err


def test_from_argv_reports_validation_errors_as_usage_errors(capsys):
    with pytest.raises(SystemExit):
        DemoConfig.from_argv(["--kv-fraction", "2"], environ={})
    assert "--kv-fraction / PDSERVE_KV_FRACTION: must be in (0, 1], got 2.0" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, env, text, message",
    [
        (["--kv-fraction", "2"], {}, "", r"^--kv-fraction / PDSERVE_KV_FRACTION: must be in \(0, 1\], got 2.0$"),
        ([], {"PDSERVE_KV_FRACTION": "2"}, "", r"PDSERVE_KV_FRACTION: .*, got 2.0 \(from the environment\)$"),
        ([], {}, "kv_fraction = 2\n", r"PDSERVE_KV_FRACTION: .*, got 2.0 \(in .*c.toml\)$"),
        ([], {"PDSERVE_PORT": "x"}, "", r"^--port / PDSERVE_PORT: expected int, got 'x' \(from the environment\)"),
        ([], {}, "port = 1.5\n", r"^--port / PDSERVE_PORT: expected int, got 1.5 \(in .*c.toml\)$"),
    ],
)
def test_a_refused_value_names_its_flag_its_variable_and_its_source(tmp_path, argv, env, text, message):
    if text:
        argv = [*argv, "--config", write(tmp_path, "c.toml", text)]
    with pytest.raises(ValueError, match=message):
        resolve(argv, env)


def test_a_plain_value_error_about_a_field_is_given_its_flag_and_variable():
    @dataclass(frozen=True)
    class Plain(ServiceConfig):
        tls_cert: str = ""

        def validate(self) -> None:
            if self.tls_cert:
                raise ValueError("tls_cert and tls_key: give both or neither")

    with pytest.raises(ValueError, match=r"^--tls-cert / PDSERVE_TLS_CERT: tls_cert and tls_key"):
        resolve(["--tls-cert", "c.pem"], cls=Plain)


def test_an_unknown_file_setting_suggests_the_closest_one(tmp_path):
    with pytest.raises(ValueError, match=r"unknown settings \['prot'\] \(did you mean port\?\)"):
        resolve(["--config", write(tmp_path, "c.toml", "prot = 1\n")])


def test_the_one_line_parser_raises_instead_of_printing_the_usage():
    parser = DemoConfig.add_cli_args(ArgumentParser(prog="demo"))
    with pytest.raises(UsageError, match=r"^demo: argument --port: expected int, got 'x'$"):
        parser.parse_args(["--port", "x"])


def test_help_lists_flag_help_default_and_env():
    text = DemoConfig.add_cli_args(argparse.ArgumentParser()).format_help()
    assert "--port PORT" in text and "gRPC port" in text
    assert "PDSERVE_PORT" in text and "50051" in text
    assert "--enable-prefix-cache, --no-enable-prefix-cache" in text


@dataclass(frozen=True)
class RequiredConfig(ServiceConfig):
    model: str


def test_required_fields_must_come_from_somewhere():
    with pytest.raises(ValueError, match="--model / PDSERVE_MODEL"):
        resolve(cls=RequiredConfig)
    assert resolve(env={"PDSERVE_MODEL": "m"}, cls=RequiredConfig).model == "m"


def test_two_configs_can_share_one_parser():
    @dataclass(frozen=True)
    class Other(ServiceConfig):
        other_port: int = 1

    parser = Other.add_cli_args(DemoConfig.add_cli_args(argparse.ArgumentParser()))
    args = parser.parse_args(["--port", "5", "--other-port", "6"])
    assert DemoConfig.from_cli_args(args, {}).port == 5
    assert Other.from_cli_args(args, {}).other_port == 6


def test_a_custom_env_prefix_per_service():
    @dataclass(frozen=True)
    class RouterLike(ServiceConfig):
        env_prefix = "PDSERVE_ROUTER_"
        port: int = 1

    assert resolve(env={"PDSERVE_ROUTER_PORT": "8"}, cls=RouterLike).port == 8


def test_misuse_is_a_type_error_at_definition_time():
    @dataclass
    class NotFrozen(ServiceConfig):
        port: int = 1

    @dataclass(frozen=True)
    class Unsupported(ServiceConfig):
        limits: dict = field(default_factory=dict)

    for cls in (NotFrozen, Unsupported):
        with pytest.raises(TypeError):
            cls.add_cli_args(argparse.ArgumentParser())
