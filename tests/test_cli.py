"""The real CLI, driven the way a user drives it: ``python -m gateway ...`` in a subprocess (SPEC §1).

Covers ``--check``, flags and environment variables and their precedence, config discovery,
starting on the built-in default, and bad input (exit 2 with a clear message, never a traceback).
The subprocess harness is tests/support/cli_harness.py; process lifecycle (signals, workers) is in
tests/test_lifecycle.py.
"""

from __future__ import annotations

import socket

import pytest

from tests.support.cli_harness import (
    CLI,
    INVALID_ERRORS,
    INVALID_YAML,
    assert_no_traceback,
    free_port,
    get_json,
    refuses,
)

# ---------------------------------------------------------------- --check


def test_check_valid_file_lists_targets(cli: CLI) -> None:
    cli.write("good.yaml", """\
targets:
  billing: {base_url: "https://billing.example.com/api"}
  llm: {base_url: "https://api.openai.com/v1", provider: openai}
""")
    result = cli.run("--check", "--config", "good.yaml")
    assert result.returncode == 0, result.stderr
    assert "good.yaml" in result.stdout
    assert "billing" in result.stdout and "llm" in result.stdout
    assert_no_traceback(result.stderr)


def test_check_built_in_default_when_no_config_anywhere(cli: CLI) -> None:
    result = cli.run("--check")
    assert result.returncode == 0, result.stderr
    assert "built-in default" in result.stdout
    for target in ("openai", "anthropic", "mistral"):
        assert target in result.stdout


def test_check_warns_of_a_tenant_whose_key_variable_is_not_set(cli: CLI) -> None:
    """The server says it at start (the tenant is locked out): --check says it first."""
    cli.write("t.yaml", "targets: {a: {base_url: 'https://a.example'}}\n"
                        "tenants: [{name: t1, api_key_env: UNSET_TENANT_KEY_VAR}]\n")
    result = cli.run("--check", "--config", "t.yaml")
    assert result.returncode == 0
    assert ("warning: tenants[0].api_key_env: environment variable UNSET_TENANT_KEY_VAR is not set; tenant 't1' "
            "cannot authenticate") in result.stderr


def test_check_refuses_a_workers_setting_the_server_would_refuse(cli: CLI) -> None:
    for args, env, said in ((("--workers", "0"), {}, "--workers: must be at least 1"),
                            ((), {"RELIAPI_WORKERS": "abc"}, "RELIAPI_WORKERS: expected an integer, got 'abc'")):
        result = cli.run("--check", *args, env=env)
        assert result.returncode == 2 and said in result.stderr, result.stderr


def test_check_warns_when_the_admin_api_has_no_key_on_a_non_loopback_address(cli: CLI) -> None:
    """Without a key the admin API answers only direct loopback peers: on 0.0.0.0, '::' or a LAN
    address that is rarely what was meant, so --check (and the server at start) says so."""
    unset = cli.run("--check", "--host", "0.0.0.0")
    assert unset.returncode == 0, unset.stderr
    assert "warning: server.admin_key_env is not set and server.host '0.0.0.0' is not a loopback address" \
        in unset.stderr
    assert "set server.admin_key_env to use it remotely" in unset.stderr
    cli.write("lan.yaml", 'server: {host: "::", admin_key_env: ADMIN_KEY}\n'
                          'targets: {a: {base_url: "https://a.example"}}\n')
    empty = cli.run("--check", "--config", "lan.yaml", env={"ADMIN_KEY": ""})
    assert "warning: server.admin_key_env: ADMIN_KEY is empty and server.host '::'" in empty.stderr
    named = cli.run("--check", "--config", "lan.yaml", env={"RELIAPI_HOST": "gw.internal.example"})
    assert "server.host 'gw.internal.example' is not a loopback address" in named.stderr
    for quiet in (cli.run("--check", "--config", "lan.yaml", env={"ADMIN_KEY": "adm-secret-0123456789"}),
                  cli.run("--check"), cli.run("--check", "--host", "localhost"), cli.run("--check", "--host", "::1")):
        assert quiet.returncode == 0 and "admin" not in quiet.stderr, quiet.stderr


def test_check_invalid_file_lists_every_error_with_its_path(cli: CLI) -> None:
    cli.write("bad.yaml", INVALID_YAML)
    result = cli.run("--check", "--config", "bad.yaml")
    assert result.returncode == 2, result.stdout + result.stderr
    for error in INVALID_ERRORS:
        assert error in result.stderr
    assert "bad.yaml" in result.stderr
    assert result.stdout == ""
    assert_no_traceback(result.stderr)


def test_check_unreadable_and_malformed_files_exit_2(cli: CLI) -> None:
    missing = cli.run("--check", "--config", "nope.yaml")
    assert missing.returncode == 2 and "nope.yaml" in missing.stderr
    assert_no_traceback(missing.stderr)
    cli.write("broken.yaml", "targets: [unclosed\n")
    broken = cli.run("--check", "--config", "broken.yaml")
    assert broken.returncode == 2 and "invalid YAML" in broken.stderr
    assert_no_traceback(broken.stderr)


def test_server_refuses_to_start_on_invalid_config(cli: CLI) -> None:
    cli.write("bad.yaml", INVALID_YAML)
    check = cli.run("--check", "--config", "bad.yaml")
    port = free_port()
    result = cli.run("--config", "bad.yaml", "--port", str(port))
    assert result.returncode == 2, result.stdout + result.stderr
    for error in INVALID_ERRORS:
        assert error in result.stderr
    assert result.stderr == check.stderr  # the same messages as --check
    assert_no_traceback(result.stderr)
    assert refuses(port)


def test_config_sources_precedence_flag_env_discovered(cli: CLI) -> None:
    """--config beats RELIAPI_CONFIG, which beats ./config.yaml."""
    cli.write("config.yaml", "targets: {from_cwd: {base_url: 'https://cwd.example.com'}}\n")
    cli.write("env.yaml", "targets: {from_env: {base_url: 'https://env.example.com'}}\n")
    cli.write("flag.yaml", "targets: {from_flag: {base_url: 'https://flag.example.com'}}\n")
    assert "from_cwd" in cli.run("--check").stdout
    assert "from_env" in cli.run("--check", env={"RELIAPI_CONFIG": "env.yaml"}).stdout
    assert "from_flag" in cli.run("--check", "--config", "flag.yaml", env={"RELIAPI_CONFIG": "env.yaml"}).stdout


# ---------------------------------------------------------------- serving


def test_starts_on_built_in_default_without_any_config(cli: CLI) -> None:
    port = free_port()
    gw = cli.start("--port", str(port), port=port)
    gw.wait_healthy()
    assert get_json(port, "/healthz")[0] == 200
    status, body = get_json(port, "/readyz")
    assert status == 200, body
    assert body["store"] == "memory"
    assert sorted(body["targets"]) == ["anthropic", "mistral", "openai"]
    startup = [m for m in gw.messages() if "listening on" in m]
    assert len(startup) == 1, gw.output
    assert f"127.0.0.1:{port}" in startup[0]
    for target in ("openai", "anthropic", "mistral"):
        assert target in startup[0]
    assert gw.terminate() == 0, gw.output
    assert_no_traceback(gw.stderr)


def test_port_precedence_flag_beats_env_beats_file(cli: CLI) -> None:
    p_file, p_env, p_flag = free_port(), free_port(), free_port()
    cli.write("ports.yaml", f"server: {{port: {p_file}}}\n")

    from_env = cli.start("--config", "ports.yaml", env={"RELIAPI_PORT": str(p_env)}, port=p_env)
    from_env.wait_healthy()
    assert refuses(p_file)
    assert from_env.terminate() == 0, from_env.output

    from_flag = cli.start("--config", "ports.yaml", "--port", str(p_flag), env={"RELIAPI_PORT": str(p_env)},
                          port=p_flag)
    from_flag.wait_healthy()
    assert refuses(p_env) and refuses(p_file)
    assert from_flag.terminate() == 0, from_flag.output


def test_healthcheck_asks_the_port_the_server_would_listen_on(cli: CLI) -> None:
    """The image's HEALTHCHECK: PORT (the seed's variable) and server.port count as they do for the server."""
    port, other = free_port(), free_port()
    cli.write("config.yaml", f"server: {{port: {other}}}\n")
    gw = cli.start(env={"PORT": str(port)}, port=port)
    gw.wait_healthy()
    assert cli.run("--healthcheck", env={"PORT": str(port)}).returncode == 0
    unhealthy = cli.run("--healthcheck")  # the file's port: nobody listens there
    assert unhealthy.returncode == 1 and f":{other}/healthz" in unhealthy.stderr
    assert_no_traceback(unhealthy.stderr)
    assert gw.terminate() == 0, gw.output


def test_discovers_config_yaml_in_working_directory(cli: CLI) -> None:
    port = free_port()
    cli.write("config.yaml", f"""\
server: {{port: {port}}}
targets: {{only_one: {{base_url: "https://x.example.com"}}}}
""")
    gw = cli.start(port=port)
    gw.wait_healthy()
    status, body = get_json(port, "/readyz")
    assert status == 200 and body["targets"] == ["only_one"]
    assert any("config.yaml" in m for m in gw.messages() if "listening on" in m), gw.output
    assert gw.terminate() == 0, gw.output

# ---------------------------------------------------------------- bad flags and environment


def test_bad_log_level_flag_exits_2(cli: CLI) -> None:
    result = cli.run("--log-level", "nope")
    assert result.returncode == 2
    assert "--log-level" in result.stderr and "nope" in result.stderr
    assert_no_traceback(result.stderr)


def test_log_level_flag_is_read_in_any_case(cli: CLI) -> None:
    """``--log-level INFO`` as ``LOG_LEVEL=INFO`` (seeds 003/004 write it in capitals): accepted, not refused."""
    result = cli.run("--log-level", "WARNING", "--check")
    assert result.returncode == 0, result.stderr
    assert_no_traceback(result.stderr)


def test_bad_log_level_env_exits_2(cli: CLI) -> None:
    result = cli.run("--port", str(free_port()), env={"LOG_LEVEL": "nope"})
    assert result.returncode == 2
    assert "LOG_LEVEL" in result.stderr and "nope" in result.stderr
    assert_no_traceback(result.stderr)


def test_non_numeric_port_env_exits_2(cli: CLI) -> None:
    result = cli.run(env={"RELIAPI_PORT": "abc"})
    assert result.returncode == 2
    assert "RELIAPI_PORT" in result.stderr and "abc" in result.stderr
    assert_no_traceback(result.stderr)


def test_non_numeric_port_flag_exits_2(cli: CLI) -> None:
    result = cli.run("--port", "abc")
    assert result.returncode == 2
    assert "--port" in result.stderr
    assert_no_traceback(result.stderr)


@pytest.mark.parametrize(("args", "env", "name"), [
    (("--port", "70000"), {}, "--port"),
    ((), {"RELIAPI_PORT": "-5"}, "RELIAPI_PORT"),
    (("--check",), {"RELIAPI_PORT": "65536"}, "RELIAPI_PORT"),
])
def test_out_of_range_port_exits_2(cli: CLI, args: tuple[str, ...], env: dict[str, str], name: str) -> None:
    result = cli.run(*args, env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"{name}: expected a port number 0-65535" in result.stderr
    assert "listening on" not in result.stdout
    assert_no_traceback(result.stderr)


def test_port_in_use_exits_1_with_clear_message(cli: CLI) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        result = cli.run("--port", str(port))
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in result.stdout
    assert_no_traceback(result.stderr)
