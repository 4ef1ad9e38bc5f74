"""Checks that deploy/istio agrees with deploy/kubernetes and with what istio-agent looks for:
the trust domains match, the injection templates mount the agent's socket directory at
/var/run/secrets/workload-spiffe-uds (where the agent's socket file is named `socket`), gateways
wait for the socket, and the CA mode points caAddress at the server's Service by a name its
certificate carries, turns istiod's own CA off and the server's Istio API on. Plain Kubernetes
resources of the overlay validate strictly against the schema. Prints one line per problem."""

import sys
import tomllib
from pathlib import Path

import kubernetes_validate
import yaml

root = Path(sys.argv[1])
SOCKET_DIR_IN_PROXY = "/var/run/secrets/workload-spiffe-uds"
problems = []


def expect(condition, message):
    if not condition:
        problems.append(message)


def load(path):
    return [d for d in yaml.safe_load_all((root / path).read_text()) if d]


def config(path, key):
    return tomllib.loads(load(path)[0]["data"][key])


agent = config("deploy/kubernetes/base/agent-config.yaml", "agent.toml")
base_server = config("deploy/kubernetes/base/server-config.yaml", "server.toml")
daemonset = load("deploy/kubernetes/base/agent-daemonset.yaml")[0]
host_socket_dir = next(
    v["hostPath"]["path"] for v in daemonset["spec"]["template"]["spec"]["volumes"] if v["name"] == "sockets"
)
socket_path = Path(agent["socket_path"])
expect(socket_path.name == "socket", f"the agent's socket must be named `socket` for istio-agent, not {socket_path.name}")
expect(str(socket_path.parent) == host_socket_dir, f"the agent's socket {socket_path} is not in the hostPath {host_socket_dir}")
trust_domain = agent["trust_domain"]
expect(base_server["trust_domain"] == trust_domain, "server and agent trust domains differ")


def check_template(name, template, source):
    spec = yaml.safe_load(template)["spec"]
    proxy = next((c for c in spec.get("containers", []) if c["name"] == "istio-proxy"), None)
    expect(proxy is not None, f"{source}: template {name} does not patch istio-proxy")
    if proxy is None:
        return
    mounts = {m["name"]: m for m in proxy.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    socket_mounts = [m for m in mounts.values() if m["mountPath"] == SOCKET_DIR_IN_PROXY]
    expect(len(socket_mounts) == 1, f"{source}: template {name} does not mount {SOCKET_DIR_IN_PROXY}")
    for mount in socket_mounts:
        expect(mount.get("readOnly") is True, f"{source}: template {name} mounts the socket read-write")
        volume = volumes.get(mount["name"], {})
        if "hostPath" in volume:
            expect(volume["hostPath"]["path"] == host_socket_dir, f"{source}: template {name} mounts {volume['hostPath']['path']}, not {host_socket_dir}")
        else:
            expect(volume.get("csi", {}).get("driver") == "csi.spiffe.io", f"{source}: template {name}: neither the hostPath nor the SPIFFE CSI driver")
    return spec


def check_injection(source, values):
    expect(values["meshConfig"]["trustDomain"] == trust_domain, f"{source}: meshConfig.trustDomain is not {trust_domain}")
    injector = values["sidecarInjectorWebhook"]
    templates = injector["templates"]
    expect("sigil" in injector.get("defaultTemplates", []), f"{source}: the sigil template is not a default template")
    check_template("sigil", templates["sigil"], source)
    if "sigil-gateway" in templates:
        spec = check_template("sigil-gateway", templates["sigil-gateway"], source)
        waits = [c for c in spec.get("initContainers", []) if f"{SOCKET_DIR_IN_PROXY}/socket" in " ".join(c["command"])]
        expect(waits, f"{source}: the gateway template does not wait for the socket")


operator = load("deploy/istio/sds-mode/istio-operator.yaml")[0]
expect(operator["kind"] == "IstioOperator", "sds-mode: not an IstioOperator")
check_injection("sds-mode/istio-operator.yaml", {**operator["spec"]["values"], "meshConfig": operator["spec"]["meshConfig"]})
check_injection("sds-mode/values.yaml", load("deploy/istio/sds-mode/values.yaml")[0])
check_injection("sds-mode/csi-values.yaml", load("deploy/istio/sds-mode/csi-values.yaml")[0])
gateway = operator["spec"]["components"]["ingressGateways"][0]["k8s"]["overlays"][0]["patches"]
paths = {p["path"]: p["value"] for p in gateway}
expect(
    any(v.get("mountPath") == SOCKET_DIR_IN_PROXY for k, v in paths.items() if "volumeMounts" in k),
    "sds-mode: the ingress gateway does not mount the socket",
)
expect(
    any(f"{SOCKET_DIR_IN_PROXY}/socket" in " ".join(c["command"]) for c in paths.get("spec.template.spec.initContainers", [])),
    "sds-mode: the ingress gateway does not wait for the socket",
)

# CA mode: Istio's side and Sigil's overlay.
ca = load("deploy/istio/ca-mode/istio-operator.yaml")[0]["spec"]
expect(ca["meshConfig"]["trustDomain"] == trust_domain, "ca-mode: meshConfig.trustDomain differs")
ca_host, _, ca_port = ca["values"]["global"]["caAddress"].rpartition(":")
env = {e["name"]: e["value"] for e in ca["components"]["pilot"]["k8s"]["env"]}
expect(env.get("ENABLE_CA_SERVER") == "false", "ca-mode: istiod's own CA is not turned off")
service = load("deploy/kubernetes/base/server-service.yaml")[0]
expect(
    ca_host.split(".")[:2] == [service["metadata"]["name"], service["metadata"]["namespace"]],
    f"ca-mode: caAddress {ca_host} is not the server's Service",
)
expect(int(ca_port) in [p["port"] for p in service["spec"]["ports"]], f"ca-mode: port {ca_port} is not a Service port")
overlay = yaml.safe_load((root / "deploy/istio/ca-mode/kustomization.yaml").read_text())
expect("../../kubernetes" in overlay["resources"], "ca-mode: the overlay does not build on deploy/kubernetes")
server = config("deploy/istio/ca-mode/server-config.yaml", "server.toml")
expect(server["trust_domain"] == trust_domain, "ca-mode: the server's trust domain differs")
expect(ca_host in server.get("server_dns_names", []), f"ca-mode: the server's certificate does not carry {ca_host}")
kubernetes = server["kubernetes"]
expect(kubernetes.get("istio_ca") is True, "ca-mode: istio_ca is off")
expect(kubernetes.get("istio_root_cert_configmaps") is True, "ca-mode: istio_root_cert_configmaps is off")
expect("istio-system" in kubernetes.get("namespaces_exclude", []), "ca-mode: istiod would get an automatic identity beside its entry")
istiod = ca["components"]["pilot"]["k8s"]["overlays"][0]["patches"]
helper = next(p["value"][0] for p in istiod if p["path"] == "spec.template.spec.initContainers")
expect(helper.get("restartPolicy") == "Always", "ca-mode: the certificate helper is not a native sidecar")
expect("--watch" in helper["args"] and "tls.crt" in helper["args"], "ca-mode: the helper does not keep tls.crt fresh")

for path in ("deploy/istio/ca-mode/server-rbac-istio.yaml", "deploy/istio/ca-mode/server-config.yaml"):
    for document in load(path):
        try:
            kubernetes_validate.validate(document, "1.33.0", strict=True)
        except kubernetes_validate.ValidationError as error:
            problems.append(f"{path}: {document['kind']}/{document['metadata']['name']}: {error.message}")
        for rule in document.get("rules", []):
            expect("*" not in rule["verbs"] and "*" not in rule["resources"], f"{path}: wildcard in {rule}")

for problem in problems:
    print(problem)
print(f"{len(problems)} problems")
sys.exit(1 if problems else 0)
