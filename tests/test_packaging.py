"""The container packaging (Dockerfile, .dockerignore, docker-compose.yml) agrees with the code it ships.

No Docker engine runs where the tests run, so nothing here builds an image or starts the stack. What can be
checked without one is drift: a compose variable the relay never reads (pydantic-settings ignores an
``RR_*`` name that matches no top-level setting, so ``RR_OBSERVABILITY_PORT`` with one underscore silently
leaves health and metrics off; a misspelt nested key such as ``RR_KAFKA__BOOTSTRAP_SERVER`` fails only when
the relay starts), a health check on a port the service does not serve, a mounted configuration file that
was renamed, a service the README tells people to look at that the compose file no longer has. Each of
those passes ``docker compose config`` and shows only at run time, on someone else's machine.

The variables the relay reads are derived from :class:`consumer.config.Settings` itself, so a new setting
is accepted here as soon as it exists and a removed one is rejected as soon as it is gone.
"""

from __future__ import annotations

import fnmatch
import inspect
import json
import re
import shlex
import tomllib
import types
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any, Union, get_args, get_origin
from urllib.parse import urlsplit

import pytest
import yaml
from pydantic import BaseModel

from consumer import cli
from consumer.config import ENV_DELIMITER, ENV_PREFIX, RelayConfig, Settings, default_key_env, load
from consumer_dev.emulator import BASE_PATH, parse_shop_option

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
README = ROOT / "README.md"
PYPROJECT = ROOT / "pyproject.toml"

#: The README line that lists the compose services, each name in backticks.
README_SERVICES_PREFIX = "Docker Compose services:"
#: Services running rr-consumer whose RR_* variables must all be ones the code reads.
RR_SERVICES = ("relay", "emulator")
#: The variable that sets the metrics/health port (ObservabilityConfig.port).
PORT_VARIABLE = f"{ENV_PREFIX}OBSERVABILITY{ENV_DELIMITER}PORT"
SCHEMAS_VARIABLE = f"{ENV_PREFIX}SCHEMAS_DIR"


# --- helpers: the files as data ------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    return data


def service(name: str) -> dict[str, Any]:
    services: dict[str, Any] = compose()["services"]
    assert name in services, f"docker-compose.yml has no service {name!r}"
    found: dict[str, Any] = services[name]
    return found


_INTERPOLATION = re.compile(r"\$(?:\$|\{(?P<braced>[^}]*)\}|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")


def interpolate(text: str, host_env: Mapping[str, str]) -> str:
    """Resolve compose's ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}`` and ``$$`` as compose would.

    The tests resolve with an empty host environment: the stack must come up without a .env file, so a
    reference without a default is an error here rather than an empty string at run time.
    """

    def resolve(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        expression = match.group("braced") or match.group("bare") or ""
        parsed = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])(.*))?", expression, re.DOTALL)
        assert parsed, f"cannot read ${{{expression}}}"
        name, operator, word = parsed.group(1), parsed.group(2) or "", parsed.group(3) or ""
        value = host_env.get(name)
        if value is not None and not (value == "" and operator.startswith(":")):
            return word if operator.endswith("+") else value
        if operator.endswith("-"):
            return word
        if operator.endswith("+"):
            return ""
        raise AssertionError(f"${{{expression}}} has no default: the stack would need a .env file")

    return _INTERPOLATION.sub(resolve, text)


def environment(spec: dict[str, Any], host_env: Mapping[str, str] | None = None) -> dict[str, str]:
    """A service's ``environment`` (mapping or ``KEY=VALUE`` list form) as the container would see it."""
    host = host_env or {}
    raw = spec.get("environment") or {}
    pairs: dict[str, str | None] = {}
    if isinstance(raw, list):
        for item in raw:
            key, sep, text = str(item).partition("=")
            pairs[key] = text if sep else None
    else:
        pairs = {str(key): None if value is None else str(value) for key, value in raw.items()}
    resolved: dict[str, str] = {}
    for key, given in pairs.items():
        if given is None:  # `- KEY` alone passes the host's value through
            assert key in host, f"{key} is passed through from the host but has no value without a .env file"
            resolved[key] = host[key]
        else:
            resolved[key] = interpolate(given, host)
    return resolved


def command(spec: dict[str, Any]) -> list[str]:
    raw = spec.get("command")
    if raw is None:
        return dockerfile_cmd()
    words = shlex.split(raw) if isinstance(raw, str) else [str(word) for word in raw]
    return [interpolate(word, {}) for word in words]


def option(words: list[str], name: str) -> list[str]:
    """Every value of ``--name VALUE`` / ``--name=VALUE`` in a command line."""
    values = []
    for index, word in enumerate(words):
        if word == name and index + 1 < len(words):
            values.append(words[index + 1])
        elif word.startswith(name + "="):
            values.append(word.partition("=")[2])
    return values


def compose_services_named(readme: str) -> list[str] | None:
    """The backticked names on the README line starting ``Docker Compose services:``; None without one."""
    for line in readme.splitlines():
        stripped = line.strip().lstrip("-*> ").strip()
        if stripped.startswith(README_SERVICES_PREFIX):
            return re.findall(r"`([^`]+)`", stripped)
    return None


# --- helpers: what the code reads ----------------------------------------------------------------------


def _nested_models(annotation: Any) -> list[type[BaseModel]]:
    """The BaseModel types a field holds directly (``Model`` or ``Model | None``); [] for a leaf."""
    if get_origin(annotation) in (Union, types.UnionType):
        return [model for arm in get_args(annotation) for model in _nested_models(arm)]
    if get_origin(annotation) is None and inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return [annotation]
    return []  # scalars, and dict/list fields, which are set as one JSON value


def settings_variables(
    model: type[BaseModel] = Settings, path: tuple[str, ...] = ()
) -> dict[str, tuple[str, ...]]:
    """``RR_<A>__<B>`` for every leaf setting, mapped to its attribute path: what pydantic-settings reads."""
    names: dict[str, tuple[str, ...]] = {}
    for field_name, field in model.model_fields.items():
        here = (*path, field_name)
        nested = _nested_models(field.annotation)
        for sub_model in nested:
            names.update(settings_variables(sub_model, here))
        if not nested:
            names[ENV_PREFIX + ENV_DELIMITER.join(here).upper()] = here
    return names


def readable_variables(config_file: Path) -> frozenset[str]:
    """Every variable the relay reads when started with ``config_file``: settings plus secret variables."""
    config = tomllib.loads(config_file.read_text(encoding="utf-8"))
    names = set(settings_variables())
    for shop_name, shop in config.get("shops", {}).items():
        names.add(default_key_env(shop_name))
        if shop.get("api_key_env"):
            names.add(shop["api_key_env"])
    registry_auth = config.get("schema_registry", {}).get("basic_auth_user_info_env")
    if registry_auth:
        names.add(registry_auth)
    return frozenset(names)


def unread_variables(names: Iterable[str], readable: frozenset[str]) -> list[str]:
    """The ``RR_*`` names among ``names`` that no setting or secret lookup reads."""
    return sorted(name for name in names if name.startswith(ENV_PREFIX) and name not in readable)


# --- helpers: the Dockerfile ---------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs, continuation lines joined and comment lines dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue  # comments, parser directives and blank lines (also inside a continuation)
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    return instructions


def stages() -> list[tuple[str | None, str, list[tuple[str, str]]]]:
    """Each stage as ``(alias, the image or stage it is FROM, its instructions, FROM included)``."""
    found: list[tuple[str | None, str, list[tuple[str, str]]]] = []
    for keyword, arguments in dockerfile_instructions(DOCKERFILE.read_text(encoding="utf-8")):
        if keyword == "FROM":
            words = [word for word in arguments.split() if not word.startswith("--")]
            alias = words[2].lower() if len(words) >= 3 and words[1].upper() == "AS" else None
            found.append((alias, words[0], [(keyword, arguments)]))
        elif found:
            found[-1][2].append((keyword, arguments))
    assert found, "the Dockerfile has no FROM"
    return found


def stage(name: str | None = None) -> list[tuple[str, str]]:
    """What the image of stage ``name`` (the last, the default target, if None) is made of: the instructions
    of the stages it is built FROM, in order, then its own."""
    by_alias = {entry[0]: entry for entry in stages() if entry[0]}
    current = stages()[-1] if name is None else by_alias.get(name)
    assert current is not None, f"the Dockerfile has no stage {name!r}"
    chain = current[2]
    while current[1].lower() in by_alias:
        current = by_alias[current[1].lower()]
        chain = current[2] + chain
    return chain


def final_stage() -> list[tuple[str, str]]:
    """The instructions of the image ``docker build .`` makes (the last stage, with those it builds on)."""
    return stage()


def dockerfile_env() -> dict[str, str]:
    """The final stage's ENV values (``ENV K=V K2=V2`` and the legacy ``ENV K V``)."""
    values: dict[str, str] = {}
    for keyword, arguments in final_stage():
        if keyword != "ENV":
            continue
        words = shlex.split(arguments)
        if words and "=" not in words[0]:
            values[words[0]] = " ".join(words[1:])
            continue
        for word in words:
            key, _, value = word.partition("=")
            values[key] = value
    return values


def dockerfile_cmd() -> list[str]:
    cmds = [arguments for keyword, arguments in final_stage() if keyword == "CMD"]
    assert cmds, "the Dockerfile has no CMD"
    words: list[str] = json.loads(cmds[-1])  # exec form: a JSON array
    return words


def healthcheck() -> str:
    checks = [arguments for keyword, arguments in final_stage() if keyword == "HEALTHCHECK"]
    assert checks, "the Dockerfile has no HEALTHCHECK"
    return checks[-1]


# --- the README's services -----------------------------------------------------------------------------


def test_readme_services_parser() -> None:
    """The README parser on fixed text, so its behaviour does not depend on the README's current wording."""
    readme = (
        "# rr-consumer\n\n## Docker Compose\n\n"
        "Docker Compose services: `kafka`, `kafka-init`, `schema-registry`, `emulator`, `relay`, "
        "`sample-producer`.\nRun `docker compose up`.\n"
    )
    assert compose_services_named(readme) == [
        "kafka",
        "kafka-init",
        "schema-registry",
        "emulator",
        "relay",
        "sample-producer",
    ]
    assert compose_services_named("- **Docker Compose services:** `relay`") == ["relay"]
    assert compose_services_named("Run `docker compose up`.\n") is None


def test_every_service_the_readme_names_is_in_the_compose_file() -> None:
    if not README.exists():
        pytest.fail(
            "README.md is missing: it should list the compose services on a 'Docker Compose services:' line"
        )
    named = compose_services_named(README.read_text(encoding="utf-8"))
    if not named:
        pytest.fail(
            f"README.md has no line starting {README_SERVICES_PREFIX!r} that lists the services in "
            "backticks, e.g. 'Docker Compose services: `kafka`, `relay`'"
        )
    missing = sorted(set(named) - set(compose()["services"]))
    assert not missing, f"README.md names compose services that docker-compose.yml lacks: {missing}"


# --- environment variables -----------------------------------------------------------------------------


def relay_config_file() -> Path:
    """The repository file the relay service mounts where its ``--config`` points."""
    spec = service("relay")
    words = command(spec)
    config_paths = option(words, "--config")
    assert config_paths, f"the relay's command {words} has no --config"
    target = config_paths[-1]
    for volume in spec.get("volumes", []):
        if isinstance(volume, str):
            source, _, rest = volume.partition(":")
            mount_target = rest.partition(":")[0]
        else:
            source, mount_target = volume.get("source", ""), volume.get("target", "")
        if mount_target == target:
            return (ROOT / source).resolve()
    raise AssertionError(f"the relay mounts nothing at its --config path {target}")


def test_variable_names_follow_the_settings_model() -> None:
    """The derivation gives the names the configuration module documents (RR_<SECTION>__<KEY>)."""
    names = settings_variables()
    assert names["RR_KAFKA__BOOTSTRAP_SERVERS"] == ("kafka", "bootstrap_servers")
    assert names["RR_SCHEMA_REGISTRY__URL"] == ("schema_registry", "url")
    assert names[PORT_VARIABLE] == ("observability", "port")
    assert names[SCHEMAS_VARIABLE] == ("schemas_dir",)
    # dict and list settings are leaves: one JSON value each
    assert {"RR_KAFKA__CLIENT", "RR_TOPICS", "RR_SHOPS"} <= set(names)


def test_a_misspelt_variable_is_rejected() -> None:
    """The subset check must be able to fail, on nested and top-level misspellings alike."""
    readable = readable_variables(relay_config_file())
    assert unread_variables(["RR_KAFKA__BOOTSTRAP_SERVER"], readable) == ["RR_KAFKA__BOOTSTRAP_SERVER"]
    assert unread_variables(["RR_KAFKA_BOOTSTRAP_SERVERS"], readable) == ["RR_KAFKA_BOOTSTRAP_SERVERS"]
    assert unread_variables(["RR_OBSERVABILITY_PORT"], readable) == ["RR_OBSERVABILITY_PORT"]
    assert unread_variables(["RR_API_KEY_NOSUCHSHOP"], readable) == ["RR_API_KEY_NOSUCHSHOP"]
    assert unread_variables(["RR_KAFKA__BOOTSTRAP_SERVERS", "RR_API_KEY_DEMO", "PATH"], readable) == []


@pytest.mark.parametrize("name", RR_SERVICES)
def test_every_rr_variable_given_to_a_service_is_read(name: str) -> None:
    readable = readable_variables(relay_config_file())
    unread = unread_variables(set(environment(service(name))), readable)
    assert not unread, f"service {name!r} sets variables that rr-consumer never reads: {unread}"


def test_every_rr_variable_the_image_sets_is_read() -> None:
    readable = readable_variables(relay_config_file())
    unread = unread_variables(set(dockerfile_env()), readable)
    assert not unread, f"the Dockerfile sets variables that rr-consumer never reads: {unread}"


def relay_container_env() -> dict[str, str]:
    """What the relay container's environment holds: the image's ENV, then the compose overrides."""
    return {**dockerfile_env(), **environment(service("relay"))}


def loaded_relay_config() -> RelayConfig:
    return load(relay_config_file(), environ=relay_container_env())


def test_relay_configuration_loads_and_takes_every_override() -> None:
    """The mounted file plus the container's variables is a valid configuration, each variable landing."""
    config = loaded_relay_config()
    paths = settings_variables()
    for name, value in relay_container_env().items():
        if name not in paths:
            continue
        setting: Any = config.settings
        for part in paths[name]:
            setting = getattr(setting, part)
        assert str(setting) == value, f"{name}={value!r} did not reach {'.'.join(paths[name])} ({setting!r})"


def test_relay_mounts_a_config_file_from_the_repository() -> None:
    """A bind mount of a missing file makes Docker create an empty directory there: the relay fails late."""
    path = relay_config_file()
    assert path.is_file(), f"the relay mounts {path}, which is not a file in the repository"
    assert ROOT in path.parents, f"the relay mounts {path}, outside the repository"


# --- the stack fits together -----------------------------------------------------------------------------


def test_relay_delivers_to_the_emulator_with_a_key_it_accepts() -> None:
    """When the relay points at the emulator, every shop it delivers for is known there with the same key."""
    config = loaded_relay_config()
    base = urlsplit(config.settings.tracking.base_url)
    if base.hostname != "emulator":
        pytest.skip("the relay delivers to the real tracking API")
    emulator = service("emulator")
    words = command(emulator)
    assert option(words, "--port") == [str(base.port)], (
        "the relay's base_url port is not the emulator's --port"
    )
    assert base.path == BASE_PATH, f"the emulator serves {BASE_PATH}, the relay calls {base.path}"
    emulator_env = environment(emulator)
    shops = [parse_shop_option(text, emulator_env) for text in option(words, "--shop")]
    known = {shop.partner_id: shop.api_key for shop in shops}
    for name, shop in config.shops.items():
        assert shop.partner_id in known, (
            f"shop {name}: the emulator does not know partnerId {shop.partner_id}"
        )
        assert known[shop.partner_id] == shop.api_key.get_secret_value(), f"shop {name}: the keys differ"


def test_topics_are_created_and_reachable() -> None:
    """kafka-init creates every topic the relay reads and dead-letters to, on the listener it connects to."""
    config = loaded_relay_config()
    init_words = " ".join(command(service("kafka-init")))
    created = set(re.findall(r"--topic\s+(\S+)", init_words))
    wanted = {topic.name for topic in config.settings.topics} | {
        topic.dlq for topic in config.settings.topics
    }
    assert wanted <= created, f"kafka-init does not create {sorted(wanted - created)}"
    advertised = environment(service("kafka"))["KAFKA_ADVERTISED_LISTENERS"]
    endpoints = {listener.partition("://")[2] for listener in advertised.split(",")}
    assert config.settings.kafka.bootstrap_servers in endpoints
    producer = command(service("sample-producer"))
    assert option(producer, "--bootstrap-servers"), "the sample producer has no --bootstrap-servers"
    assert option(producer, "--bootstrap-servers")[0] in endpoints
    assert set(option(producer, "--topic")) <= {topic.name for topic in config.settings.topics}


@pytest.mark.parametrize("name", ["emulator", "relay", "sample-producer"])
def test_image_commands_are_rr_consumer_commands(name: str) -> None:
    """Each command a compose service gives the image parses with rr-consumer's own argument parser."""
    words = command(service(name))
    try:
        cli.build_parser().parse_args(words)
    except SystemExit as error:
        pytest.fail(
            f"service {name!r}: `rr-consumer {' '.join(words)}` is rejected by the CLI (exit {error.code})"
        )


@pytest.mark.parametrize("name", ["emulator", "relay", "sample-producer"])
def test_image_services_build_from_the_dockerfile(name: str) -> None:
    """The rr-consumer services run this checkout's code, not an image pulled from somewhere."""
    build = service(name).get("build")
    assert build is not None, f"service {name!r} is not built from the repository"
    context = build if isinstance(build, str) else build.get("context", ".")
    dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
    assert (ROOT / context / dockerfile).resolve() == DOCKERFILE


# --- the Dockerfile -------------------------------------------------------------------------------------


def test_dockerfile_runs_as_a_non_root_user() -> None:
    """The relay holds shop API keys and talks to the network: a compromise should not get root."""
    users = [arguments for keyword, arguments in final_stage() if keyword == "USER"]
    assert users, "the final stage has no USER: the service would run as root"
    user = users[-1].partition(":")[0]
    assert user not in ("root", "0"), f"USER {users[-1]} is root"


def test_dockerfile_base_images_are_pinned() -> None:
    """Every external base image names a tag other than latest (or a digest), so rebuilds are repeatable."""
    stages: set[str] = set()
    instructions = dockerfile_instructions(DOCKERFILE.read_text(encoding="utf-8"))
    froms = [arguments for keyword, arguments in instructions if keyword == "FROM"]
    assert froms
    for arguments in froms:
        words = [word for word in arguments.split() if not word.startswith("--")]
        image = words[0]
        if len(words) >= 3 and words[1].upper() == "AS":
            stages.add(words[2].lower())
        if image.lower() in stages or image == "scratch":
            continue
        assert "$" not in image, f"FROM {image}: the base image should be written out, not taken from an ARG"
        tag = image.rpartition("/")[2].partition(":")[2]
        assert "@sha256:" in image or (tag and tag.split("@")[0] != "latest"), f"FROM {image} is not pinned"
    # The runtime image runs the oldest Python the project supports, the one its tests and lint target.
    final_image = final_stage()[0][1].split()[0]
    requires = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]["requires-python"]
    version = re.search(r"\d+\.\d+", requires)
    assert version
    assert final_image.startswith(f"python:{version.group(0)}-"), f"{final_image} is not Python {requires}"


def test_the_image_reads_the_schemas_from_the_package() -> None:
    """The reader schemas are package data in the wheel: the image neither copies them nor points at them."""
    assert SCHEMAS_VARIABLE not in dockerfile_env(), (
        f"the Dockerfile sets {SCHEMAS_VARIABLE}: the schemas come with the package"
    )
    for keyword, arguments in final_stage():
        words = shlex.split(arguments)
        assert not (keyword in ("COPY", "ADD") and any(w.rstrip("/").endswith("schemas") for w in words)), (
            f"{keyword} {arguments}: the schemas come with the package"
        )
        assert not (keyword == "RUN" and "ln -s" in arguments), f"RUN {arguments}: a link into site-packages"


def installs(instructions: list[tuple[str, str]]) -> str:
    """The text of every RUN of ``instructions``: what the stage installs."""
    return " ".join(arguments for keyword, arguments in instructions if keyword == "RUN")


def test_the_default_image_has_no_development_tools_and_the_dev_image_has_them() -> None:
    """``docker build .`` is the production image: the runtime wheel only; ``--target dev`` adds the tools."""
    assert "wheels-dev" not in installs(final_stage()), "the default image installs the development tools"
    assert "rr-consumer" in installs(final_stage())
    assert "wheels-dev" in installs(stage("dev")), "the dev stage does not install rr-consumer-dev"


def build_target(name: str) -> str | None:
    build = service(name).get("build")
    return None if isinstance(build, str) or build is None else build.get("target")


@pytest.mark.parametrize("name", ["emulator", "sample-producer"])
def test_compose_builds_the_dev_image_for_the_development_commands(name: str) -> None:
    """The emulator and the traffic generator are development commands: their services need the dev image."""
    assert command(service(name))[0] in cli.DEV_COMMANDS
    assert build_target(name) == "dev", f"service {name!r} builds target {build_target(name)!r}, not dev"


def test_compose_runs_the_relay_from_the_production_image() -> None:
    """The relay in the stack is the image a platform deploys, not one with the development tools."""
    target = build_target("relay")
    assert target in (None, stages()[-1][0]), f"the relay builds target {target!r}, not the default"


def test_dockerfile_entrypoint_is_the_console_script() -> None:
    """ENTRYPOINT is the installed console script, and the default CMD is a valid ``run`` command."""
    scripts = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]["scripts"]
    entrypoints = [arguments for keyword, arguments in final_stage() if keyword == "ENTRYPOINT"]
    assert entrypoints, "the Dockerfile has no ENTRYPOINT"
    assert json.loads(entrypoints[-1])[0] in scripts
    assert cli.build_parser().parse_args(dockerfile_cmd()).command == "run"


def test_default_cmd_reads_the_file_compose_mounts() -> None:
    """``docker run -v my.toml:/etc/rr-consumer/config.toml`` works like the compose relay does."""
    assert option(dockerfile_cmd(), "--config") == option(command(service("relay")), "--config")


def test_healthcheck_probes_the_port_the_image_serves() -> None:
    """The HEALTHCHECK's port is RR_OBSERVABILITY__PORT's (literally or by reference), and is exposed."""
    check = healthcheck()
    assert not check.upper().startswith("NONE"), "HEALTHCHECK NONE"
    match = re.search(r"https?://(?:127\.0\.0\.1|localhost):(?P<port>[^/'\"\s]+)(?P<path>/[^'\"\s]*)", check)
    assert match, f"no http://127.0.0.1:PORT/... URL in HEALTHCHECK {check}"
    assert match.group("path") == "/healthz"
    env = dockerfile_env()
    assert PORT_VARIABLE in env, (
        f"the Dockerfile does not set {PORT_VARIABLE}: health and metrics would be off"
    )
    port = match.group("port")
    if port.startswith("$"):
        assert port.strip("${}") == PORT_VARIABLE, (
            f"the HEALTHCHECK port comes from {port}, not {PORT_VARIABLE}"
        )
        command_part = check.partition("CMD")[2].strip()
        assert not command_part.startswith("["), (
            "exec-form HEALTHCHECK does not expand variables: use shell form"
        )
    else:
        assert port == env[PORT_VARIABLE], f"HEALTHCHECK port {port}, {PORT_VARIABLE}={env[PORT_VARIABLE]}"
    exposed = {
        word.partition("/")[0]
        for keyword, arguments in final_stage()
        if keyword == "EXPOSE"
        for word in arguments.split()
    }
    assert env[PORT_VARIABLE] in exposed, f"port {env[PORT_VARIABLE]} is not EXPOSEd"


def test_compose_publishes_the_relay_health_port() -> None:
    """The port the relay serves /healthz and /metrics on (after compose's override) is the one published."""
    port = relay_container_env()[PORT_VARIABLE]
    targets = set()
    for published in service("relay").get("ports", []):
        if isinstance(published, dict):
            targets.add(str(published.get("target")))
        else:
            targets.add(str(published).rpartition(":")[2].partition("/")[0])
    assert port in targets, f"the relay serves health and metrics on {port} but publishes {sorted(targets)}"


# --- .dockerignore --------------------------------------------------------------------------------------


def dockerignore_patterns() -> list[str]:
    lines = DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether the build context leaves ``path`` out (last matching pattern wins, ``!`` re-includes).

    Approximates Docker's matcher: a pattern also covers everything under a matched directory.
    """
    result = False
    parts = PurePosixPath(path).parts
    for raw in patterns:
        negated = raw.startswith("!")
        pattern = raw.lstrip("!").strip("/").removeprefix("**/")
        prefixes = ["/".join(parts[: index + 1]) for index in range(len(parts))]
        if any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes) or (
            raw.lstrip("!").startswith("**/") and any(fnmatch.fnmatchcase(part, pattern) for part in parts)
        ):
            result = not negated
    return result


@pytest.mark.parametrize("path", [".venv", ".kafka", ".git"])
def test_dockerignore_excludes_local_state(path: str) -> None:
    """A virtualenv or the local broker's data would bloat every build context (and could hold secrets)."""
    assert ignored(path, dockerignore_patterns()), f".dockerignore does not exclude {path}"
    assert ignored(f"{path}/some/file", dockerignore_patterns())


def test_dockerignore_keeps_what_the_dockerfile_copies() -> None:
    """An over-eager .dockerignore breaks the build (COPY of an excluded path fails) only on a Docker host."""
    patterns = dockerignore_patterns()
    instructions = dockerfile_instructions(DOCKERFILE.read_text(encoding="utf-8"))
    sources = [
        word
        for keyword, arguments in instructions
        if keyword in ("COPY", "ADD") and "--from" not in arguments
        for word in shlex.split(arguments)[:-1]
        if not word.startswith("--")
    ]
    assert sources
    dropped = [source for source in sources if ignored(source.rstrip("/"), patterns)]
    assert not dropped, f".dockerignore leaves out what the Dockerfile copies: {dropped}"
    missing = [source for source in sources if not (ROOT / source).exists()]
    assert not missing, f"the Dockerfile copies files the repository lacks: {missing}"
