"""The Helm chart (``deploy/helm/rr-consumer``) agrees with the relay it deploys.

No cluster runs where the tests run, so what is checked is what ``helm lint`` and ``helm template`` show: the
chart renders, for its default values and for every option turned on (``ci/all-on-values.yaml``), into
objects tied to the code rather than to numbers written twice. The configuration a pod mounts is loaded with
the relay's own loader; the probes must name the paths :mod:`consumer.health` serves on the port that
configuration sets; the pod must be given longer to stop than the relay's revoke and shutdown graces; KEDA
must measure the lag of the relay's own group on its own topics, never scale past the partitions, and keep
one relay up by default; no rendered object may hold a secret.

Helm is built from its Go module into the cache by ``tools/helm.sh`` (``make test`` starts that build in the
background, so it overlaps the suite; the fixture waits for it with a deadline).
"""

from __future__ import annotations

import os
import signal
import subprocess
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import yaml

from consumer import __version__, cli
from consumer.config import Settings, default_key_env, load_settings
from consumer.health import LIVENESS_PATH, METRICS_PATH, READINESS_PATH

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy" / "helm" / "rr-consumer"
ALL_ON = CHART / "ci" / "all-on-values.yaml"
VALUES = {"default": None, "all-on": ALL_ON}
#: The longest the fixture waits for tools/helm.sh (a cold build took about 2 minutes here), shorter than
#: the suite's per-test timeout so this line, not a stack dump, says what took too long.
HELM_DEADLINE_S = 480
#: Variable names that hold a secret, as far as a name can tell; none may carry a literal value.
SECRET_WORDS = ("API_KEY", "PASSWORD", "SECRET", "TOKEN", "AUTH", "CREDENTIAL")
#: Settings whose values are secrets; none may appear in the rendered configuration.
SECRET_SETTINGS = ("api_key", "sasl.password", "basic.auth.user.info", "ssl.key.password")


# --- helm itself ------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def helm() -> Path:
    process = subprocess.Popen(
        ["bash", str(ROOT / "tools" / "helm.sh")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own group, so a timeout stops the Go build under it too
    )
    try:
        out, err = process.communicate(timeout=HELM_DEADLINE_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGTERM)
        process.communicate()
        pytest.fail(f"tools/helm.sh did not provide Helm within {HELM_DEADLINE_S}s")
    if process.returncode != 0:
        pytest.fail(f"tools/helm.sh failed (exit {process.returncode}): {err.strip()[-2000:]}")
    binary = Path(out.strip().splitlines()[-1])
    assert binary.is_file(), f"tools/helm.sh printed {binary}, which is no file"
    return binary


def helm_run(helm: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(helm), *args], capture_output=True, text=True, timeout=120, check=False, cwd=ROOT
    )


def values_args(values: Path | None, sets: Iterable[str] = ()) -> list[str]:
    args = ["-f", str(values)] if values else []
    for item in sets:
        args += ["--set", item]
    return args


def render(helm: Path, values: Path | None = None, *sets: str) -> list[dict[str, Any]]:
    done = helm_run(helm, "template", "relay", str(CHART), *values_args(values, sets))
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def refusal(helm: Path, values: Path | None = None, *sets: str) -> str:
    """The error ``helm template`` stops with (the test fails if it renders)."""
    done = helm_run(helm, "template", "relay", str(CHART), *values_args(values, sets))
    assert done.returncode != 0, f"rendered although it should be refused: {sets}"
    return done.stderr


def only(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [obj for obj in objects if obj["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def kinds(objects: list[dict[str, Any]]) -> set[str]:
    return {obj["kind"] for obj in objects}


def container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    containers = only(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    found: dict[str, Any] = containers[0]
    return found


def relay_settings(objects: list[dict[str, Any]], folder: Path) -> Settings:
    """The configuration the pods mount, loaded as the relay loads it (no RR_* override from this process)."""
    data = only(objects, "ConfigMap")["data"]
    assert list(data) == ["config.toml"]
    path = folder / "config.toml"
    path.write_text(data["config.toml"], encoding="utf-8")
    return load_settings(path, environ={})


# --- lint, and the chart's metadata ---------------------------------------------------------------------


@pytest.mark.parametrize("values", VALUES.values(), ids=VALUES.keys())
def test_helm_lint_passes(helm: Path, values: Path | None) -> None:
    done = helm_run(helm, "lint", "--strict", str(CHART), *values_args(values))
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_chart_deploys_this_version_of_the_relay() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text(encoding="utf-8"))
    assert chart["appVersion"] == __version__


@pytest.mark.parametrize("values", VALUES.values(), ids=VALUES.keys())
def test_the_rendered_configuration_is_one_the_relay_accepts(
    helm: Path, values: Path | None, tmp_path: Path
) -> None:
    settings = relay_settings(render(helm, values), tmp_path)
    assert settings.topics
    assert settings.observability.port is not None


def test_every_option_on_renders_every_object() -> None:
    """The all-on values do turn everything on, so the tests that use them check every template."""
    values = yaml.safe_load(ALL_ON.read_text(encoding="utf-8"))
    assert values["serviceMonitor"]["enabled"]
    assert values["podDisruptionBudget"]["enabled"]
    assert values["autoscaling"]["enabled"]
    assert values["secretEnv"]
    assert values["extraEnv"]


def test_the_optional_objects_are_off_by_default_and_on_when_asked(helm: Path) -> None:
    default = kinds(render(helm))
    assert {"ConfigMap", "Deployment", "Service", "PodDisruptionBudget"} <= default
    assert not {"ServiceMonitor", "ScaledObject", "Secret"} & default
    assert {"ServiceMonitor", "ScaledObject"} <= kinds(render(helm, ALL_ON))


# --- the pod and the relay ------------------------------------------------------------------------------


@pytest.mark.parametrize("values", VALUES.values(), ids=VALUES.keys())
def test_the_relay_runs_the_configuration_the_pod_mounts(helm: Path, values: Path | None) -> None:
    objects = render(helm, values)
    relay = container(objects)
    args = cli.build_parser().parse_args(relay["args"])
    assert args.command == "run"
    mounts = {mount["name"]: mount["mountPath"] for mount in relay["volumeMounts"]}
    volumes = only(objects, "Deployment")["spec"]["template"]["spec"]["volumes"]
    config_volume = next(v for v in volumes if v.get("configMap"))
    assert config_volume["configMap"]["name"] == only(objects, "ConfigMap")["metadata"]["name"]
    assert Path(mounts[config_volume["name"]]) / "config.toml" == args.config


@pytest.mark.parametrize("values", VALUES.values(), ids=VALUES.keys())
def test_the_probes_ask_the_relays_health_paths_on_its_port(
    helm: Path, values: Path | None, tmp_path: Path
) -> None:
    objects = render(helm, values)
    settings = relay_settings(objects, tmp_path)
    relay = container(objects)
    ports = {port["name"]: port["containerPort"] for port in relay["ports"]}
    for probe, path in (("livenessProbe", LIVENESS_PATH), ("readinessProbe", READINESS_PATH)):
        get = relay[probe]["httpGet"]
        assert get["path"] == path, f"{probe} asks {get['path']}, the relay serves {path}"
        port = ports.get(get["port"], get["port"])
        assert port == settings.observability.port, f"{probe} on {port}, the relay serves on its port"
    # The probes come from the kubelet, from outside the pod: the relay must not listen on loopback only.
    assert settings.observability.host not in ("127.0.0.1", "localhost", "::1")


@pytest.mark.parametrize("values", VALUES.values(), ids=VALUES.keys())
def test_the_metrics_service_and_monitor_scrape_the_relays_metrics(
    helm: Path, values: Path | None, tmp_path: Path
) -> None:
    objects = render(helm, values)
    settings = relay_settings(objects, tmp_path)
    service = only(objects, "Service")
    pod_labels = only(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert port["port"] == settings.observability.port
    assert port["targetPort"] in {p["name"] for p in container(objects)["ports"]}
    for monitor in (obj for obj in objects if obj["kind"] == "ServiceMonitor"):
        (endpoint,) = monitor["spec"]["endpoints"]
        assert endpoint["port"] == port["name"]
        assert endpoint["path"] == METRICS_PATH
        assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()


@pytest.mark.parametrize("values", VALUES.values(), ids=VALUES.keys())
def test_the_pod_is_given_longer_to_stop_than_the_relay_takes(
    helm: Path, values: Path | None, tmp_path: Path
) -> None:
    """SIGTERM: the relay revokes (revoke_grace_s) and drains (shutdown_grace_s); a SIGKILL before that
    loses the commit of what was delivered, so those events go out again."""
    objects = render(helm, values)
    delivery = relay_settings(objects, tmp_path).delivery
    grace = only(objects, "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > delivery.revoke_grace_s + delivery.shutdown_grace_s


def test_the_grace_period_follows_the_configured_graces(helm: Path, tmp_path: Path) -> None:
    objects = render(helm, None, "config.delivery.shutdown_grace_s=90")
    grace = only(objects, "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > relay_settings(objects, tmp_path).delivery.revoke_grace_s + 90


@pytest.mark.parametrize("values", VALUES.values(), ids=VALUES.keys())
def test_the_pod_runs_unprivileged_with_a_read_only_root_and_bounded_resources(
    helm: Path, values: Path | None
) -> None:
    objects = render(helm, values)
    pod = only(objects, "Deployment")["spec"]["template"]["spec"]
    relay = container(objects)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert relay["securityContext"]["readOnlyRootFilesystem"] is True
    assert relay["securityContext"]["allowPrivilegeEscalation"] is False
    assert relay["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert relay["resources"]["requests"]
    assert relay["resources"]["limits"]["memory"]


def test_a_disruption_takes_one_relay_at_a_time(helm: Path) -> None:
    objects = render(helm)
    budget = only(objects, "PodDisruptionBudget")
    pod_labels = only(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert budget["spec"]["maxUnavailable"] == 1
    assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


# --- a configuration change ---------------------------------------------------------------------------


def config_checksum(objects: list[dict[str, Any]]) -> str:
    annotations = only(objects, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    checksum: str = annotations["checksum/config"]
    return checksum


def test_a_configuration_change_rolls_the_pods(helm: Path) -> None:
    """The checksum is in the pod template, so a new configuration is a new template: a rolling update."""
    before = config_checksum(render(helm))
    assert config_checksum(render(helm)) == before, "the same configuration must not roll the pods"
    assert config_checksum(render(helm, None, "config.delivery.batch_max_events=100")) != before
    assert config_checksum(render(helm, None, "image.tag=other")) == before, "only the configuration counts"


# --- secrets ----------------------------------------------------------------------------------------------


def key_variables(settings: Settings) -> set[str]:
    """The variables the relay reads shop keys from, as consumer.config resolves them."""
    return {shop.api_key_env or default_key_env(name) for name, shop in settings.shops.items()}


@pytest.mark.parametrize("values", VALUES.values(), ids=VALUES.keys())
def test_each_shops_key_comes_from_a_secret_under_the_variable_the_relay_reads(
    helm: Path, values: Path | None, tmp_path: Path
) -> None:
    objects = render(helm, values)
    env = {var["name"]: var for var in container(objects).get("env", [])}
    for variable in key_variables(relay_settings(objects, tmp_path)):
        assert variable in env, f"the pod does not set {variable}, which the relay reads a key from"
        assert "value" not in env[variable]
        assert env[variable]["valueFrom"]["secretKeyRef"]["name"]
        assert env[variable]["valueFrom"]["secretKeyRef"]["key"]


def test_a_shop_name_with_other_characters_gets_the_relays_variable(helm: Path, tmp_path: Path) -> None:
    """The chart computes RR_API_KEY_<SHOP> itself: the same rule as consumer.config.default_key_env."""
    objects = render(
        helm,
        None,
        "config.shops.north-shop\\.eu.partner_id=p-north",
        "apiKeys.north-shop\\.eu.secretName=keys",
        "apiKeys.north-shop\\.eu.secretKey=north",
    )
    names = {var["name"] for var in container(objects)["env"]}
    assert default_key_env("north-shop.eu") in names


def test_a_shop_without_a_secret_is_refused_naming_the_setting(helm: Path) -> None:
    error = refusal(helm, None, "config.shops.extra.partner_id=p-extra")
    assert "apiKeys.extra is missing" in error


def test_a_key_written_into_the_values_is_refused(helm: Path) -> None:
    """values.schema.json: an apiKeys entry names a Secret and its key, and can hold nothing else."""
    error = refusal(helm, None, "apiKeys.demo.value=the-key-itself")
    assert "/apiKeys/demo" in error
    assert "the-key-itself" not in error


@pytest.mark.parametrize("values", VALUES.values(), ids=VALUES.keys())
def test_no_rendered_object_holds_a_secret_value(helm: Path, values: Path | None) -> None:
    objects = render(helm, values)
    assert "Secret" not in kinds(objects), "the chart must use existing Secrets, never make one"
    for var in container(objects).get("env", []):
        if any(word in var["name"].upper() for word in SECRET_WORDS):
            assert "value" not in var, f"{var['name']} has a literal value: it must come from a Secret"
    rendered = tomllib.loads(only(objects, "ConfigMap")["data"]["config.toml"])

    def keys(node: Any) -> Iterable[str]:
        if isinstance(node, dict):
            for key, value in node.items():
                yield str(key)
                yield from keys(value)
        elif isinstance(node, list):
            for item in node:
                yield from keys(item)

    found = [key for key in keys(rendered) if key in SECRET_SETTINGS]
    assert not found, f"the ConfigMap holds secret settings: {found}"


def test_the_default_values_hold_no_secret() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    for shop, ref in values["apiKeys"].items():
        assert set(ref) == {"secretName", "secretKey"}, f"apiKeys.{shop} must name a Secret, nothing else"
    assert not any(key in SECRET_SETTINGS for key in values["config"]["kafka"].get("client", {}))


# --- KEDA -------------------------------------------------------------------------------------------------


def scaled_object(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return only(objects, "ScaledObject")


def test_keda_measures_the_relays_group_on_each_of_its_topics(helm: Path, tmp_path: Path) -> None:
    objects = render(helm, ALL_ON)
    settings = relay_settings(objects, tmp_path)
    spec = scaled_object(objects)["spec"]
    assert spec["scaleTargetRef"]["name"] == only(objects, "Deployment")["metadata"]["name"]
    triggers = spec["triggers"]
    assert {trigger["type"] for trigger in triggers} == {"kafka"}
    assert {t["metadata"]["consumerGroup"] for t in triggers} == {settings.kafka.group_id}
    assert sorted(t["metadata"]["topic"] for t in triggers) == sorted(t.name for t in settings.topics)
    for trigger in triggers:
        assert trigger["metadata"]["bootstrapServers"] == settings.kafka.bootstrap_servers
        assert int(trigger["metadata"]["lagThreshold"]) > 0
        assert trigger["metadata"]["allowIdleConsumers"] == "false"
        assert trigger["authenticationRef"]["name"] == "kafka-sasl"


def test_keda_scales_within_the_partitions_and_owns_the_replica_count(helm: Path) -> None:
    values = yaml.safe_load(ALL_ON.read_text(encoding="utf-8"))["autoscaling"]
    objects = render(helm, ALL_ON)
    spec = scaled_object(objects)["spec"]
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"] <= values["partitions"]
    assert "replicas" not in only(objects, "Deployment")["spec"], "a fixed count would fight KEDA's"


def test_keda_keeps_one_relay_up_by_default_and_scales_to_the_partitions(helm: Path) -> None:
    """Readiness and metrics need a running relay; with no other limit, one relay per partition at most."""
    spec = scaled_object(render(helm, None, "autoscaling.enabled=true", "autoscaling.partitions=6"))["spec"]
    assert spec["minReplicaCount"] >= 1
    assert spec["maxReplicaCount"] == 6


def test_more_relays_than_partitions_is_refused(helm: Path) -> None:
    error = refusal(
        helm, None, "autoscaling.enabled=true", "autoscaling.partitions=6", "autoscaling.maxReplicaCount=7"
    )
    assert "autoscaling.maxReplicaCount 7 is more than autoscaling.partitions 6" in error


def test_autoscaling_without_the_partitions_is_refused(helm: Path) -> None:
    assert "autoscaling.partitions must be set" in refusal(helm, None, "autoscaling.enabled=true")


# --- the README's commands ------------------------------------------------------------------------------


def test_the_readmes_kubernetes_commands_name_what_the_chart_renders(helm: Path) -> None:
    """The runbook's `kubectl` lines (release "relay") address the objects by the names the chart gives."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.partition("\n## Kubernetes\n")[2].partition("\n## ")[0]
    assert section, "README.md has no Kubernetes section"
    objects = render(helm, ALL_ON)
    names = {obj["kind"]: obj["metadata"]["name"] for obj in objects}
    assert f"deployment/{names['Deployment']}" in section
    assert f"scaledobject {names['ScaledObject']}" in section
    assert f'"configMap": {{"name": "{names["ConfigMap"]}"}}' in section
    assert container(objects)["image"] in section, "the replay pod runs another image than the chart"
    release = only(objects, "Deployment")["metadata"]["labels"]["app.kubernetes.io/instance"]
    assert f"-l app.kubernetes.io/instance={release} " in section
