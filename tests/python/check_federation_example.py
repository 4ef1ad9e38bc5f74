"""Checks deploy/examples/federation: every complete resource validates strictly against the
Kubernetes schema, each cluster's server and agent agree on their trust domain, the two clusters
are different trust domains, the bundle endpoint is on, and the Service reaches the container port
the server's configuration listens on. Prints one line per problem."""

import sys
import tomllib
from pathlib import Path

import kubernetes_validate
import yaml

root = Path(sys.argv[1]) / "deploy/examples/federation"
problems = []


def expect(condition, message):
    if not condition:
        problems.append(message)


domains = {}
for cluster in ("cluster-a", "cluster-b"):
    base = root / cluster
    kustomization = yaml.safe_load((base / "kustomization.yaml").read_text())
    documents = {}
    for name in kustomization["resources"][1:] + [p["path"] for p in kustomization["patches"]]:
        for document in yaml.safe_load_all((base / name).read_text()):
            documents[(document["kind"], document["metadata"]["name"])] = document
            if document["kind"] in ("ConfigMap", "Service"):
                try:
                    kubernetes_validate.validate(document, "1.33.0", strict=True)
                except kubernetes_validate.ValidationError as error:
                    problems.append(f"{cluster}/{name}: {error.message}")
    server = tomllib.loads(documents[("ConfigMap", "sigil-server")]["data"]["server.toml"])
    agent = tomllib.loads(documents[("ConfigMap", "sigil-agent")]["data"]["agent.toml"])
    expect(server["trust_domain"] == agent["trust_domain"], f"{cluster}: server and agent trust domains differ")
    domains[cluster] = server["trust_domain"]
    address = server.get("federation", {}).get("bundle_endpoint_address", "")
    expect(address, f"{cluster}: the bundle endpoint is off")
    port = int(address.rpartition(":")[2] or 0)
    container = documents[("StatefulSet", "sigil-server")]["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    service = documents[("Service", "sigil-bundle-endpoint")]
    target = service["spec"]["ports"][0]["targetPort"]
    expect(ports.get(target) == port, f"{cluster}: the Service targets {target}, not the endpoint port {port}")
    expect(server["kubernetes"]["cluster"] == agent["kubernetes"]["cluster"], f"{cluster}: cluster names differ")

expect(domains["cluster-a"] != domains["cluster-b"], "the two clusters must be different trust domains")

for problem in problems:
    print(problem)
print(f"{len(problems)} problems")
sys.exit(1 if problems else 0)
