"""Renders deploy/kubernetes/ha (tests/python/kustomize.py, compared with `kubectl kustomize` when
kubectl is installed), validates every resource strictly against the Kubernetes schema, runs the
base's checks (check_manifests.py) on it, and checks what docs/operations.md says of the HA
topology: three servers, each with its own data volume, the Postgres URL from a Secret (required),
a headless Service of ready servers that is the agents' server_address and the StatefulSet's
governing Service, a PodDisruptionBudget over the server pods, and anti-affinity by node. Prints
one line per problem and exits non-zero if there is any."""

import sys
import tomllib
from pathlib import Path

import yaml

import check_manifests

problems = []
documents = check_manifests.rendered(sys.argv[1], problems)


def expect(condition, message):
    if not condition:
        problems.append(message)


def selects(selector, labels):
    match = selector.get("matchLabels", {})
    return bool(match) and not selector.get("matchExpressions") and all(labels.get(k) == v for k, v in match.items())


if documents:
    check_manifests.validate(documents, problems)
    kinds = check_manifests.by_kind(documents)
    check_manifests.check_deployment(kinds, problems)

    statefulset = kinds["StatefulSet"][0]
    spec = statefulset["spec"]
    pod = spec["template"]["spec"]
    pod_labels = spec["template"]["metadata"]["labels"]
    expect(spec.get("replicas") == 3, f"StatefulSet: {spec.get('replicas')} replicas, not 3")
    expect(spec.get("updateStrategy", {}).get("type", "RollingUpdate") == "RollingUpdate", "StatefulSet: rolling updates")
    container = pod["containers"][0]
    mounts = {m["name"]: m["mountPath"] for m in container.get("volumeMounts", [])}
    claims = [c["metadata"]["name"] for c in spec.get("volumeClaimTemplates", [])]
    expect("data" in claims and mounts.get("data") == "/var/lib/sigil", "StatefulSet: each server's data dir /var/lib/sigil on its own volumeClaimTemplate")
    expect("data" not in {v["name"] for v in pod.get("volumes", [])}, "StatefulSet: the data volume is shared, not per server")

    env = {e["name"]: e for e in container.get("env", [])}
    secret = env.get("SIGIL_DATASTORE_URL", {}).get("valueFrom", {}).get("secretKeyRef", {})
    expect(secret.get("name") == "sigil-datastore" and secret.get("key") == "url", "StatefulSet: SIGIL_DATASTORE_URL from the Secret sigil-datastore, key url")
    expect(secret.get("optional") is False, "StatefulSet: the datastore Secret must be required (else each server falls back to its own SQLite)")
    for document in kinds.get("ConfigMap", []):
        if document["metadata"]["name"] == "sigil-server":
            server_config = tomllib.loads(document["data"]["server.toml"])
            url = server_config.get("datastore", {}).get("url", "")
            expect(not url.startswith("sqlite"), f"server config: datastore url {url} is SQLite")
            expect(server_config.get("data_dir") == "/var/lib/sigil", "server config: data_dir is the volume")

    headless = [
        s
        for s in kinds.get("Service", [])
        if s["spec"].get("clusterIP") == "None" and selects({"matchLabels": s["spec"].get("selector", {})}, pod_labels)
    ]
    expect(len(headless) == 1, f"{len(headless)} headless Services (clusterIP None) select the server pods, not 1")
    if headless:
        service = headless[0]
        name = service["metadata"]["name"]
        expect(spec.get("serviceName") == name, f"StatefulSet: serviceName {spec.get('serviceName')} is not the headless Service {name}")
        expect(not service["spec"].get("publishNotReadyAddresses", False), f"Service {name}: publishes servers that are not ready")
        ports = {p["port"]: p for p in service["spec"]["ports"]}
        container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        expect(container_ports.get("agent-api") in ports, f"Service {name}: no port for the agent API")
        agent_config = next(d for d in kinds["ConfigMap"] if d["metadata"]["name"] == "sigil-agent")
        addresses = tomllib.loads(agent_config["data"]["agent.toml"])["server_address"]
        addresses = addresses if isinstance(addresses, list) else [addresses]
        wanted = f"{name}.{service['metadata']['namespace']}.svc:{container_ports.get('agent-api')}"
        expect(addresses == [wanted], f"agent config: server_address {addresses}, not [{wanted!r}] (the headless Service)")

    budgets = [b for b in kinds.get("PodDisruptionBudget", []) if selects(b["spec"].get("selector", {}), pod_labels)]
    expect(len(budgets) == 1, f"{len(budgets)} PodDisruptionBudgets select the server pods, not 1")
    for budget in budgets:
        b = budget["spec"]
        expect(b.get("maxUnavailable") == 1 or b.get("minAvailable") == 2, f"PodDisruptionBudget: {b}: neither maxUnavailable 1 nor minAvailable 2")

    anti = pod.get("affinity", {}).get("podAntiAffinity", {})
    terms = [t.get("podAffinityTerm", {}) for t in anti.get("preferredDuringSchedulingIgnoredDuringExecution", [])]
    terms += anti.get("requiredDuringSchedulingIgnoredDuringExecution", [])
    expect(
        any(t.get("topologyKey") == "kubernetes.io/hostname" and selects(t.get("labelSelector", {}), pod_labels) for t in terms),
        "StatefulSet: no pod anti-affinity between servers by kubernetes.io/hostname",
    )

    # The example Secret (not applied by the overlay) is valid and is the one the servers read.
    example = Path(sys.argv[1]) / "datastore-secret.example.yaml"
    secrets = [(str(example), d) for d in yaml.safe_load_all(example.read_text()) if d]
    check_manifests.validate(secrets, problems)
    for _, document in secrets:
        expect(document["metadata"]["name"] == secret.get("name"), f"{example}: not the Secret the servers read")
        expect(document.get("stringData", {}).get(secret.get("key"), "").startswith("postgres://"), f"{example}: no postgres:// url")

check_manifests.report(documents, problems)
