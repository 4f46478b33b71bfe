"""The configuration: a bad setting stops the relay with one line naming it; secrets never leave their box.

Every test passes its own ``environ=`` to :func:`consumer.config.load`, so nothing here depends on (or
changes) the environment the suite runs in; only the ``config check`` tests go through the real command
line, which reads ``os.environ``, and they patch it with ``monkeypatch``.
"""

from __future__ import annotations

import os
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumer.cli import main
from consumer.config import RelayConfig, default_key_env, describe, load, load_settings
from consumer.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
MASK = "**********"
KEY = "k-demo-0123456789-secret"
ENV = {"RR_API_KEY_DEMO": KEY}

#: The smallest valid configuration: one JSON topic (no schema registry needed), one shop.
MINIMAL = """
[kafka]
bootstrap_servers = "kafka:9092"

[[topics]]
name = "shop.events"
format = "json"

[shops.demo]
partner_id = "demo"
"""


def write(tmp_path: Path, text: str, name: str = "relay.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load_text(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> RelayConfig:
    return load(write(tmp_path, text), environ=ENV if environ is None else environ)


def config_error(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load_text(tmp_path, text, environ)
    return caught.value


# --- valid configurations ------------------------------------------------------------------------------


def test_the_example_configuration_is_valid() -> None:
    loaded = load(ROOT / "config.example.toml", environ=ENV)
    assert loaded.shops["demo"].api_key.get_secret_value() == KEY
    assert [t.name for t in loaded.settings.topics] == ["shop.events"]


def test_a_minimal_configuration_takes_the_documented_defaults(tmp_path: Path) -> None:
    loaded = load_text(tmp_path, MINIMAL)
    assert loaded.settings.kafka.group_id == "rr-relay"
    assert loaded.settings.delivery.mode == "batch"
    assert loaded.settings.topics[0].dlq == "shop.events.dlq"
    assert loaded.shops["demo"].rate_limit == 50.0


def test_the_in_flight_budget_defaults_by_mode_and_a_setting_wins(tmp_path: Path) -> None:
    """Batch mode needs twice the budget to use every slot of a rate-limited backlog (see config.py)."""
    assert load_text(tmp_path, MINIMAL).settings.delivery.max_in_flight_records == 40_000
    single = load_text(tmp_path, MINIMAL, environ={**ENV, "RR_DELIVERY__MODE": "single"})
    assert single.settings.delivery.max_in_flight_records == 20_000
    text = MINIMAL + '\n[delivery]\nmode = "single"\nmax_in_flight_records = 1234\n'
    assert load_text(tmp_path, text).settings.delivery.max_in_flight_records == 1234
    error = config_error(tmp_path, MINIMAL + "\n[delivery]\nmax_in_flight_records = 0\n")
    assert error.setting == "delivery.max_in_flight_records"


def test_a_shop_without_api_key_env_reads_rr_api_key_of_its_name(tmp_path: Path) -> None:
    assert default_key_env("eu-store.2") == "RR_API_KEY_EU_STORE_2"
    text = MINIMAL.replace("[shops.demo]", "[shops.eu-store]")
    loaded = load_text(tmp_path, text, {"RR_API_KEY_EU_STORE": "eu-key"})
    assert loaded.shops["eu-store"].api_key.get_secret_value() == "eu-key"


def test_an_api_key_file_is_read_and_stripped(tmp_path: Path) -> None:
    key_file = write(tmp_path, f"  {KEY}\n", name="key")
    loaded = load_text(tmp_path, MINIMAL + f'api_key_file = "{key_file}"\n', environ={})
    assert loaded.shops["demo"].api_key.get_secret_value() == KEY


# --- unknown settings ----------------------------------------------------------------------------------


def test_an_unknown_top_level_setting_is_named(tmp_path: Path) -> None:
    error = config_error(tmp_path, "bootstrap_servers = 'kafka:9092'\n" + MINIMAL)
    assert str(error) == "bootstrap_servers: unknown setting"
    assert error.setting == "bootstrap_servers"


def test_an_unknown_nested_setting_is_named_with_its_section(tmp_path: Path) -> None:
    error = config_error(tmp_path, MINIMAL + '\n[delivery]\nmoed = "batch"\n')
    assert str(error) == "delivery.moed: unknown setting"
    assert error.setting == "delivery.moed"


def test_an_unknown_section_is_named(tmp_path: Path) -> None:
    error = config_error(tmp_path, MINIMAL + '\n[delivry]\nmode = "single"\n')
    assert str(error) == "delivry: unknown setting"


# --- wrong types and values ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "line", "setting", "problem"),
    [
        ("delivery", 'batch_max_events = "many"', "delivery.batch_max_events", "valid integer"),
        ("delivery", "batch_max_events = 0", "delivery.batch_max_events", "greater than or equal to 1"),
        ("delivery", 'mode = "bulk"', "delivery.mode", "'batch' or 'single'"),
        ("tracking", 'verify_tls = "perhaps"', "tracking.verify_tls", "valid boolean"),
        ("kafka", "consume_batch = 1.5", "kafka.consume_batch", "integer"),
        ("observability", "port = 70000", "observability.port", "less than or equal to 65535"),
    ],
)
def test_a_wrong_type_or_value_is_named(
    tmp_path: Path, section: str, line: str, setting: str, problem: str
) -> None:
    text = MINIMAL.replace("[kafka]\n", f"[kafka]\n{line}\n") if section == "kafka" else MINIMAL
    if section != "kafka":
        text += f"\n[{section}]\n{line}\n"
    error = config_error(tmp_path, text)
    assert error.setting == setting
    assert problem in error.problem


def test_a_missing_required_section_is_named(tmp_path: Path) -> None:
    error = config_error(tmp_path, MINIMAL.split("[shops.demo]")[0])
    assert str(error) == "shops: is required"


def test_every_problem_is_counted_though_only_the_first_is_spelled_out(tmp_path: Path) -> None:
    error = config_error(tmp_path, MINIMAL + '\n[delivery]\nmode = "bulk"\nbatch_max_events = 0\n')
    assert "(and 1 more problem(s))" in str(error)
    assert len(str(error).splitlines()) == 1


# --- secrets -------------------------------------------------------------------------------------------


def test_a_missing_api_key_names_the_setting_and_the_variable(tmp_path: Path) -> None:
    error = config_error(tmp_path, MINIMAL, environ={})
    assert error.setting == "shops.demo.api_key_env"
    assert "RR_API_KEY_DEMO" in error.problem


def test_the_settings_alone_need_no_key_but_still_refuse_a_bad_setting(tmp_path: Path) -> None:
    """What ``replay`` and ``dlq inspect`` load: they never call the API, so no key is asked for."""
    settings = load_settings(write(tmp_path, MINIMAL), environ={"RR_DELIVERY__MODE": "single"})
    assert settings.delivery.mode == "single"
    assert list(settings.shops) == ["demo"]
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, MINIMAL), environ={"RR_DELIVRY__MODE": "single"})
    assert caught.value.setting == "RR_DELIVRY__MODE"


def test_a_blank_api_key_counts_as_missing_and_a_custom_variable_is_named(tmp_path: Path) -> None:
    text = MINIMAL + 'api_key_env = "DEMO_KEY"\n'
    error = config_error(tmp_path, text, environ={"DEMO_KEY": "   ", "RR_API_KEY_DEMO": KEY})
    assert str(error) == "shops.demo.api_key_env: environment variable DEMO_KEY is not set or empty"


def test_an_api_key_written_in_the_file_is_refused_with_the_reason_and_not_repeated(tmp_path: Path) -> None:
    error = config_error(tmp_path, MINIMAL + f'api_key = "{KEY}"\n')
    assert error.setting == "shops.demo"
    assert "api_key must not be written in the configuration" in error.problem
    assert "api_key_env" in error.problem
    assert "api_key_file" in error.problem
    assert KEY not in str(error)


def test_an_api_key_given_as_an_environment_override_is_refused_too(tmp_path: Path) -> None:
    error = config_error(tmp_path, MINIMAL, environ={**ENV, "RR_SHOPS__DEMO__API_KEY": "leaked-key-text"})
    assert error.setting == "shops.demo"
    assert "leaked-key-text" not in str(error)


def test_a_key_from_both_a_variable_and_a_file_is_ambiguous(tmp_path: Path) -> None:
    text = MINIMAL + 'api_key_env = "DEMO_KEY"\napi_key_file = "/run/secrets/demo"\n'
    error = config_error(tmp_path, text)
    assert str(error) == "shops.demo: give api_key_env or api_key_file, not both"


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_an_unreadable_api_key_file_is_named_with_the_path_and_the_reason(tmp_path: Path, kind: str) -> None:
    # A directory stands in for a file without read permission: the suite may run as root, which reads all.
    path = tmp_path / "no-such-key" if kind == "missing" else tmp_path
    error = config_error(tmp_path, MINIMAL + f'api_key_file = "{path}"\n', environ={})
    assert error.setting == "shops.demo.api_key_file"
    assert f"cannot read {path}" in error.problem
    assert ("No such file" if kind == "missing" else "Is a directory") in error.problem


def test_an_empty_api_key_file_is_refused(tmp_path: Path) -> None:
    key_file = write(tmp_path, "\n", name="key")
    error = config_error(tmp_path, MINIMAL + f'api_key_file = "{key_file}"\n', environ={})
    assert str(error) == f"shops.demo.api_key_file: {key_file} is empty"


def test_the_schema_registry_credentials_variable_must_be_set(tmp_path: Path) -> None:
    text = MINIMAL + '\n[schema_registry]\nbasic_auth_user_info_env = "REGISTRY_AUTH"\n'
    error = config_error(tmp_path, text)
    assert error.setting == "schema_registry.basic_auth_user_info_env"
    assert "REGISTRY_AUTH" in error.problem


# --- impossible combinations ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "names"),
    [
        pytest.param(
            MINIMAL.replace('format = "json"', 'format = "confluent-avro"'),
            "schema_registry.url",
            id="confluent-avro-without-registry",
        ),
        pytest.param(
            MINIMAL + '\n[delivery]\ndefault_shop = "nope"\n', "delivery.default_shop", id="default-shop"
        ),
        pytest.param(
            MINIMAL.replace('format = "json"', 'format = "avro"'), "record_name", id="avro-no-record"
        ),
        pytest.param(
            MINIMAL + "\n[retry]\nbase_s = 5.0\ncap_s = 1.0\n", "retry.cap_s", id="retry-cap-below-base"
        ),
        pytest.param(
            MINIMAL + '\n[[topics]]\nname = "shop.events"\nformat = "json"\n',
            "topics",
            id="topic-listed-twice",
        ),
    ],
)
def test_an_impossible_combination_names_the_setting_to_fix(tmp_path: Path, text: str, names: str) -> None:
    error = config_error(tmp_path, text)
    assert names in str(error)
    assert len(str(error).splitlines()) == 1


def test_raw_avro_without_a_record_name_names_the_topic_entry(tmp_path: Path) -> None:
    error = config_error(tmp_path, MINIMAL.replace('format = "json"', 'format = "avro"'))
    assert error.setting == "topics.0"
    assert "raw Avro carries no schema id" in error.problem


# --- the file itself -----------------------------------------------------------------------------------


def test_invalid_toml_names_the_config_option_and_the_file(tmp_path: Path) -> None:
    error = config_error(tmp_path, MINIMAL + "\n[delivery\n")
    assert error.setting == "--config"
    assert "is not valid TOML" in error.problem
    assert str(tmp_path / "relay.toml") in error.problem


def test_a_missing_file_names_the_config_option(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path / "absent.toml", environ=ENV)
    assert str(caught.value) == f"--config: no such file: {tmp_path / 'absent.toml'}"


# --- environment overrides -----------------------------------------------------------------------------


def test_environment_overrides_win_over_the_file(tmp_path: Path) -> None:
    text = MINIMAL + '\n[delivery]\nmode = "batch"\nbatch_max_events = 100\n'
    environ = {**ENV, "RR_DELIVERY__MODE": "single", "RR_KAFKA__BOOTSTRAP_SERVERS": "other:9093"}
    loaded = load_text(tmp_path, text, environ)
    assert loaded.settings.delivery.mode == "single"
    assert loaded.settings.delivery.batch_max_events == 100, "the rest of the section stays as the file says"
    assert loaded.settings.kafka.bootstrap_servers == "other:9093"


def test_static_membership_is_off_by_default_and_takes_its_name_from_the_environment(tmp_path: Path) -> None:
    from consumer.intake import consumer_config

    dynamic = consumer_config(load_text(tmp_path, MINIMAL).settings)
    assert "group.instance.id" not in dynamic
    assert dynamic["enable.auto.commit"] is False, "the relay commits, librdkafka never does on its own"
    pod = load_text(tmp_path, MINIMAL, {**ENV, "RR_KAFKA__GROUP_INSTANCE_ID": "rr-relay-7f9c-2"})
    assert consumer_config(pod.settings)["group.instance.id"] == "rr-relay-7f9c-2"


def test_a_bad_environment_override_is_named(tmp_path: Path) -> None:
    error = config_error(tmp_path, MINIMAL, environ={**ENV, "RR_DELIVERY__MODE": "singel"})
    assert error.setting == "delivery.mode"


def test_a_misspelled_nested_environment_override_is_rejected_naming_it(tmp_path: Path) -> None:
    error = config_error(tmp_path, MINIMAL, environ={**ENV, "RR_DELIVERY__MOED": "single"})
    assert str(error) == "delivery.moed: unknown setting"


@pytest.mark.parametrize("variable", ["RR_DELIVRY__MODE", "RR_DELIVERY_MODE"])
def test_a_misspelled_section_in_an_environment_override_is_rejected_naming_the_variable(
    tmp_path: Path, variable: str
) -> None:
    error = config_error(tmp_path, MINIMAL, environ={**ENV, variable: "single"})
    assert variable in str(error)


def test_the_given_environ_is_the_only_environment_read_and_os_environ_is_left_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RR_DELIVERY__MODE", "single")
    before = dict(os.environ)
    loaded = load_text(tmp_path, MINIMAL, {**ENV, "RR_TRACKING__CONCURRENCY": "8"})
    assert loaded.settings.delivery.mode == "batch", "os.environ's override must not leak into environ="
    assert loaded.settings.tracking.concurrency == 8
    assert dict(os.environ) == before


# --- describe(): the effective configuration, secrets masked -------------------------------------------


def test_describe_masks_every_shop_key_and_the_registry_credentials(tmp_path: Path) -> None:
    text = MINIMAL + '\n[shops.other]\npartner_id = "other"\napi_key_env = "OTHER_KEY"\n'
    text += '\n[schema_registry]\nbasic_auth_user_info_env = "REGISTRY_AUTH"\n'
    environ = {**ENV, "OTHER_KEY": "other-key-text-42", "REGISTRY_AUTH": "user:registry-password-7"}
    shown = describe(load_text(tmp_path, text, environ))
    assert KEY not in shown
    assert "other-key-text-42" not in shown
    assert "registry-password-7" not in shown
    assert shown.count(MASK) == 3


def test_describe_masks_kafka_client_passwords(tmp_path: Path) -> None:
    text = MINIMAL.replace(
        "[kafka]\n",
        '[kafka]\nclient = { "sasl.username" = "relay", "sasl.password" = "sasl-pw-31337", '
        '"ssl.key.password" = "tls-pw-4242" }\n',
    )
    shown = describe(load_text(tmp_path, text))
    assert "sasl-pw-31337" not in shown
    assert "tls-pw-4242" not in shown
    assert '"relay"' in shown, "what is not secret is still shown"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.text(alphabet=string.ascii_letters + string.digits, min_size=16, max_size=64))
def test_describe_never_shows_an_api_key_whatever_it_is(tmp_path: Path, key: str) -> None:
    # 16+ letters and digits in a row occur nowhere else in the output, so a hit can only be the key.
    shown = describe(load_text(tmp_path, MINIMAL, {"RR_API_KEY_DEMO": key}))
    assert key not in shown
    assert MASK in shown


# --- rr-consumer config check --------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """The command line reads os.environ: start it without any RR_ variable of the machine running tests."""
    for name in list(os.environ):
        if name.startswith("RR_"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_config_check_offline_prints_the_masked_configuration_says_what_it_skipped_and_exits_0(
    tmp_path: Path, clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clean_env.setenv("RR_API_KEY_DEMO", KEY)
    status = main(["config", "check", "--offline", "--config", str(write(tmp_path, MINIMAL))])
    out, err = capsys.readouterr()
    assert (status, err) == (0, "")
    assert MASK in out
    assert KEY not in out
    assert "shop.events" in out
    assert out.splitlines()[-1] == (
        "skipped: brokers, topics, dead-letter topics, schema registry (--offline)"
    )


@pytest.mark.parametrize(
    ("section", "setting", "url", "problem"),
    [
        ("schema_registry", "url", "127.0.0.1:8081", "must start with http:// or https://"),
        ("schema_registry", "url", "http:///subjects", "names no host"),
        ("tracking", "base_url", "apptracking.retailrocket.net/1.0/", "must start with http:// or https://"),
        ("tracking", "base_url", "http://localhost:80x/1.0/", "is not a valid URL"),
    ],
)
def test_a_url_without_a_scheme_or_host_is_refused_naming_the_setting(
    tmp_path: Path, section: str, setting: str, url: str, problem: str
) -> None:
    text = MINIMAL + f'\n[{section}]\n{setting} = "{url}"\n'
    with pytest.raises(ConfigError) as caught:
        load(write(tmp_path, text), ENV)
    assert caught.value.setting == f"{section}.{setting}"
    assert problem in caught.value.problem


def test_a_password_written_into_a_url_is_masked_in_the_error(tmp_path: Path) -> None:
    text = MINIMAL + '\n[tracking]\nbase_url = "ftp://user:hunter2@example.com/"\n'
    with pytest.raises(ConfigError) as caught:
        load(write(tmp_path, text), ENV)
    assert "hunter2" not in str(caught.value)
    assert f"user:{MASK}@example.com" in str(caught.value)


@pytest.mark.parametrize(
    ("text", "environ", "line"),
    [
        (MINIMAL + '\n[delivery]\nmoed = "batch"\n', ENV, "delivery.moed: unknown setting"),
        (MINIMAL, {}, "shops.demo.api_key_env: environment variable RR_API_KEY_DEMO is not set or empty"),
        (MINIMAL, {**ENV, "RR_DELIVERY__MODE": "bulk"}, "delivery.mode: Input should be 'batch' or 'single'"),
    ],
)
def test_config_check_of_an_invalid_configuration_exits_2_with_one_line(
    tmp_path: Path,
    clean_env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    text: str,
    environ: dict[str, str],
    line: str,
) -> None:
    for name, value in environ.items():
        clean_env.setenv(name, value)
    status = main(["config", "check", "--config", str(write(tmp_path, text))])
    out, err = capsys.readouterr()
    assert status == 2
    assert out == ""
    assert err.splitlines() == [f"rr-consumer: configuration error: {line}"]
