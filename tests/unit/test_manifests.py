"""The bundled Templates render into objects Kubernetes and the OpenShift router accept.

Kubernetes kinds are validated strictly with kubernetes-validate; the Route (an OpenShift kind
it has no schema for) and the Template itself are checked with small schemas written from the
OpenShift API reference, plus the router's rules for passthrough routes.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate
import pytest

from packit_broker import render as engine
from packit_broker.queues import REPLICAS_SERVER_PROPERTY
from packit_broker.render import find_objects

K8S_VERSION = kubernetes_validate.latest_version()
REPO = Path(__file__).resolve().parents[2]
CA_PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"

REQUIRED_PARAMS: dict[str, dict[str, str]] = {
    "bridge": {
        "IMAGE": "quay.io/packit/packit-broker:latest",
        "REDIS_URL": "redis://:redis-s3cret-pw@redis:6379/0",
    },
    "rabbitmq": {"ROUTE_HOST": "amqp.apps.example.com"},
    "monitoring": {},
    "postgresql-route": {"ROUTE_HOST": "postgres.apps.example.com"},
    "worker": {
        "IMAGE": "quay.io/packit/worker:latest",
        "BROKER_URL": "amqps://packit:secret@amqp.apps.example.com:443/",
        "CA_CERT": CA_PEM,
    },
}

PARAMETER_SCHEMA = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "pattern": "^[a-zA-Z0-9_]+$"},
        "displayName": {"type": "string"},
        "description": {"type": "string"},
        "value": {"type": "string"},
        "required": {"type": "boolean"},
        "generate": {"enum": ["expression"]},
        "from": {"type": "string"},
    },
    "dependentRequired": {"generate": ["from"]},
}

TEMPLATE_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "objects", "parameters"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "template.openshift.io/v1"},
        "kind": {"const": "Template"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {"name": {"type": "string"}, "annotations": {"type": "object"}},
        },
        "message": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "objects": {
            "type": "array",
            "minItems": 1,
            "items": {"type": "object", "required": ["apiVersion", "kind", "metadata"]},
        },
        "parameters": {"type": "array", "items": PARAMETER_SCHEMA},
    },
}

# route.openshift.io/v1 Route, the fields this project may use (strict: nothing else).
#: prometheus-operator's Duration pattern (monitoring.coreos.com/v1).
_DURATION = {
    "type": "string",
    "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?"
    r"(([0-9]+)ms)?)$",
}
_STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
_META = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "labels": _STRINGS,
        "annotations": _STRINGS,
    },
}


def _monitoring_resource(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    """The schema of a monitoring.coreos.com/v1 resource of `kind` whose spec is `spec`."""
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": kind},
            "metadata": _META,
            "spec": spec,
        },
    }


#: The fields of monitoring.coreos.com/v1 PodMonitor and PrometheusRule this project uses, as
#: their CRDs define them (prometheus-operator), strict: a misspelt field fails.
MONITORING_SCHEMAS: dict[str, dict[str, Any]] = {
    "PodMonitor": _monitoring_resource(
        "PodMonitor",
        {
            "type": "object",
            "required": ["selector", "podMetricsEndpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"matchLabels": _STRINGS},
                },
                "podMetricsEndpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["port"],
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string", "pattern": "^/"},
                            "interval": _DURATION,
                            "params": {
                                "type": "object",
                                "additionalProperties": {
                                    "type": "array",
                                    "items": {"type": "string"},
                                },
                            },
                        },
                    },
                },
            },
        },
    ),
    "PrometheusRule": _monitoring_resource(
        "PrometheusRule",
        {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "groups": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name", "rules"],
                        "additionalProperties": False,
                        "properties": {
                            "name": {"type": "string", "minLength": 1},
                            "interval": _DURATION,
                            "rules": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "required": ["alert", "expr"],
                                    "additionalProperties": False,
                                    "properties": {
                                        "alert": {"type": "string", "minLength": 1},
                                        "expr": {"type": "string", "minLength": 1},
                                        "for": _DURATION,
                                        "labels": _STRINGS,
                                        "annotations": _STRINGS,
                                    },
                                },
                            },
                        },
                    },
                }
            },
        },
    ),
}

ROUTE_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "route.openshift.io/v1"},
        "kind": {"const": "Route"},
        "metadata": _META,
        "spec": {
            "type": "object",
            "required": ["host", "to", "port", "tls"],
            "additionalProperties": False,
            "properties": {
                "host": {
                    "type": "string",
                    "pattern": r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?\.)+[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
                    "maxLength": 253,
                },
                "path": {"type": "string"},
                "subdomain": {"type": "string"},
                "to": {
                    "type": "object",
                    "required": ["kind", "name"],
                    "additionalProperties": False,
                    "properties": {
                        "kind": {"const": "Service"},
                        "name": {"type": "string", "minLength": 1},
                        "weight": {"type": "integer", "minimum": 0, "maximum": 256},
                    },
                },
                "port": {
                    "type": "object",
                    "required": ["targetPort"],
                    "additionalProperties": False,
                    "properties": {"targetPort": {"type": ["string", "integer"], "minLength": 1}},
                },
                "tls": {
                    "type": "object",
                    "required": ["termination"],
                    "additionalProperties": False,
                    "properties": {
                        "termination": {"enum": ["edge", "passthrough", "reencrypt"]},
                        "insecureEdgeTerminationPolicy": {
                            "enum": ["None", "Allow", "Redirect", ""]
                        },
                        "certificate": {"type": "string"},
                        "key": {"type": "string"},
                        "caCertificate": {"type": "string"},
                        "destinationCACertificate": {"type": "string"},
                    },
                },
                "wildcardPolicy": {"enum": ["None", "Subdomain"]},
            },
        },
    },
}

_REFERENCE = re.compile(r"\$\{\{?([a-zA-Z0-9_]+)\}?\}")


def rendered(name: str, **extra: str) -> dict[str, Any]:
    return engine.process(engine.load_template(name), {**REQUIRED_PARAMS[name], **extra})


def all_objects() -> list[tuple[str, dict[str, Any]]]:
    return [(name, obj) for name in REQUIRED_PARAMS for obj in rendered(name)["items"]]


def object_id(case: tuple[str, dict[str, Any]]) -> str:
    name, obj = case
    return f"{name}:{obj['kind']}/{obj['metadata']['name']}"


def pod_specs() -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{name}:{obj['metadata']['name']}", obj["spec"]["template"]["spec"])
        for name, obj in all_objects()
        if obj["kind"] in {"StatefulSet", "Deployment", "DaemonSet", "Job"}
    ]


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def one(document: dict[str, Any], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        o for o in engine.find_objects(document, kind) if name in (None, o["metadata"]["name"])
    ]
    assert len(found) == 1, (kind, name, found)
    return found[0]


def rabbitmq_conf(document: dict[str, Any]) -> dict[str, str]:
    text = one(document, "ConfigMap")["data"]["rabbitmq.conf"]
    settings: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        match = re.fullmatch(r"([a-z0-9_.]+) = (\S.*)", line)
        assert match, f"not a sysctl-style rabbitmq.conf line: {line!r}"
        assert match.group(1) not in settings, f"duplicate key {match.group(1)}"
        settings[match.group(1)] = match.group(2)
    return settings


# --- the Templates ------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(REQUIRED_PARAMS))
def test_template_schema(name: str) -> None:
    jsonschema.validate(engine.load_template(name), TEMPLATE_SCHEMA)


@pytest.mark.parametrize("name", sorted(REQUIRED_PARAMS))
def test_references_and_parameters_agree(name: str) -> None:
    """Every ${X} names a declared parameter (a typo would silently survive oc process)."""
    tpl = engine.load_template(name)
    declared = {p["name"] for p in tpl["parameters"]}
    text = Path(engine.bundled_templates()[name]).read_text()
    body = text.split("\nparameters:", 1)[0] + text.split("\nobjects:", 1)[1]
    used = set(_REFERENCE.findall(body))
    assert used <= declared, used - declared
    assert declared <= used, f"declared but unused: {declared - used}"


def test_bundled_templates_listed() -> None:
    assert set(engine.bundled_templates()) == set(REQUIRED_PARAMS)


@pytest.mark.parametrize("name", sorted(REQUIRED_PARAMS))
def test_top_level_manifests_are_relative_symlinks(name: str) -> None:
    link = REPO / "manifests" / f"{name}.yaml"
    assert link.is_symlink()
    assert os.readlink(link) == f"../packit_broker/manifests/{name}.yaml"
    assert link.resolve() == Path(engine.bundled_templates()[name]).resolve()


@pytest.mark.parametrize("name", sorted(n for n, params in REQUIRED_PARAMS.items() if params))
def test_render_without_required_names_them(name: str) -> None:
    with pytest.raises(engine.RenderError) as info:
        engine.process(engine.load_template(name), {})
    for param in REQUIRED_PARAMS[name]:
        assert param in str(info.value)


@pytest.mark.parametrize("name", sorted(REQUIRED_PARAMS))
def test_nothing_left_unsubstituted(name: str) -> None:
    assert "${" not in repr(rendered(name))


#: Parameters whose values are credentials (or carry one): never in a template's message,
#: which `render` prints on stderr and `oc process` shows.
SECRET_PARAMS = frozenset(
    {"PASSWORD", "ERLANG_COOKIE", "BROKER_URL", "RESULT_BACKEND_URL", "DATABASE_URL", "REDIS_URL"}
)


@pytest.mark.parametrize("name", sorted(REQUIRED_PARAMS))
def test_message_shows_no_secret_parameter(name: str) -> None:
    tpl = engine.load_template(name)
    assert not set(_REFERENCE.findall(tpl.get("message", ""))) & SECRET_PARAMS
    # A generated value is a credential: it must be on the list the check above uses.
    assert {p["name"] for p in tpl["parameters"] if "generate" in p} <= SECRET_PARAMS


# --- Kubernetes validation ----------------------------------------------------------------


@pytest.mark.parametrize("case", all_objects(), ids=object_id)
def test_kubernetes_objects_validate_strictly(case: tuple[str, dict[str, Any]]) -> None:
    _, obj = case
    if obj["kind"] == "Route":
        jsonschema.validate(obj, ROUTE_SCHEMA)
    elif obj["kind"] in MONITORING_SCHEMAS:
        jsonschema.validate(obj, MONITORING_SCHEMAS[obj["kind"]])
    else:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_strict_validation_really_rejects_unknown_fields() -> None:
    """Guard the guard: strict mode must catch a misspelt field."""
    statefulset = one(rendered("rabbitmq"), "StatefulSet")
    statefulset["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(statefulset, K8S_VERSION, strict=True)


# --- Routes -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["rabbitmq", "postgresql-route"])
def test_route_is_passthrough_without_path_or_certificates(name: str) -> None:
    route = one(rendered(name, ALLOWED_CIDRS="10.0.0.0/8 192.0.2.7"), "Route")
    spec = route["spec"]
    assert spec["tls"]["termination"] == "passthrough"
    assert "path" not in spec
    for field in ("certificate", "key", "caCertificate", "destinationCACertificate"):
        assert field not in spec["tls"]
    assert spec["host"] == REQUIRED_PARAMS[name]["ROUTE_HOST"]
    annotations = route["metadata"]["annotations"]
    assert annotations["haproxy.router.openshift.io/timeout-tunnel"] == "1h"
    assert annotations["haproxy.router.openshift.io/ip_allowlist"] == "10.0.0.0/8 192.0.2.7"
    # OpenShift < 4.18 reads only ip_whitelist: without it the list would allow everyone there.
    assert annotations["haproxy.router.openshift.io/ip_whitelist"] == "10.0.0.0/8 192.0.2.7"


@pytest.mark.parametrize("replicas", ["1", "3"])
def test_rabbitmq_nodes_are_spread_over_machines(replicas: str) -> None:
    pod = one(rendered("rabbitmq", REPLICAS=replicas), "StatefulSet")["spec"]["template"]
    labels = pod["metadata"]["labels"]
    (spread,) = pod["spec"]["topologySpreadConstraints"]
    assert spread["maxSkew"] == 1
    assert spread["topologyKey"] == "kubernetes.io/hostname"
    assert spread["whenUnsatisfiable"] == "DoNotSchedule"
    assert spread["labelSelector"]["matchLabels"].items() <= labels.items()
    (term,) = pod["spec"]["affinity"]["podAntiAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"
    ]
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"].items() <= labels.items()


def test_rabbitmq_spread_over_zones_when_asked() -> None:
    pod = one(
        rendered(
            "rabbitmq",
            SPREAD_TOPOLOGY_KEY="topology.kubernetes.io/zone",
            SPREAD_WHEN_UNSATISFIABLE="ScheduleAnyway",
        ),
        "StatefulSet",
    )["spec"]["template"]
    (spread,) = pod["spec"]["topologySpreadConstraints"]
    assert spread["topologyKey"] == "topology.kubernetes.io/zone"
    assert spread["whenUnsatisfiable"] == "ScheduleAnyway"


def test_rabbitmq_route_reaches_the_amqps_container_port() -> None:
    document = rendered("rabbitmq")
    route = one(document, "Route")
    service = one(document, "Service", route["spec"]["to"]["name"])
    (port,) = [
        p for p in service["spec"]["ports"] if p["name"] == route["spec"]["port"]["targetPort"]
    ]
    assert port["name"] == "amqps"
    assert port["port"] == 5671
    pod = one(document, "StatefulSet")["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    container_ports = {
        p["name"]: p["containerPort"] for c in pod["spec"]["containers"] for p in c["ports"]
    }
    target = port["targetPort"]
    assert (container_ports[target] if isinstance(target, str) else target) == 5671
    assert container_ports["amqps"] == 5671


def test_postgresql_route_targets_named_service_port() -> None:
    route = one(rendered("postgresql-route", SERVICE_NAME="db", SERVICE_PORT_NAME="pg"), "Route")
    assert route["spec"]["to"] == {"kind": "Service", "name": "db", "weight": 100}
    assert route["spec"]["port"] == {"targetPort": "pg"}


def test_postgresql_route_message_explains_server_and_client_needs() -> None:
    message = engine.load_template("postgresql-route")["message"]
    for needle in ("PostgreSQL 17", "ssl=on", "libpq 17", "sslnegotiation=direct", "verify-full"):
        assert needle in message


# --- Pods ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("where", "pod"), pod_specs(), ids=[w for w, _ in pod_specs()])
def test_pods_fit_the_restricted_scc(where: str, pod: dict[str, Any]) -> None:
    pod_context = pod.get("securityContext", {})
    assert pod_context.get("runAsNonRoot") is True
    for forbidden in ("runAsUser", "runAsGroup", "fsGroup"):
        assert forbidden not in pod_context, f"{where}: OpenShift assigns {forbidden}"
    assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")
    for container in containers(pod):
        context = container["securityContext"]
        assert "runAsUser" not in context
        assert context["runAsNonRoot"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"] == {"drop": ["ALL"]}
        assert context.get("privileged", False) is False
        seccomp = context.get("seccompProfile") or pod_context.get("seccompProfile")
        assert seccomp == {"type": "RuntimeDefault"}


@pytest.mark.parametrize(("where", "pod"), pod_specs(), ids=[w for w, _ in pod_specs()])
def test_containers_have_requests_and_limits(where: str, pod: dict[str, Any]) -> None:
    for container in containers(pod):
        resources = container["resources"]
        assert {"cpu", "memory"} <= resources["requests"].keys(), where
        assert "memory" in resources["limits"], where


def test_volume_mounts_have_volumes() -> None:
    for _, obj in all_objects():
        if obj["kind"] not in {"StatefulSet", "Deployment"}:
            continue
        pod = obj["spec"]["template"]["spec"]
        claims = {c["metadata"]["name"] for c in obj["spec"].get("volumeClaimTemplates", [])}
        volumes = {v["name"] for v in pod.get("volumes", [])} | claims
        for container in containers(pod):
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, (obj["metadata"]["name"], mount)


def test_replicas_become_integers() -> None:
    assert one(rendered("rabbitmq", REPLICAS="3"), "StatefulSet")["spec"]["replicas"] == 3
    assert one(rendered("worker", REPLICAS="5"), "StatefulSet")["spec"]["replicas"] == 5
    assert one(rendered("rabbitmq"), "StatefulSet")["spec"]["replicas"] == 1


def test_template_labels_on_every_object() -> None:
    for _, obj in all_objects():
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "packit-broker"


# --- RabbitMQ -----------------------------------------------------------------------------


def test_rabbitmq_conf_is_tls_only_and_has_the_required_settings() -> None:
    settings = rabbitmq_conf(rendered("rabbitmq"))
    expected = {
        "listeners.tcp": "none",
        "listeners.ssl.default": "5671",
        "ssl_options.cacertfile": "/etc/rabbitmq-tls/ca.crt",
        "ssl_options.certfile": "/etc/rabbitmq-tls/tls.crt",
        "ssl_options.keyfile": "/etc/rabbitmq-tls/tls.key",
        "ssl_options.versions.1": "tlsv1.3",
        "ssl_options.versions.2": "tlsv1.2",
        "ssl_options.verify": "verify_peer",
        "ssl_options.fail_if_no_peer_cert": "false",
        "loopback_users.guest": "true",
        "consumer_timeout": "7200000",
        "vm_memory_high_watermark.absolute": "800MB",
        "disk_free_limit.absolute": "2GB",
        "cluster_partition_handling": "pause_minority",
        "net_ticktime": "15",
        "cluster_formation.peer_discovery_backend": "rabbit_peer_discovery_k8s",
        "cluster_formation.k8s.host": "kubernetes.default.svc",
        "cluster_formation.k8s.address_type": "hostname",
        "cluster_formation.k8s.service_name": "rabbitmq-nodes",
        "queue_leader_locator": "balanced",
    }
    assert expected.items() <= settings.items()


def test_rabbitmq_config_carries_no_credentials() -> None:
    document = rendered("rabbitmq", PASSWORD="s3cr3t-value", USERNAME="someone")
    config = one(document, "ConfigMap")
    text = repr(config["data"])
    assert "s3cr3t-value" not in text and "someone" not in text
    assert not any(k.startswith(("default_user", "default_pass")) for k in rabbitmq_conf(document))
    assert config["data"]["enabled_plugins"].strip() == (
        "[rabbitmq_peer_discovery_k8s,rabbitmq_prometheus]."
    )


@pytest.mark.parametrize("replicas", ["1", "3"])
def test_rabbitmq_announces_its_replicas_to_clients(replicas: str) -> None:
    """advanced.config (loaded from the ConfigMap mounted on /etc/rabbitmq) adds the server
    property `check` reads to tell a cluster from one node; one well-formed Erlang term."""
    config = one(rendered("rabbitmq", REPLICAS=replicas), "ConfigMap")
    term = config["data"]["advanced.config"].strip()
    assert term == (
        f'[{{rabbit, [{{server_properties, [{{{REPLICAS_SERVER_PROPERTY}, "{replicas}"}}]}}]}}].'
    )


def test_rabbitmq_credentials_from_secret() -> None:
    document = rendered("rabbitmq", NAME="mq", USERNAME="packit", PASSWORD="pw")
    secret = one(document, "Secret", "mq-credentials")
    assert secret["stringData"] == {"username": "packit", "password": "pw"}
    env = {
        e["name"]: e
        for e in one(document, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["RABBITMQ_DEFAULT_USER"]["valueFrom"]["secretKeyRef"] == {
        "name": "mq-credentials",
        "key": "username",
    }
    assert env["RABBITMQ_DEFAULT_PASS"]["valueFrom"]["secretKeyRef"] == {
        "name": "mq-credentials",
        "key": "password",
    }
    assert "RABBITMQ_ERLANG_COOKIE" not in env


def test_rabbitmq_generated_secrets_match_their_pattern() -> None:
    document = rendered("rabbitmq")
    password = one(document, "Secret", "rabbitmq-credentials")["stringData"]["password"]
    cookie = one(document, "Secret", "rabbitmq-erlang-cookie")["stringData"]["cookie"]
    assert re.fullmatch("[a-zA-Z0-9]{32}", password)
    assert re.fullmatch("[a-zA-Z0-9]{32}", cookie)
    assert password != cookie


def test_rabbitmq_node_names_and_peer_discovery_agree() -> None:
    document = rendered("rabbitmq", NAME="mq")
    headless = one(document, "Service", "mq-nodes")
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    assert {p["port"] for p in headless["spec"]["ports"]} == {4369, 25672}
    statefulset = one(document, "StatefulSet")
    assert statefulset["spec"]["serviceName"] == "mq-nodes"
    assert rabbitmq_conf(document)["cluster_formation.k8s.service_name"] == "mq-nodes"
    pod = statefulset["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["RABBITMQ_NODENAME"] == "rabbit@$(POD_NAME).mq-nodes.$(POD_NAMESPACE)"
    assert env["RABBITMQ_USE_LONGNAME"] == "true"
    binding = one(document, "RoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": pod["serviceAccountName"]}]
    role = one(document, "Role", binding["roleRef"]["name"])
    assert {"resources": ["endpoints"], "verbs": ["get"], "apiGroups": [""]} in role["rules"]


def test_rabbitmq_probes_like_the_cluster_operator() -> None:
    container = one(rendered("rabbitmq"), "StatefulSet")["spec"]["template"]["spec"]["containers"][
        0
    ]
    assert container["readinessProbe"]["tcpSocket"] == {"port": "amqps"}
    assert "livenessProbe" not in container


def test_rabbitmq_mounts_tls_secret_and_config() -> None:
    document = rendered("rabbitmq", TLS_SECRET="my-cert")
    pod = one(document, "StatefulSet")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert volumes["tls"]["secret"]["secretName"] == "my-cert"
    assert mounts["tls"] == "/etc/rabbitmq-tls"
    assert volumes["config"]["configMap"]["name"] == one(document, "ConfigMap")["metadata"]["name"]
    assert mounts["config"] == "/etc/rabbitmq"
    claim = one(document, "StatefulSet")["spec"]["volumeClaimTemplates"][0]
    assert claim["spec"]["resources"]["requests"]["storage"] == "8Gi"


def _rules_for(policy: dict[str, Any], port: int) -> list[dict[str, Any]]:
    return [r for r in policy["spec"]["ingress"] if any(p["port"] == port for p in r["ports"])]


def test_network_policy() -> None:
    document = rendered("rabbitmq")
    policy = one(document, "NetworkPolicy")
    pod_labels = one(document, "StatefulSet")["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    router = {
        "namespaceSelector": {"matchLabels": {"policy-group.network.openshift.io/ingress": ""}}
    }
    same_namespace: dict[str, Any] = {"podSelector": {}}
    amqps_sources = [peer for rule in _rules_for(policy, 5671) for peer in rule["from"]]
    assert router in amqps_sources and same_namespace in amqps_sources
    for port in (4369, 25672):
        peers = [peer for rule in _rules_for(policy, port) for peer in rule["from"]]
        assert peers == [
            {"podSelector": {"matchLabels": policy["spec"]["podSelector"]["matchLabels"]}}
        ]
    monitoring = {
        "namespaceSelector": {"matchLabels": {"network.openshift.io/policy-group": "monitoring"}}
    }
    metrics_sources = [peer for rule in _rules_for(policy, 15692) for peer in rule["from"]]
    assert metrics_sources == [same_namespace, monitoring]
    allowed = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert allowed == {5671, 4369, 25672, 15692}


def test_pdb_selects_the_rabbitmq_pods() -> None:
    document = rendered("rabbitmq")
    pdb = one(document, "PodDisruptionBudget")
    pod_labels = one(document, "StatefulSet")["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1


# --- Workers ------------------------------------------------------------------------------


def test_worker_env_comes_from_the_secret() -> None:
    document = rendered("worker", NAME="w", QUEUE_TYPE="quorum")
    secret = one(document, "Secret", "w-broker")
    assert secret["stringData"]["ca.crt"] == CA_PEM
    assert secret["stringData"]["PACKIT_BROKER_URL"] == REQUIRED_PARAMS["worker"]["BROKER_URL"]
    pod = one(document, "StatefulSet")["spec"]["template"]["spec"]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    for name in ("PACKIT_BROKER_URL", "PACKIT_RESULT_BACKEND_URL", "PACKIT_DATABASE_URL"):
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "w-broker" and ref["key"] in secret["stringData"]
    mount = pod["containers"][0]["volumeMounts"][0]["mountPath"]
    for name in (
        "PACKIT_BROKER_CA_FILE",
        "PACKIT_RESULT_BACKEND_CA_FILE",
        "PACKIT_DATABASE_CA_FILE",
    ):
        assert env[name]["value"] == f"{mount}/ca.crt" == "/etc/packit-broker/ca.crt"
    assert env["PACKIT_BROKER_QUEUES"]["value"] == "short-running"
    assert env["PACKIT_BROKER_QUEUE_TYPE"]["value"] == "quorum"


def test_worker_command_and_liveness_are_parameters() -> None:
    document = rendered("worker", COMMAND="celery -A app worker", LIVENESS_COMMAND="true")
    container = one(document, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["sh", "-c", "exec celery -A app worker"]
    assert container["livenessProbe"]["exec"]["command"] == ["sh", "-c", "true"]
    default = one(rendered("worker"), "StatefulSet")["spec"]["template"]["spec"]["containers"][0]
    assert "--prefetch-multiplier=1" in default["command"][2]


# --- The bridge (`migrate --follow` in the public cluster) ---------------------------------

#: The command line `migrate --follow` is built to; the template must run exactly this.
BRIDGE_COMMAND = [
    "packit-broker",
    "migrate",
    "--follow",
    "--metrics-port",
    "9100",
    "--report",
    "/tmp/bridge-report.json",
]
_ENV_REFERENCE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def bridge_pod(document: dict[str, Any]) -> dict[str, Any]:
    pod: dict[str, Any] = one(document, "Deployment")["spec"]["template"]
    return pod


def bridge_container(document: dict[str, Any]) -> dict[str, Any]:
    containers_: list[dict[str, Any]] = bridge_pod(document)["spec"]["containers"]
    (container,) = containers_
    assert container["name"] == "bridge"
    return container


def secret_data(documents: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """Every rendered Secret's stringData, by name, as the API server would store it."""
    return {
        s["metadata"]["name"]: s["stringData"]
        for document in documents
        for s in engine.find_objects(document, "Secret")
    }


def container_environment(
    container: dict[str, Any], secrets: dict[str, dict[str, str]], namespace: str
) -> dict[str, str]:
    """The environment the kubelet gives the container: secretKeyRef and metadata.namespace
    resolved, `$(VAR)` expanded from the variables defined *before* it (`$$` escapes)."""
    env: dict[str, str] = {}
    for entry in container["env"]:
        source = entry.get("valueFrom")
        if source is None:
            value = _ENV_REFERENCE.sub(
                lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)),
                entry["value"],
            )
        elif "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            assert ref["name"] in secrets, f"{entry['name']}: no Secret {ref['name']!r}"
            assert ref["key"] in secrets[ref["name"]], f"{entry['name']}: no key {ref['key']!r}"
            value = secrets[ref["name"]][ref["key"]]
        else:
            assert source == {"fieldRef": {"fieldPath": "metadata.namespace"}}, entry
            value = namespace
        env[entry["name"]] = value
    return env


def test_bridge_is_one_deployment_replica_replaced_by_recreate() -> None:
    document = rendered("bridge")
    deployment = one(document, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert engine.find_objects(document, "StatefulSet") == []
    declared = {p["name"] for p in engine.load_template("bridge")["parameters"]}
    assert "REPLICAS" not in declared


def test_bridge_runs_the_follow_command_line_without_a_shell() -> None:
    document = rendered("bridge", REDIS_URL="redis://:argv-leak-check@redis:6379/0")
    container = bridge_container(document)
    assert container["command"] == BRIDGE_COMMAND
    assert "args" not in container
    assert "argv-leak-check" not in repr(container["command"])
    # SIGTERM: finish or abandon the batch, write the report, exit 0 - it needs the time.
    assert bridge_pod(document)["spec"]["terminationGracePeriodSeconds"] >= 60


def test_bridge_root_filesystem_is_read_only_with_an_empty_dir_for_the_report() -> None:
    pod = bridge_pod(rendered("bridge"))["spec"]
    container = bridge_container(rendered("bridge"))
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    report = Path(BRIDGE_COMMAND[BRIDGE_COMMAND.index("--report") + 1])
    assert volumes[mounts[str(report.parent)]] == {"name": "tmp", "emptyDir": {}}
    assert all(m.get("readOnly") for m in container["volumeMounts"] if m["mountPath"] != "/tmp")


def test_bridge_secrets_reach_the_pod_only_through_secret_key_refs() -> None:
    document = rendered(
        "bridge", NAME="br", REDIS_URL="redis://:r3dis-pw-7731@redis:6379/0", RABBITMQ_NAME="mq"
    )
    for obj in document["items"]:
        if obj["kind"] != "Secret":
            assert "r3dis-pw-7731" not in repr(obj), obj["kind"]
    assert one(document, "Secret", "br-redis")["stringData"] == {
        "PACKIT_MIGRATE_FROM": "redis://:r3dis-pw-7731@redis:6379/0"
    }
    env = {e["name"]: e for e in bridge_container(document)["env"]}
    assert env["PACKIT_MIGRATE_FROM"]["valueFrom"]["secretKeyRef"] == {
        "name": "br-redis",
        "key": "PACKIT_MIGRATE_FROM",
    }
    for name, key in (("RABBITMQ_USERNAME", "username"), ("RABBITMQ_PASSWORD", "password")):
        assert env[name]["valueFrom"]["secretKeyRef"] == {"name": "mq-credentials", "key": key}
    # The broker URL names the credentials by reference only; everything else is plain.
    url = env["PACKIT_BROKER_URL"]["value"]
    userinfo = url.removeprefix("amqps://").split("@", 1)[0]
    assert userinfo == "$(RABBITMQ_USERNAME):$(RABBITMQ_PASSWORD)"
    plain = {n: e["value"] for n, e in env.items() if "value" in e}
    assert set(plain) == {
        "PACKIT_BROKER_URL",
        "PACKIT_BROKER_CA_FILE",
        "PACKIT_BROKER_QUEUES",
        "PACKIT_BROKER_QUEUE_TYPE",
        "PACKIT_MIGRATE_TRANSPORT_OPTIONS",
        "PYTHONUNBUFFERED",
    }
    names = [e["name"] for e in bridge_container(document)["env"]]
    for ref in re.findall(r"\$\(([A-Z_]+)\)", url):
        assert names.index(ref) < names.index("PACKIT_BROKER_URL"), f"$({ref}) not yet defined"


def test_bridge_environment_is_a_configuration_the_package_accepts(tmp_path: Path) -> None:
    """Kubernetes' expansion of the rendered env, fed to the package's own parsers."""
    from packit_broker.config import broker_from_env, queues_from_env, redis_from_url
    from packit_broker.kombu_layout import KombuLayout
    from packit_broker.queues import QueueType

    options = '{"sep": ":", "priority_steps": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]}'
    bridge = rendered(
        "bridge",
        RABBITMQ_NAME="mq",
        TLS_SECRET="mq-tls",
        QUEUES="short-running,long-running",
        QUEUE_TYPE="quorum",
        TRANSPORT_OPTIONS=options,
    )
    broker = rendered("rabbitmq", NAME="mq", TLS_SECRET="mq-tls")
    container = bridge_container(bridge)
    env = container_environment(container, secret_data([bridge, broker]), "packit")
    assert not any("$(" in value for value in env.values()), env.keys()
    # The CA volume: only ca.crt of RabbitMQ's TLS Secret, where PACKIT_BROKER_CA_FILE says.
    (ca_volume,) = [v for v in bridge_pod(bridge)["spec"]["volumes"] if "secret" in v]
    broker_volumes = one(broker, "StatefulSet")["spec"]["template"]["spec"]["volumes"]
    (broker_tls,) = [v for v in broker_volumes if v["name"] == "tls"]
    assert ca_volume["secret"] == {
        "secretName": broker_tls["secret"]["secretName"],
        "items": [{"key": "ca.crt", "path": "ca.crt"}],
    }
    assert rabbitmq_conf(broker)["ssl_options.cacertfile"].endswith("/ca.crt")
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == ca_volume["name"]]
    assert env["PACKIT_BROKER_CA_FILE"] == f"{mount['mountPath']}/ca.crt"
    (tmp_path / "ca.crt").write_text(CA_PEM)
    env["PACKIT_BROKER_CA_FILE"] = str(tmp_path / "ca.crt")

    endpoint = broker_from_env(env)
    credentials = one(broker, "Secret", "mq-credentials")["stringData"]
    assert (endpoint.username, endpoint.password) == (
        credentials["username"],
        credentials["password"],
    )
    assert (endpoint.host, endpoint.port, endpoint.vhost) == ("mq.packit.svc", 5671, "/")
    assert endpoint.tls is not None and endpoint.tls.server_hostname == "mq.packit.svc"
    assert endpoint.tls.ca_file == tmp_path / "ca.crt"
    source = redis_from_url(env["PACKIT_MIGRATE_FROM"])
    assert (source.host, source.port, source.db, source.password) == (
        "redis",
        6379,
        0,
        "redis-s3cret-pw",
    )
    queues = queues_from_env(env)
    assert queues.names == ("short-running", "long-running")
    assert queues.queue_type is QueueType.QUORUM
    assert KombuLayout.from_json(env["PACKIT_MIGRATE_TRANSPORT_OPTIONS"]).sep == ":"
    default = next(
        e["value"]
        for e in bridge_container(rendered("bridge"))["env"]
        if e["name"] == "PACKIT_MIGRATE_TRANSPORT_OPTIONS"
    )
    assert KombuLayout.from_json(default) == KombuLayout.from_json("{}")


def test_bridge_dials_the_rabbitmq_service_its_network_policy_admits() -> None:
    bridge = rendered("bridge", RABBITMQ_NAME="mq")
    broker = rendered("rabbitmq", NAME="mq")
    env = container_environment(bridge_container(bridge), secret_data([bridge, broker]), "ns")
    authority = env["PACKIT_BROKER_URL"].split("@", 1)[1].rstrip("/")
    host, port = authority.rsplit(":", 1)
    service_name, namespace, svc = host.split(".")
    assert (namespace, svc) == ("ns", "svc")
    service = one(broker, "Service", service_name)
    assert {"name": "amqps", "port": int(port), "targetPort": "amqps", "protocol": "TCP"} in (
        service["spec"]["ports"]
    )
    # RabbitMQ admits AMQPS from every pod of its namespace, the bridge's included.
    admitted = [
        peer for rule in _rules_for(one(broker, "NetworkPolicy"), 5671) for peer in rule["from"]
    ]
    assert {"podSelector": {}} in admitted


def test_bridge_metrics_port_is_wired_to_probes_service_and_policy() -> None:
    document = rendered("bridge")
    container = bridge_container(document)
    port = int(container["command"][container["command"].index("--metrics-port") + 1])
    assert container["ports"] == [{"name": "metrics", "containerPort": port, "protocol": "TCP"}]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/metrics", "port": "metrics"}, probe
    liveness = container["livenessProbe"]
    # Generous: restarted only after minutes without an answer, never for one slow scrape.
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 300
    assert liveness["timeoutSeconds"] >= 5
    service = one(document, "Service")
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": port, "targetPort": "metrics", "protocol": "TCP"}
    ]
    pod_labels = bridge_pod(document)["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["metadata"]["annotations"] == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(port),
        "prometheus.io/path": "/metrics",
    }
    policy = one(document, "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"port": port, "protocol": "TCP"}]
    monitoring = {
        "namespaceSelector": {"matchLabels": {"network.openshift.io/policy-group": "monitoring"}}
    }
    assert rule["from"] == [{"podSelector": {}}, monitoring]


def test_bridge_command_and_environment_parse_with_the_real_migrate_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rendered command line, with the rendered environment, is accepted by the CLI."""
    from packit_broker.commands.migrate import migrate

    bridge = rendered("bridge")
    broker = rendered("rabbitmq")
    env = container_environment(bridge_container(bridge), secret_data([bridge, broker]), "ns")
    for name in list(os.environ):
        if name.startswith("PACKIT_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    command = bridge_container(bridge)["command"]
    assert command[:2] == ["packit-broker", "migrate"]
    context = migrate.make_context("migrate", command[2:])
    by_option = {opt: p.name for p in migrate.params for opt in p.opts}
    values = context.params
    assert values[by_option["--follow"]] is True
    assert values[by_option["--metrics-port"]] == 9100
    assert str(values[by_option["--report"]]) == "/tmp/bridge-report.json"
    assert values[by_option["--from"]] == REQUIRED_PARAMS["bridge"]["REDIS_URL"]
    assert values[by_option["--transport-options"]] == "{}"


def test_bridge_docs_list_every_parameter_and_the_command() -> None:
    """docs/deploy.md's bridge section is the operator's reference: keep it from drifting."""
    text = (REPO / "docs" / "deploy.md").read_text()
    section = text.split("\n## The bridge\n", 1)[1].split("\n## ", 1)[0]
    documented = {
        name
        for row in section.splitlines()
        if row.startswith("| `")
        for name in re.findall(r"`([A-Z_]+)`", row.split("|")[1])
    }
    declared = {p["name"] for p in engine.load_template("bridge")["parameters"]}
    assert documented == declared
    assert f"`{' '.join(BRIDGE_COMMAND)}`" in " ".join(section.split())


def test_monitoring_selects_the_pods_the_other_templates_make() -> None:
    """The PodMonitors select the rabbitmq StatefulSet's and the bridge Deployment's pod labels
    and name ports those pods declare; the same NAME defaults tie them together."""
    monitors = {
        m["metadata"]["name"]: m for m in find_objects(rendered("monitoring"), "PodMonitor")
    }
    for monitor, template, kind in (
        ("packit-broker-rabbitmq", "rabbitmq", "StatefulSet"),
        ("packit-broker-bridge", "bridge", "Deployment"),
    ):
        pod = one(rendered(template), kind)["spec"]["template"]
        selector = monitors[monitor]["spec"]["selector"]["matchLabels"]
        assert selector.items() <= pod["metadata"]["labels"].items()
        ports = {p["name"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
        assert {e["port"] for e in monitors[monitor]["spec"]["podMetricsEndpoints"]} <= ports


def test_monitoring_dashboard_is_json_with_a_query_per_panel() -> None:
    (board,) = [
        json.loads(text)
        for c in find_objects(rendered("monitoring"), "ConfigMap")
        for text in c["data"].values()
    ]
    assert board["panels"] and all(
        p["targets"] and p["targets"][0]["expr"] for p in board["panels"]
    )
