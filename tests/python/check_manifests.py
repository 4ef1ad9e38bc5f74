"""Validates every resource of deploy/kubernetes against the Kubernetes schema (kubernetes-validate,
strict), and checks that the DaemonSet, StatefulSet and RBAC carry what docs/kubernetes.md
promises. Prints one line per problem and exits non-zero if there is any."""

import sys
from pathlib import Path

import kubernetes_validate
import yaml

base = Path(sys.argv[1])
kustomization = yaml.safe_load((base / "kustomization.yaml").read_text())
documents = []
for name in kustomization["resources"]:
    for document in yaml.safe_load_all((base / name).read_text()):
        if document:
            documents.append((name, document))

problems = []
for name, document in documents:
    try:
        kubernetes_validate.validate(document, "1.33.0", strict=True)
    except kubernetes_validate.ValidationError as error:
        problems.append(f"{name}: {document['kind']}/{document['metadata']['name']}: {error.message}")
    except Exception as error:  # unknown kinds and schema errors are failures too
        problems.append(f"{name}: {document.get('kind')}: {error}")

by_kind = {}
for _, document in documents:
    by_kind.setdefault(document["kind"], []).append(document)


def pod_spec(kind):
    return by_kind[kind][0]["spec"]["template"]["spec"]


def expect(condition, message):
    if not condition:
        problems.append(message)


for kind in ("DaemonSet", "StatefulSet"):
    container = pod_spec(kind)["containers"][0]
    expect(container.get("livenessProbe", {}).get("httpGet", {}).get("path") == "/live", f"{kind}: liveness probe on /live")
    expect(container.get("readinessProbe", {}).get("httpGet", {}).get("path") == "/ready", f"{kind}: readiness probe on /ready")
    expect("requests" in container.get("resources", {}), f"{kind}: resource requests")
    security = container.get("securityContext", {})
    expect(security.get("allowPrivilegeEscalation") is False, f"{kind}: no privilege escalation")
    expect(security.get("readOnlyRootFilesystem") is True, f"{kind}: read-only root filesystem")
    expect(security.get("capabilities", {}).get("drop") == ["ALL"], f"{kind}: capabilities dropped")

agent = pod_spec("DaemonSet")
expect(agent.get("hostPID") is True, "DaemonSet: hostPID")
volumes = {v["name"]: v for v in agent["volumes"]}
expect(volumes.get("sockets", {}).get("hostPath", {}).get("path") == "/run/sigil/sockets", "DaemonSet: socket hostPath")
tokens = [s["serviceAccountToken"] for s in volumes.get("token", {}).get("projected", {}).get("sources", []) if "serviceAccountToken" in s]
expect(tokens and tokens[0].get("audience") == "sigil-server", "DaemonSet: projected token with audience sigil-server")
expect(volumes.get("bundle", {}).get("configMap", {}).get("name") == "sigil-bundle", "DaemonSet: bootstrap bundle from the sigil-bundle ConfigMap")
env = {e["name"]: e for e in agent["containers"][0].get("env", [])}
expect(env.get("NODE_NAME", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "spec.nodeName", "DaemonSet: NODE_NAME from the downward API")

server = by_kind["StatefulSet"][0]["spec"]
expect(server.get("volumeClaimTemplates"), "StatefulSet: a PVC for SQLite")


def rules(kind, name):
    for document in by_kind.get(kind, []):
        if document["metadata"]["name"] == name:
            return document["rules"]
    return []


server_rules = rules("ClusterRole", "sigil-server")
expect(any("tokenreviews" in r["resources"] and r["verbs"] == ["create"] for r in server_rules), "server RBAC: TokenReview create")
expect(any(set(r["resources"]) == {"pods", "nodes"} and set(r["verbs"]) == {"get", "list", "watch"} for r in server_rules), "server RBAC: pods and nodes get/list/watch")
for rule in server_rules + rules("ClusterRole", "sigil-agent"):
    expect("*" not in rule["verbs"] and "*" not in rule["resources"], f"RBAC: no wildcards ({rule})")

for problem in problems:
    print(problem)
print(f"{len(documents)} resources checked, {len(problems)} problems")
sys.exit(1 if problems else 0)
