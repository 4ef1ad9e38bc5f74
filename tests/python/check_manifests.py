"""Validates every resource that deploy/kubernetes renders to against the Kubernetes schema
(kubernetes-validate, strict), and checks that the DaemonSet, StatefulSet and RBAC carry what
docs/kubernetes.md promises. The rendering is tests/python/kustomize.py's (compared with `kubectl
kustomize` when kubectl is installed). Prints one line per problem and exits non-zero if there is
any. check_ha_overlay.py runs the same checks on deploy/kubernetes/ha."""

import sys

import kubernetes_validate

import kustomize


def validate(documents, problems):
    for source, document in documents:
        try:
            kubernetes_validate.validate(document, "1.33.0", strict=True)
        except kubernetes_validate.ValidationError as error:
            problems.append(f"{source}: {document['kind']}/{document['metadata']['name']}: {error.message}")
        except Exception as error:  # unknown kinds and schema errors are failures too
            problems.append(f"{source}: {document.get('kind')}: {error}")


def by_kind(documents):
    kinds = {}
    for _, document in documents:
        kinds.setdefault(document["kind"], []).append(document)
    return kinds


def check_deployment(kinds, problems):
    """What docs/kubernetes.md promises of the agent DaemonSet, the server StatefulSet and RBAC."""

    def expect(condition, message):
        if not condition:
            problems.append(message)

    def pod_spec(kind):
        return kinds[kind][0]["spec"]["template"]["spec"]

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

    server = kinds["StatefulSet"][0]["spec"]
    expect(server.get("volumeClaimTemplates"), "StatefulSet: a PVC for the data directory")

    def rules(kind, name):
        for document in kinds.get(kind, []):
            if document["metadata"]["name"] == name:
                return document["rules"]
        return []

    server_rules = rules("ClusterRole", "sigil-server")
    expect(any("tokenreviews" in r["resources"] and r["verbs"] == ["create"] for r in server_rules), "server RBAC: TokenReview create")
    expect(any(set(r["resources"]) == {"pods", "nodes"} and set(r["verbs"]) == {"get", "list", "watch"} for r in server_rules), "server RBAC: pods and nodes get/list/watch")
    for rule in server_rules + rules("ClusterRole", "sigil-agent"):
        expect("*" not in rule["verbs"] and "*" not in rule["resources"], f"RBAC: no wildcards ({rule})")


def rendered(directory, problems):
    try:
        documents, differences = kustomize.render(directory)
    except kustomize.Unsupported as error:
        problems.append(str(error))
        return []
    problems.extend(differences)
    return documents


def report(documents, problems):
    for problem in problems:
        print(problem)
    print(f"{len(documents)} resources checked, {len(problems)} problems")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    problems = []
    documents = rendered(sys.argv[1], problems)
    if documents:
        validate(documents, problems)
        check_deployment(by_kind(documents), problems)
    report(documents, problems)
