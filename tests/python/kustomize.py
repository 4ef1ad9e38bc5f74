"""The part of kustomize that Sigil's overlays use, so the manifest checks need no binary that is
not on PyPI: `resources` (files, and directories with a kustomization.yaml), `namespace`, and
`patches` given by `path` (strategic merge patches, matched by kind and name). Anything else in a
kustomization is refused, so an overlay that grows a feature this does not know fails the check
instead of being checked half-rendered. When `kubectl` is on PATH, `render` also builds with
`kubectl kustomize` and reports any difference from this rendering."""

import shutil
import subprocess
from pathlib import Path

import yaml

KNOWN = {"apiVersion", "kind", "resources", "namespace", "patches"}
# Lists that strategic merge merges item by item on this key (the ones our patches touch and
# their neighbours); any other list a patch gives replaces the base's.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "ports": "containerPort",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "volumeClaimTemplates": None,
}


class Unsupported(Exception):
    pass


def _merge_list(key, base, patch):
    merge_key = MERGE_KEYS.get(key)
    if merge_key is None or not all(isinstance(i, dict) for i in base + patch):
        return patch
    merged = [dict(i) for i in base]
    for item in patch:
        for index, existing in enumerate(merged):
            if existing.get(merge_key) == item.get(merge_key):
                merged[index] = merge(existing, item)
                break
        else:
            merged.append(item)
    return merged


def merge(base, patch):
    """Strategic merge of `patch` into `base` (maps merge key by key, known lists by their merge
    key, everything else is replaced; `null` deletes)."""
    if not isinstance(base, dict) or not isinstance(patch, dict):
        return patch
    result = dict(base)
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        elif isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merge(result[key], value)
        elif isinstance(value, list) and isinstance(result.get(key), list):
            result[key] = _merge_list(key, result[key], value)
        else:
            result[key] = value
    return result


def _load(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def build(directory):
    """The resources `directory`'s kustomization renders to, in order, as (source, document)."""
    directory = Path(directory)
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - KNOWN
    if unknown:
        raise Unsupported(f"{directory}/kustomization.yaml: {sorted(unknown)} not supported by tests/python/kustomize.py")
    documents = []
    for name in kustomization.get("resources", []):
        path = directory / name
        if path.is_dir():
            documents.extend(build(path))
        else:
            documents.extend((str(path), d) for d in _load(path))
    for patch in kustomization.get("patches", []):
        if set(patch) != {"path"}:
            raise Unsupported(f"{directory}: patch {patch}: only `path:` patches are supported")
        for document in _load(directory / patch["path"]):
            targets = [
                i
                for i, (_, d) in enumerate(documents)
                if d["kind"] == document["kind"] and d["metadata"]["name"] == document["metadata"]["name"]
            ]
            if len(targets) != 1:
                raise Unsupported(f"{directory}/{patch['path']}: patches {len(targets)} resources, not one")
            source, target = documents[targets[0]]
            documents[targets[0]] = (source, merge(target, document))
    if "namespace" in kustomization:
        for _, document in documents:
            if document["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
                document["metadata"]["namespace"] = kustomization["namespace"]
    return documents


def _key(document):
    return (document["kind"], document["metadata"].get("namespace"), document["metadata"]["name"])


def render(directory):
    """`build(directory)`, plus the problems found comparing it with `kubectl kustomize` when
    kubectl is installed (none when it is not)."""
    documents = build(directory)
    problems = []
    kubectl = shutil.which("kubectl")
    if kubectl:
        output = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True)
        if output.returncode != 0:
            problems.append(f"kubectl kustomize {directory} failed: {output.stderr.strip()}")
        else:
            theirs = {_key(d): d for d in yaml.safe_load_all(output.stdout) if d}
            ours = {_key(d): d for _, d in documents}
            for key in sorted(set(theirs) | set(ours), key=str):
                if theirs.get(key) != ours.get(key):
                    problems.append(f"{directory}: {key} renders differently with kubectl kustomize")
    return documents, problems
