#!/usr/bin/env python3
"""Renders a kustomization of deploy/kubernetes the way `kubectl kustomize` does, for machines
without kustomize (Debian has no package for it): deploy/check validates what this prints.

It implements the kustomize features these manifests use, and refuses any other field (so a
manifest that starts using one fails loudly instead of rendering wrong): `resources` (files and
directories with a kustomization), `namespace`, `labels` (metadata only), `images`,
`replicas`, `secretGenerator` / `configMapGenerator` (`envs`, `literals`, `behavior: merge`;
names get a content hash suffix and references to them follow), and `patches` with a path
(strategic merge: maps merge, lists of named items merge by name, the patch's first,
other lists are replaced).
Where kubectl is installed, deploy/check compares both renderings.

Usage: render.py DIR  (prints a multi-document YAML stream)
"""

import base64
import copy
import hashlib
import json
import os
import sys

import yaml

KNOWN = {
    "apiVersion", "kind", "namespace", "labels", "resources", "images", "replicas",
    "secretGenerator", "configMapGenerator", "patches",
}


def fail(msg):
    sys.exit(f"render.py: {msg}")


def load_docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def key(doc):
    return (doc["kind"], doc["metadata"]["name"])


def merge(base, patch):
    """Strategic merge patch of `patch` into `base` (both plain YAML values)."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = merge(base[k], v) if k in base else copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(patch, list) and all(
        isinstance(x, dict) and "name" in x for x in base + patch
    ):
        # Like kustomize: the patch's items first (merged with their namesakes), then the
        # base's other items.
        by_name = {x["name"]: x for x in base}
        named = {x["name"] for x in patch}
        out = [merge(by_name[x["name"]], x) if x["name"] in by_name else copy.deepcopy(x)
               for x in patch]
        return out + [copy.deepcopy(x) for x in base if x["name"] not in named]
    return copy.deepcopy(patch)


def read_env(path):
    data = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            k, _, v = line.partition("=")
            data[k] = v
    return data


def content_hash(doc):
    # A stable suffix of the generated object's content (kustomize's own hash differs; only
    # its presence and the references to it matter for validation).
    text = json.dumps({"kind": doc["kind"], "data": doc.get("data", {})}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def generated(kind, gen, directory):
    data = {}
    for env in gen.get("envs", []):
        data.update(read_env(os.path.join(directory, env)))
    for literal in gen.get("literals", []):
        k, _, v = literal.partition("=")
        data[k] = v
    unknown = set(gen) - {"name", "envs", "literals", "behavior"}
    if unknown:
        fail(f"{directory}: unsupported generator fields {sorted(unknown)}")
    doc = {"apiVersion": "v1", "kind": kind, "metadata": {"name": gen["name"]}}
    if kind == "Secret":
        doc["type"] = "Opaque"
        doc["data"] = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
    else:
        doc["data"] = data
    return doc, gen.get("behavior", "create")


def walk_pod_specs(doc):
    spec = doc.get("spec", {})
    template = spec.get("template", {}).get("spec")
    return [template] if template else []


def render(directory):
    path = os.path.join(directory, "kustomization.yaml")
    with open(path) as f:
        k = yaml.safe_load(f)
    unknown = set(k) - KNOWN
    if unknown:
        fail(f"{path}: unsupported fields {sorted(unknown)}")
    docs = []
    for res in k.get("resources", []):
        full = os.path.normpath(os.path.join(directory, res))
        if os.path.isdir(full):
            docs.extend(render(full))
        else:
            docs.extend(load_docs(full))
    renames = {}
    created = set()
    for kind, field in (("Secret", "secretGenerator"), ("ConfigMap", "configMapGenerator")):
        for gen in k.get(field, []):
            doc, behavior = generated(kind, gen, directory)
            if behavior == "merge":
                for i, existing in enumerate(docs):
                    if key(existing) == key(doc):
                        doc = merge(existing, {"data": doc["data"]})
                        docs[i] = doc
                        break
                else:
                    fail(f"{path}: nothing to merge {kind} {gen['name']} into")
            else:
                docs.append(doc)
                created.add(key(doc))
    for patch in k.get("patches", []):
        if set(patch) != {"path"}:
            fail(f"{path}: only patches with a path are supported")
        for p in load_docs(os.path.join(directory, patch["path"])):
            for i, existing in enumerate(docs):
                if key(existing) == key(p):
                    docs[i] = merge(existing, p)
                    break
            else:
                fail(f"{path}: patch {patch['path']} matches no resource")
    if "namespace" in k:
        for doc in docs:
            if doc["kind"] == "Namespace":
                continue
            doc["metadata"]["namespace"] = k["namespace"]
    for label in k.get("labels", []):
        if set(label) - {"pairs"}:
            fail(f"{path}: only labels with pairs (metadata only) are supported")
        for doc in docs:
            doc["metadata"].setdefault("labels", {}).update(label["pairs"])
    for r in k.get("replicas", []):
        for doc in docs:
            if doc["metadata"]["name"] == r["name"] and "replicas" in doc.get("spec", {}):
                doc["spec"]["replicas"] = r["count"]
    for image in k.get("images", []):
        for doc in docs:
            for pod in walk_pod_specs(doc):
                for c in pod.get("containers", []) + pod.get("initContainers", []):
                    name, _, tag = c["image"].partition(":")
                    if name == image["name"]:
                        c["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"
    # Generated objects get a hash suffix where they are made (not when merged into an
    # existing one); references follow.
    for doc in docs:
        if key(doc) in created:
            new = f"{doc['metadata']['name']}-{content_hash(doc)}"
            renames[(doc["kind"], doc["metadata"]["name"])] = new
            doc["metadata"]["name"] = new
    if renames:
        for doc in docs:
            for pod in walk_pod_specs(doc):
                rename_refs(pod, renames)
    return docs


def rename_refs(node, renames):
    if isinstance(node, dict):
        for field, kind in (("secretRef", "Secret"), ("secretKeyRef", "Secret"),
                            ("configMapRef", "ConfigMap"), ("configMapKeyRef", "ConfigMap")):
            ref = node.get(field)
            if isinstance(ref, dict) and (kind, ref.get("name")) in renames:
                ref["name"] = renames[(kind, ref["name"])]
        for v in node.values():
            rename_refs(v, renames)
    elif isinstance(node, list):
        for v in node:
            rename_refs(v, renames)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        fail("usage: render.py DIR")
    yaml.safe_dump_all(render(sys.argv[1]), sys.stdout, sort_keys=True)
