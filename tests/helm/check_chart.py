#!/usr/bin/env python3
"""Checks of the event-exporter Helm chart with real Helm (no helm binary needed).

Needs a Python (>= 3.10) with the PyPI packages `helm-python-sdk` (the Helm v4 SDK: lint and
`helm template` rendering) and `kubernetes-validate` (offline Kubernetes schemas), and the
exporter binary (`EVENT_EXPORTER_BIN`, or `--bin`, default target/debug/event-exporter):

    python3 -m venv /tmp/helm-venv
    /tmp/helm-venv/bin/pip install helm-python-sdk kubernetes-validate
    cargo build
    /tmp/helm-venv/bin/python tests/helm/check_chart.py

What it checks:
  * `helm lint --strict` of the chart: no errors, no warnings;
  * renders with the default values and with each example of the configuration spec
    (conservative / aggressive / disabled backfill, fast / conservative retries, custom metadata
    under `metadata` and `exporter.metadata`, OIDC disabled, ...), also as the `event-exporter`
    subchart of an umbrella chart; `global.eventExporter.enabled=false` renders nothing;
  * every rendered manifest validates against the Kubernetes 1.33.0 schemas (strict);
  * every rendered config.toml is valid TOML (Python's tomllib) and is accepted by the binary's
    own loader (`event-exporter check-config`), whose effective settings must equal the values
    given, with no unknown keys;
  * the Deployment: args, port, probes, security context, grace period vs --shutdown-grace,
    OIDC secret and PostgreSQL client-certificate mounts, datastore envFrom, checksum annotation,
    the dead-letter volume (a PersistentVolumeClaim or an emptyDir, mounted writable while the
    root filesystem stays read-only) and the proxy environment (HTTPS_PROXY, HTTP_PROXY,
    NO_PROXY);
  * invalid values fail at render time with a message naming the value;
  * monitoring (off by default): the PrometheusRule renders exactly the groups of
    deploy/prometheus/event-exporter-rules.yaml (and its per-alert overrides apply), the
    ServiceMonitor selects the metrics Service which selects the pods, the dashboard ConfigMap
    carries the sidecar label and deploy/grafana/event-exporter.json; the custom resources are
    validated against transcribed parts of prometheus-operator's CRD schemas (kubernetes-validate
    knows built-in kinds only), the rendered rules with `promtool check rules` when installed;
  * deploy/kubernetes/ equals a fresh default render (`--write-manifests` regenerates it).

Exits 1 with a FAIL line per problem.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

try:
    import helm_python as helm
    import kubernetes_validate
    import yaml
except ImportError as error:  # pragma: no cover - reported to the caller
    sys.exit(
        f"FAIL: {error}: run with a Python that has helm-python-sdk and kubernetes-validate "
        "(pip install helm-python-sdk kubernetes-validate)"
    )

try:  # Python >= 3.11; tomli is the same parser for 3.10
    import tomllib
except ImportError:  # pragma: no cover
    try:
        import tomli as tomllib  # type: ignore[no-redef]
    except ImportError:
        tomllib = None  # type: ignore[assignment]

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "event-exporter"
MANIFESTS = ROOT / "deploy" / "kubernetes"
RELEASE = "nvsentinel"
NAMESPACE = "nvsentinel"
KUBE_VERSION = "1.33.0"
MANIFEST_HEADER = """\
# Generated from deploy/helm/event-exporter ({source}) with the chart's default values,
# release "{release}", namespace "{namespace}", by:
#   tests/helm/check_chart.py --write-manifests
# Do not edit: the chart checks fail when this file differs from a fresh render.
"""

FAILURES: list[str] = []


def fail(message: str) -> None:
    FAILURES.append(message)
    print(f"FAIL: {message}", flush=True)


def check(condition: bool, message: str) -> bool:
    if not condition:
        fail(message)
    return condition


def deep_merge(base: dict, override: dict) -> dict:
    """Helm's value coalescing for the cases here: maps merge, anything else replaces."""
    result = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = deep_merge(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


_UNITS = {"ns": 1, "us": 10**3, "µs": 10**3, "μs": 10**3, "ms": 10**6, "s": 10**9,
          "m": 60 * 10**9, "h": 3600 * 10**9}


def go_duration_ns(text: str) -> int:
    """A Go duration string ("720h", "1m30s", "1.5h", "720h0m0s") in nanoseconds."""
    if text == "0":
        return 0
    parts = re.findall(r"([0-9]*\.?[0-9]+)(ns|us|µs|μs|ms|s|m|h)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a Go duration: {text!r}")
    return round(sum(float(n) * _UNITS[u] for n, u in parts))


# --------------------------------------------------------------------------------------------
# Rendering


def render(chart_dir: Path, values: dict, release: str = RELEASE) -> dict[str, str]:
    with helm.Chart.load(str(chart_dir)) as chart:
        return chart.render(values, name=release, namespace=NAMESPACE)


def manifests(rendered: dict[str, str]) -> list[tuple[str, dict]]:
    """(template, object) for every Kubernetes object rendered (NOTES.txt excluded)."""
    objects = []
    for template, text in sorted(rendered.items()):
        if template.endswith("NOTES.txt"):
            continue
        for document in yaml.safe_load_all(text):
            if document:
                objects.append((template, document))
    return objects


def one(objects: list[tuple[str, dict]], kind: str) -> dict | None:
    found = [obj for _, obj in objects if obj.get("kind") == kind]
    return found[0] if len(found) == 1 else None


def validate_objects(case: str, objects: list[tuple[str, dict]]) -> None:
    for template, obj in objects:
        where = f"{case}: {template} {obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        try:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(p) for p in error.path)
            fail(f"{where} does not validate against Kubernetes {KUBE_VERSION}: {path}: "
                 f"{error.message}")
        except Exception as error:  # noqa: BLE001 - unknown kind, schema problems
            fail(f"{where} could not be validated: {type(error).__name__}: {error}")


# --------------------------------------------------------------------------------------------
# The binary's view of a rendered config.toml


def check_config(binary: Path, text: str, case: str) -> dict | None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.toml"
        path.write_text(text, encoding="utf-8")
        env = {k: v for k, v in os.environ.items() if not k.startswith("DATASTORE_")}
        # The secret and CA files exist only in the pod: --skip-files.
        result = subprocess.run(
            [str(binary), "check-config", f"--config={path}", "--skip-files"],
            capture_output=True, text=True, env=env, timeout=60, check=False,
        )
    if result.returncode != 0:
        fail(f"{case}: event-exporter check-config rejected the rendered config.toml "
             f"(exit {result.returncode}): {result.stderr.strip() or result.stdout.strip()}\n"
             f"{text}")
        return None
    try:
        return json.loads(result.stdout)
    except json.JSONDecodeError as error:
        fail(f"{case}: check-config printed no JSON ({error}): {result.stdout[:500]}")
        return None


def expected_effective(values: dict, metadata: dict[str, str]) -> dict:
    """What check-config must report for chart values `values` (defaults merged in)."""
    exporter = values["exporter"]
    sink, oidc = exporter["sink"], exporter["oidc"]
    backfill, retry = exporter["backfill"], exporter["failureHandling"]
    expression = (exporter.get("filter") or {}).get("expression") or ""
    return {
        "metadata": metadata,
        "client_name": exporter["clientName"],
        "workers": exporter["workers"],
        "sink": {
            "endpoint": sink["endpoint"],
            "timeout": go_duration_ns(sink["timeout"]),
            "insecure_skip_verify": sink["insecureSkipVerify"],
            "ca_file": sink.get("caFile") or None,
            "concurrency": sink.get("concurrency") or "fixed",
            "mode": sink.get("mode") or "structured",
            "batch": {
                "max_events": sink.get("batchMaxEvents") or 100,
                "max_bytes": sink.get("batchMaxBytes") or 1048576,
                "linger": go_duration_ns(sink.get("batchLinger") or "10ms"),
            },
        },
        "oidc": None if not oidc["enabled"] else {
            "token_url": oidc["tokenUrl"],
            "client_id": oidc["clientId"],
            "scope": oidc["scope"],
            "insecure_skip_verify": oidc["insecureSkipVerify"],
            "ca_file": oidc.get("caFile") or None,
            "client_auth_method": oidc["clientAuthMethod"],
            "default_token_lifetime": go_duration_ns(oidc["defaultTokenLifetime"]),
        },
        "backfill": {
            "enabled": backfill["enabled"],
            "max_age": go_duration_ns(backfill["maxAge"]),
            "max_events": backfill["maxEvents"],
            "batch_size": backfill["batchSize"],
            "rate_limit": backfill["rateLimit"],
        },
        "failure_handling": {
            "max_retries": retry["maxRetries"],
            "initial_backoff": go_duration_ns(retry["initialBackoff"]),
            "max_backoff": go_duration_ns(retry["maxBackoff"]),
            "backoff_multiplier": float(retry["backoffMultiplier"]),
        },
        "filter_expression": expression if expression.strip() else None,
        "subject": (exporter.get("cloudevent") or {}).get("subject") or "none",
        "rejections": {
            "on_rejected": retry["onRejected"],
            "rejected_statuses": list(retry["rejectedStatuses"]),
            "already_delivered_statuses": list(retry["alreadyDeliveredStatuses"]),
            "dead_letter": None if retry["onRejected"] != "dead_letter" else {
                "file": (retry.get("deadLetter") or {}).get("file") or None,
                "endpoint": (retry.get("deadLetter") or {}).get("endpoint") or None,
            },
        },
        "resume_token": {k: v for k, v in exporter["resumeToken"].items()
                         if k != "saveInterval"},
        "resume_token_save_interval": go_duration_ns(exporter["resumeToken"]["saveInterval"]),
        # Unset: the larger of 5m and 2 x (sink timeout + max backoff) (src/watchdog.rs).
        "liveness_timeout": go_duration_ns(exporter["livenessTimeout"])
        if exporter.get("livenessTimeout")
        else max(300 * 10**9, 2 * (go_duration_ns(sink["timeout"])
                                   + go_duration_ns(retry["maxBackoff"]))),
    }


def normalise_effective(report: dict) -> dict:
    """check-config's `exporter` object with durations in nanoseconds."""
    effective = copy.deepcopy(report["exporter"])
    effective["sink"]["batch"]["linger"] = go_duration_ns(effective["sink"]["batch"]["linger"])
    for section, keys in (("sink", ["timeout"]), ("backfill", ["max_age"]),
                          ("failure_handling", ["initial_backoff", "max_backoff"])):
        for key in keys:
            effective[section][key] = go_duration_ns(effective[section][key])
    effective["liveness_timeout"] = go_duration_ns(effective["liveness_timeout"])
    effective["resume_token_save_interval"] = go_duration_ns(
        effective["resume_token_save_interval"])
    if effective.get("oidc"):
        effective["oidc"]["default_token_lifetime"] = go_duration_ns(
            effective["oidc"]["default_token_lifetime"])
    effective["failure_handling"]["backoff_multiplier"] = float(
        effective["failure_handling"]["backoff_multiplier"])
    return effective


def diff(expected: Any, actual: Any, path: str = "") -> list[str]:
    if isinstance(expected, dict) and isinstance(actual, dict):
        out = []
        for key in sorted(set(expected) | set(actual)):
            sub = f"{path}.{key}" if path else key
            if key not in actual:
                out.append(f"{sub}: missing (expected {expected[key]!r})")
            elif key not in expected:
                out.append(f"{sub}: unexpected {actual[key]!r}")
            else:
                out.extend(diff(expected[key], actual[key], sub))
        return out
    return [] if expected == actual else [f"{path}: expected {expected!r}, got {actual!r}"]


# --------------------------------------------------------------------------------------------
# Deployment assertions


def container(deployment: dict, name: str, init: bool = False) -> dict | None:
    key = "initContainers" if init else "containers"
    for c in deployment["spec"]["template"]["spec"].get(key) or []:
        if c.get("name") == name:
            return c
    return None


def check_deployment(case: str, deployment: dict, configmap: dict, config_text: str,
                     values: dict, rendered_configmap: str, release: str) -> None:
    pod = deployment["spec"]["template"]["spec"]
    main = container(deployment, "event-exporter")
    if not check(main is not None, f"{case}: no container named event-exporter"):
        return
    exporter = values["exporter"]
    port = int((values.get("global") or {}).get("metricsPort") or 2112)
    grace = values["shutdownGrace"]
    oidc_enabled = exporter["oidc"]["enabled"]
    certs = values["datastore"]["clientCertificates"]

    check(deployment["spec"]["replicas"] == values["replicaCount"],
          f"{case}: replicas is not {values['replicaCount']}")
    expected_args = [
        "--config=/etc/config/config.toml",
        f"--metrics-port={port}",
        "--oidc-secret-path=/var/secrets/oidc-client-secret",
        f"--workers={exporter['workers']}",
        f"--shutdown-grace={grace}",
    ]
    check(main.get("args") == expected_args,
          f"{case}: args {main.get('args')} != {expected_args}")
    check("command" not in main, f"{case}: the container must use the image ENTRYPOINT")
    check(main.get("ports") == [{"name": "metrics", "containerPort": port, "protocol": "TCP"}],
          f"{case}: ports {main.get('ports')}")

    for probe, path, timings in (
        ("livenessProbe", "/healthz", (15, 20, 5, 3)),
        ("readinessProbe", "/readyz", (5, 10, 3, 3)),
    ):
        spec = main.get(probe) or {}
        check(spec.get("httpGet") == {"path": path, "port": "metrics"},
              f"{case}: {probe} is not GET {path} on port metrics: {spec}")
        got = tuple(spec.get(k) for k in ("initialDelaySeconds", "periodSeconds",
                                          "timeoutSeconds", "failureThreshold"))
        check(got == timings, f"{case}: {probe} timings {got} != {timings}")

    sc = main.get("securityContext") or {}
    psc = pod.get("securityContext") or {}
    check(sc.get("runAsNonRoot") is True and psc.get("runAsNonRoot") is True,
          f"{case}: runAsNonRoot not set on pod and container")
    check(sc.get("runAsUser") == 1001 and sc.get("runAsGroup") == 1001,
          f"{case}: container does not run as 1001:1001: {sc}")
    check(sc.get("readOnlyRootFilesystem") is True, f"{case}: root filesystem not read-only")
    check(sc.get("allowPrivilegeEscalation") is False, f"{case}: privilege escalation allowed")
    check((sc.get("capabilities") or {}).get("drop") == ["ALL"],
          f"{case}: capabilities not dropped: {sc.get('capabilities')}")
    check((sc.get("seccompProfile") or {}).get("type") == "RuntimeDefault"
          and (psc.get("seccompProfile") or {}).get("type") == "RuntimeDefault",
          f"{case}: seccomp profile is not RuntimeDefault")
    check(pod.get("automountServiceAccountToken") is False,
          f"{case}: the service account token is mounted (the exporter never calls the API)")

    tgps = pod.get("terminationGracePeriodSeconds")
    check(tgps == values["terminationGracePeriodSeconds"],
          f"{case}: terminationGracePeriodSeconds {tgps}")
    check(isinstance(tgps, int) and go_duration_ns(grace) < tgps * 10**9,
          f"{case}: --shutdown-grace={grace} is not below terminationGracePeriodSeconds={tgps}")

    resources = main.get("resources")
    check(resources == values["resources"], f"{case}: resources {resources}")

    env = {e["name"]: e.get("value") for e in main.get("env") or []}
    check(env.get("LOG_LEVEL") == values["logLevel"], f"{case}: LOG_LEVEL {env.get('LOG_LEVEL')}")
    datastore_cm = values["datastore"].get("configMapName") or f"{release}-datastore-config"
    check(main.get("envFrom", [None])[0] == {"configMapRef": {"name": datastore_cm,
                                                              "optional": True}},
          f"{case}: envFrom is not the optional ConfigMap {datastore_cm}: {main.get('envFrom')}")

    tag = values["image"]["tag"] or ((values.get("global") or {}).get("image") or {}).get("tag") \
        or "0.1.0"
    check(main.get("image") == f"{values['image']['repository']}:{tag}",
          f"{case}: image {main.get('image')}")

    annotation = deployment["spec"]["template"]["metadata"].get("annotations", {})
    check(annotation.get("checksum/config")
          == hashlib.sha256(rendered_configmap.encode()).hexdigest(),
          f"{case}: checksum/config is not the sha256 of the rendered ConfigMap")

    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    mounts = {m["name"]: m for m in main.get("volumeMounts") or []}
    check(mounts.get("config-volume") == {"name": "config-volume",
                                          "mountPath": "/etc/config/config.toml",
                                          "subPath": "config.toml", "readOnly": True},
          f"{case}: config mount {mounts.get('config-volume')}")
    check((volumes.get("config-volume") or {}).get("configMap", {}).get("name")
          == configmap["metadata"]["name"], f"{case}: config volume is not the ConfigMap")

    if oidc_enabled:
        secret = (volumes.get("oidc-secret") or {}).get("secret") or {}
        check(secret.get("secretName") == values["oidcSecretName"],
              f"{case}: OIDC secret volume {secret}")
        check({"key": "oidc-client-secret", "path": "oidc-client-secret"} in
              (secret.get("items") or []), f"{case}: OIDC secret key not projected: {secret}")
        check(mounts.get("oidc-secret", {}).get("mountPath") == "/var/secrets"
              and mounts["oidc-secret"].get("readOnly") is True,
              f"{case}: OIDC secret not mounted read-only at /var/secrets")
    else:
        check("oidc-secret" not in volumes and "oidc-secret" not in mounts,
              f"{case}: OIDC disabled but the secret is still mounted")

    proxy = values["proxy"]
    for name, key in (("HTTPS_PROXY", "https"), ("HTTP_PROXY", "http"), ("NO_PROXY", "noProxy")):
        if proxy.get(key):
            check(env.get(name) == proxy[key], f"{case}: {name} is {env.get(name)!r}, "
                                               f"expected proxy.{key} {proxy[key]!r}")
        elif not any(e.get("name") == name for e in values.get("extraEnv") or []):
            check(name not in env, f"{case}: {name} set although proxy.{key} is empty")

    dl_volume = values["deadLetterVolume"]
    if dl_volume.get("existingClaim") or dl_volume.get("emptyDir"):
        volume = volumes.get("dead-letter") or {}
        if dl_volume.get("existingClaim"):
            check(volume.get("persistentVolumeClaim") == {"claimName":
                                                          dl_volume["existingClaim"]},
                  f"{case}: dead-letter volume is not the claim {dl_volume['existingClaim']}: "
                  f"{volume}")
        else:
            check(volume.get("emptyDir") == {"sizeLimit": dl_volume["sizeLimit"]},
                  f"{case}: dead-letter volume is not an emptyDir of {dl_volume['sizeLimit']}: "
                  f"{volume}")
        mount = mounts.get("dead-letter") or {}
        check(mount.get("mountPath") == dl_volume["mountPath"] and not mount.get("readOnly"),
              f"{case}: dead-letter volume not mounted writable at {dl_volume['mountPath']}: "
              f"{mount}")
        dl_file = ((exporter["failureHandling"].get("deadLetter") or {}).get("file") or "")
        if dl_file:
            check(dl_file.startswith(dl_volume["mountPath"].rstrip("/") + "/"),
                  f"{case}: dead-letter file {dl_file} is not on the mounted volume")
    else:
        check("dead-letter" not in volumes and "dead-letter" not in mounts,
              f"{case}: a dead-letter volume without deadLetterVolume")

    global_datastore = (values.get("global") or {}).get("datastore") or {}
    mongo = (global_datastore.get("provider") or "mongodb").lower() == "mongodb"
    check_mongo_wiring(case, values, main, env, volumes, mounts, mongo)

    init = container(deployment, "fix-cert-permissions", init=True)
    if mongo:
        check(init is None and "client-certs-fixed" not in volumes
              and "postgresql-client-cert-original" not in volumes
              and "POSTGRESQL_CLIENT_CERT_MOUNT_PATH" not in env,
              f"{case}: MongoDB datastore but the PostgreSQL client certificates are wired")
    elif certs["enabled"]:
        path = certs["mountPath"]
        if check(init is not None, f"{case}: no fix-cert-permissions init container"):
            script = " ".join(init.get("command") or [])
            for file, mode in (("tls.crt", "644"), ("ca.crt", "644"), ("tls.key", "600")):
                check(f"cp /etc/ssl/client-certs-original/{file} /etc/ssl/client-certs-fixed/"
                      in script and f"chmod {mode} /etc/ssl/client-certs-fixed/{file}" in script,
                      f"{case}: init container does not copy {file} with mode {mode}")
            isc = init.get("securityContext") or {}
            check(isc.get("runAsUser") == 1001 and isc.get("runAsNonRoot") is True,
                  f"{case}: init container is not non-root 1001: {isc}")
        check((volumes.get("postgresql-client-cert-original") or {}).get("secret", {})
              .get("secretName") == certs["secretName"],
              f"{case}: client certificate secret is not {certs['secretName']}")
        check("emptyDir" in (volumes.get("client-certs-fixed") or {}),
              f"{case}: client-certs-fixed is not an emptyDir")
        check(mounts.get("client-certs-fixed", {}).get("mountPath") == path,
              f"{case}: client certificates not mounted at {path}")
        check(env.get("POSTGRESQL_CLIENT_CERT_MOUNT_PATH") == path,
              f"{case}: POSTGRESQL_CLIENT_CERT_MOUNT_PATH is not {path}")
    else:
        check(init is None and "client-certs-fixed" not in volumes
              and "POSTGRESQL_CLIENT_CERT_MOUNT_PATH" not in env,
              f"{case}: client certificates disabled but still wired")


def check_mongo_wiring(case: str, values: dict, main: dict, env: dict, volumes: dict,
                       mounts: dict, mongo: bool) -> None:
    """MongoDB as upstream's chart wires it: DATASTORE_PROVIDER, APP_NAME, the client-certificate
    mount (optional Secret, "" for managed databases), MONGODB_URI from a Secret via envFrom."""
    if not mongo:
        check("MONGODB_CLIENT_CERT_MOUNT_PATH" not in env and "mongo-client-cert" not in volumes
              and "mongo-tmp" not in volumes,
              f"{case}: PostgreSQL datastore but MongoDB wiring rendered")
        return
    store = values.get("mongodbStore") or {}
    path = store.get("clientCertMountPath", "/etc/ssl/mongo-client") or ""
    check(env.get("DATASTORE_PROVIDER") == "mongodb", f"{case}: DATASTORE_PROVIDER is "
                                                      f"{env.get('DATASTORE_PROVIDER')!r}")
    check(env.get("APP_NAME") == "event-exporter", f"{case}: APP_NAME {env.get('APP_NAME')!r}")
    check(env.get("MONGODB_CLIENT_CERT_MOUNT_PATH") == path,
          f"{case}: MONGODB_CLIENT_CERT_MOUNT_PATH {env.get('MONGODB_CLIENT_CERT_MOUNT_PATH')!r}"
          f" != {path!r}")
    if path:
        secret = (volumes.get("mongo-client-cert") or {}).get("secret") or {}
        check(secret.get("secretName") == store.get("clientCertSecretName",
                                                    "mongo-app-client-cert-secret"),
              f"{case}: MongoDB client-certificate Secret {secret}")
        check(secret.get("optional") is (not store.get("clientCertSecretRequired", False)),
              f"{case}: MongoDB client-certificate Secret optional={secret.get('optional')}")
        check(mounts.get("mongo-client-cert", {}).get("mountPath") == path
              and mounts["mongo-client-cert"].get("readOnly") is True,
              f"{case}: MongoDB client certificate not mounted read-only at {path}")
        check((volumes.get("mongo-tmp") or {}).get("emptyDir", {}).get("medium") == "Memory"
              and mounts.get("mongo-tmp", {}).get("mountPath") == "/tmp",
              f"{case}: no in-memory /tmp for the combined client certificate and key")
    else:
        check("mongo-client-cert" not in volumes and "mongo-client-cert" not in mounts,
              f"{case}: clientCertMountPath is empty but a client certificate is mounted")
    secret_name = ((values.get("global") or {}).get("datastore") or {}) \
        .get("credentialsFromSecret", {}).get("name")
    secret_refs = [e["secretRef"]["name"] for e in main.get("envFrom") or [] if "secretRef" in e]
    if secret_name:
        check(secret_name in secret_refs,
              f"{case}: MONGODB_URI Secret {secret_name} not in envFrom: {main.get('envFrom')}")
    else:
        check(not secret_refs or values.get("extraEnvFrom"),
              f"{case}: envFrom has a Secret nobody asked for: {secret_refs}")


# --------------------------------------------------------------------------------------------
# Cases

DEFAULT_METADATA = {"cluster": "my-cluster", "environment": "production"}

Extra = Callable[[str, dict, list[tuple[str, dict]]], None]


def extra_two_replicas(case: str, deployment: dict, objects: list) -> None:
    pdb = one(objects, "PodDisruptionBudget")
    if check(pdb is not None, f"{case}: no PodDisruptionBudget"):
        check(pdb["spec"].get("maxUnavailable") == 1,
              f"{case}: PodDisruptionBudget maxUnavailable is {pdb['spec'].get('maxUnavailable')}")
        check(pdb["spec"]["selector"]["matchLabels"]
              == deployment["spec"]["selector"]["matchLabels"],
              f"{case}: the PodDisruptionBudget selects other pods than the Deployment")


def extra_global(case: str, deployment: dict, _objects: list) -> None:
    pod = deployment["spec"]["template"]["spec"]
    check(pod.get("imagePullSecrets") == [{"name": "nvcr-pull"}],
          f"{case}: global.imagePullSecrets not used: {pod.get('imagePullSecrets')}")
    check(pod.get("nodeSelector") == {"node-role.kubernetes.io/system": "true"},
          f"{case}: global.systemNodeSelector not used: {pod.get('nodeSelector')}")
    check(pod.get("tolerations") == [{"key": "system", "operator": "Exists",
                                      "effect": "NoSchedule"}],
          f"{case}: global.systemNodeTolerations not used: {pod.get('tolerations')}")
    check("nodeAffinity" in (pod.get("affinity") or {}),
          f"{case}: global.affinity not used: {pod.get('affinity')}")
    init = container(deployment, "fix-cert-permissions", init=True) or {}
    check(init.get("image") == "registry.example.com/os-shell:1.0",
          f"{case}: global.initContainerImage not used: {init.get('image')}")


def extra_chart_fallbacks(case: str, deployment: dict, _objects: list) -> None:
    pod = deployment["spec"]["template"]["spec"]
    check(pod.get("nodeSelector") == {"pool": "cpu"}, f"{case}: nodeSelector fallback")
    check(pod.get("tolerations") == [{"key": "cpu-only", "operator": "Exists"}],
          f"{case}: tolerations fallback")
    check(pod.get("imagePullSecrets") == [{"name": "local-pull"}],
          f"{case}: imagePullSecrets fallback")


def extra_ca(case: str, deployment: dict, _objects: list) -> None:
    main = container(deployment, "event-exporter") or {}
    mounts = {m["name"]: m for m in main.get("volumeMounts") or []}
    check(mounts.get("sink-ca", {}).get("mountPath") == "/etc/ssl/sink",
          f"{case}: extraVolumeMounts not applied")
    env = {e["name"]: e.get("value") for e in main.get("env") or []}
    check(env.get("HTTPS_PROXY") == "http://proxy:3128", f"{case}: extraEnv not applied")


CUSTOM_METADATA = {
    # The spec's "Custom Metadata Fields" example, at the top level of the chart's values.
    "metadata": {
        "cluster": "prod-us-west-2",
        "environment": "production",
        "region": "us-west-2",
        "datacenter": "dc01",
        "tenant": "acme-corp",
        "topology.kubernetes.io/zone": "us-west-2a",
    },
    # exporter.metadata wins a key set in both; keys and values that need TOML quoting.
    "exporter": {"metadata": {
        "tenant": "acme-corp-gpu",
        "topology.kubernetes.io/zone": "us-west-2b",
        "nvidia.com/gpu.product": "H100 \"SXM\" \\ 80GB",
        "owner team": "sre <gpu@example.com> & ops\tnight\nshift",
        "rack": 12,
        "ünïcode.key": "värde ✓",
    }},
}

CASES: list[dict[str, Any]] = [
    {"name": "default values", "values": {}},
    {"name": "conservative backfill", "values": {"exporter": {"backfill": {
        "enabled": True, "maxAge": "168h", "maxEvents": 10000, "batchSize": 100,
        "rateLimit": 100}}}},
    {"name": "aggressive backfill", "values": {"exporter": {"backfill": {
        "enabled": True, "maxAge": "2160h", "maxEvents": 5000000, "batchSize": 1000,
        "rateLimit": 5000}}}},
    {"name": "disabled backfill", "values": {"exporter": {"backfill": {"enabled": False}}}},
    {"name": "adaptive sink concurrency", "values": {"exporter": {"sink": {
        "concurrency": "adaptive"}}}},
    {"name": "batched sink mode", "values": {"exporter": {"sink": {
        "mode": "batch", "batchMaxEvents": 500, "batchMaxBytes": 262144,
        "batchLinger": "50ms"}}}},
    {"name": "fast retries", "values": {"exporter": {"failureHandling": {
        "maxRetries": 10, "initialBackoff": "100ms", "maxBackoff": "10s",
        "backoffMultiplier": 1.5}}}},
    {"name": "conservative retries", "values": {"exporter": {"failureHandling": {
        "maxRetries": 30, "initialBackoff": "5s", "maxBackoff": "15m",
        "backoffMultiplier": 2.5}}}},
    {"name": "integer backoff multiplier and zero retries", "values": {"exporter": {
        "failureHandling": {"maxRetries": 0, "backoffMultiplier": 3}}}},
    {"name": "spec custom metadata (top-level metadata only)",
     "values": {"metadata": CUSTOM_METADATA["metadata"]},
     "metadata": {k: str(v) for k, v in CUSTOM_METADATA["metadata"].items()}},
    {"name": "custom metadata in both places (exporter.metadata wins)",
     "values": CUSTOM_METADATA,
     "metadata": {
         "cluster": "prod-us-west-2",
         "environment": "production",
         "region": "us-west-2",
         "datacenter": "dc01",
         "tenant": "acme-corp-gpu",
         "topology.kubernetes.io/zone": "us-west-2b",
         "nvidia.com/gpu.product": "H100 \"SXM\" \\ 80GB",
         "owner team": "sre <gpu@example.com> & ops\tnight\nshift",
         "rack": "12",
         "ünïcode.key": "värde ✓",
     }},
    {"name": "explicit exporter.metadata cluster beats top-level metadata",
     "values": {"metadata": {"cluster": "from-metadata", "site": "a"},
                "exporter": {"metadata": {"cluster": "from-exporter-metadata"}}},
     "metadata": {"cluster": "from-exporter-metadata", "environment": "production",
                  "site": "a"}},
    {"name": "OIDC disabled", "values": {"exporter": {
        "oidc": {"enabled": False}, "sink": {"endpoint": "http://sink.monitoring:8080/events"}}}},
    {"name": "sink and filter options", "values": {
        "exporter": {
            "sink": {"endpoint": "https://events.internal:8443/api/v1/events",
                     "timeout": "1m30s", "insecureSkipVerify": True,
                     "caFile": "/etc/ssl/sink/ca.crt"},
            "oidc": {"tokenUrl": "https://idp.internal/oauth2/token", "clientId": "ee",
                     "scope": "events:write events:read", "caFile": "/etc/ssl/sink/ca.crt"},
            "filter": {"expression":
                       "event.isFatal == true && event.agent == \"gpu-health-monitor\""},
            "workers": 20, "clientName": "event-exporter-b",
            "resumeToken": {"database": "db", "collection": "tokens"},
        },
        "extraVolumes": [{"name": "sink-ca", "configMap": {"name": "sink-ca"}}],
        "extraVolumeMounts": [{"name": "sink-ca", "mountPath": "/etc/ssl/sink",
                               "readOnly": True}],
        "extraEnv": [{"name": "HTTPS_PROXY", "value": "http://proxy:3128"}],
        "logLevel": "debug", "shutdownGrace": "45s", "terminationGracePeriodSeconds": 60,
    }, "extra": extra_ca},
    {"name": "client certificates disabled, own datastore ConfigMap", "values": {
        "datastore": {"configMapName": "my-pg-env",
                      "clientCertificates": {"enabled": False}}}},
    {"name": "client certificates from another secret", "values": {
        "datastore": {"clientCertificates": {"secretName": "pg-client",
                                             "mountPath": "/etc/pg-certs"}}}},
    {"name": "umbrella globals", "values": {
        "global": {
            "eventExporter": {"enabled": True},
            "metricsPort": 9464,
            "image": {"tag": "v1.2.3"},
            "imagePullSecrets": [{"name": "nvcr-pull"}],
            "datastore": {"provider": "postgresql"},
            "initContainerImage": {"repository": "registry.example.com/os-shell",
                                   "tag": "1.0", "pullPolicy": "Always"},
            "systemNodeSelector": {"node-role.kubernetes.io/system": "true"},
            "systemNodeTolerations": [{"key": "system", "operator": "Exists",
                                       "effect": "NoSchedule"}],
            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [{
                    "key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]}]}]}}},
        },
        "nodeSelector": {"pool": "ignored"},
    }, "extra": extra_global},
    {"name": "MongoDB with the in-cluster client certificate", "values": {
        "global": {"datastore": {"provider": "mongodb"}}}},
    {"name": "MongoDB, external with X.509 (required Secret) and the URI from a Secret",
     "values": {
         "global": {"datastore": {"provider": "mongodb",
                                  "credentialsFromSecret": {"name": "mongo-uri"}}},
         "mongodbStore": {"clientCertMountPath": "/etc/ssl/mongo-x509",
                          "clientCertSecretName": "mongo-x509",
                          "clientCertSecretRequired": True}}},
    {"name": "MongoDB managed database (no mount, SCRAM in the URI Secret)", "values": {
        "global": {"datastore": {"provider": "mongodb",
                                 "credentialsFromSecret": {"name": "documentdb-uri"}}},
        "mongodbStore": {"clientCertMountPath": ""}}},
    {"name": "dead letter file on a PersistentVolumeClaim, already-delivered 409", "values": {
        "exporter": {"failureHandling": {
            "onRejected": "dead_letter", "rejectedStatuses": [400, 422],
            "alreadyDeliveredStatuses": [409],
            "deadLetter": {"file": "/var/lib/event-exporter/dead-letter.ndjson",
                           "endpoint": "https://dead-letters.example.com/events"}}},
        "deadLetterVolume": {"existingClaim": "event-exporter-dead-letter"},
    }},
    {"name": "dead letter file on an emptyDir at another path", "values": {
        "exporter": {"failureHandling": {
            "onRejected": "dead_letter",
            "deadLetter": {"file": "/data/dl/rejected.ndjson"}}},
        "deadLetterVolume": {"emptyDir": True, "sizeLimit": "256Mi", "mountPath": "/data/dl"},
    }},
    {"name": "dead letter endpoint only (no volume)", "values": {
        "exporter": {"failureHandling": {
            "onRejected": "dead_letter", "rejectedStatuses": [],
            "deadLetter": {"endpoint": "http://dead-letters.monitoring:8080/events"}}},
    }},
    {"name": "client_secret_post, token lifetime, save interval, liveness timeout", "values": {
        "exporter": {
            "oidc": {"clientAuthMethod": "client_secret_post", "defaultTokenLifetime": "1h"},
            "resumeToken": {"saveInterval": "2s"},
            "livenessTimeout": "15m",
            "cloudevent": {"subject": "node_name"},
        },
    }},
    {"name": "client_secret_basic", "values": {
        "exporter": {"oidc": {"clientAuthMethod": "client_secret_basic",
                              "defaultTokenLifetime": "24h"}}}},
    {"name": "proxy environment", "values": {
        "proxy": {"https": "http://proxy.internal:3128", "http": "http://proxy.internal:3128",
                  "noProxy": "localhost,127.0.0.1,.svc,.cluster.local"},
    }},
    {"name": "two replicas: a leader and a standby, with a PodDisruptionBudget", "values": {
        "replicaCount": 2,
    }, "extra": extra_two_replicas},
    {"name": "chart fallbacks for placement", "values": {
        "nodeSelector": {"pool": "cpu"},
        "tolerations": [{"key": "cpu-only", "operator": "Exists"}],
        "imagePullSecrets": [{"name": "local-pull"}],
        "image": {"repository": "registry.example.com/event-exporter", "tag": "0.1.0-rc1"},
    }, "extra": extra_chart_fallbacks},
]

# Values the chart must refuse at render time: (name, values, text the error must contain).
INVALID: list[tuple[str, dict, str]] = [
    ("shutdown grace not below the termination grace", {"shutdownGrace": "30s"},
     "must be shorter than terminationGracePeriodSeconds"),
    ("shutdown grace that is not a duration", {"shutdownGrace": "soon"}, "shutdownGrace"),
    ("rate limit that is not a number", {"exporter": {"backfill": {"rateLimit": "fast"}}},
     "rateLimit"),
    ("misspelt section", {"exporter": {"failurehandling": {"maxRetries": 3}}},
     "failurehandling"),
    ("bad duration", {"exporter": {"sink": {"timeout": "30 seconds"}}}, "timeout"),
    ("no cluster", {"exporter": {"metadata": {"cluster": ""}}},
     "exporter.metadata.cluster is required"),
    ("OIDC enabled without a token URL", {"exporter": {"oidc": {"tokenUrl": ""}}},
     "exporter.oidc.tokenUrl is required"),
    ("zero workers", {"exporter": {"workers": 0}}, "workers"),
    ("negative replicas", {"replicaCount": -1}, "replicaCount"),
    ("a subject the exporter lacks",
     {"exporter": {"cloudevent": {"subject": "hostname"}}}, "subject"),
    ("an on_rejected policy the exporter lacks",
     {"exporter": {"failureHandling": {"onRejected": "skip"}}}, "onRejected"),
    ("a rejected status outside 400-499",
     {"exporter": {"failureHandling": {"rejectedStatuses": [400, 503]}}}, "rejectedStatuses"),
    ("an already-delivered status that is always retried (429)",
     {"exporter": {"failureHandling": {"alreadyDeliveredStatuses": [429]}}},
     "alreadyDeliveredStatuses"),
    ("a dead-letter file without a volume",
     {"exporter": {"failureHandling": {
         "onRejected": "dead_letter",
         "deadLetter": {"file": "/var/lib/event-exporter/dead-letter.ndjson"}}}},
     "needs a writable volume"),
    ("a dead-letter file outside the volume",
     {"exporter": {"failureHandling": {"onRejected": "dead_letter",
                                       "deadLetter": {"file": "/tmp/dead-letter.ndjson"}}},
      "deadLetterVolume": {"emptyDir": True}},
     "must lie under deadLetterVolume.mountPath"),
    ("dead_letter without a file or an endpoint",
     {"exporter": {"failureHandling": {"onRejected": "dead_letter"}}},
     "exporter.failureHandling.deadLetter.file and/or"),
    ("a dead letter with onRejected: stop",
     {"exporter": {"failureHandling": {"deadLetter": {"endpoint": "https://dl.example.com/"}}}},
     "only used with exporter.failureHandling.onRejected: dead_letter"),
    ("a dead-letter endpoint that is not http(s)",
     {"exporter": {"failureHandling": {"onRejected": "dead_letter",
                                       "deadLetter": {"endpoint": "dl.example.com/events"}}}},
     "deadLetter/endpoint"),
    ("both an existing claim and an emptyDir",
     {"deadLetterVolume": {"existingClaim": "dl", "emptyDir": True}},
     "deadLetterVolume: set existingClaim or emptyDir, not both"),
    ("an unknown client auth method",
     {"exporter": {"oidc": {"clientAuthMethod": "private_key_jwt"}}}, "clientAuthMethod"),
    ("a save interval that is not a duration",
     {"exporter": {"resumeToken": {"saveInterval": "often"}}}, "saveInterval"),
    ("a proxy without a scheme", {"proxy": {"https": "proxy.internal:3128"}}, "proxy/https"),
    ("a proxy variable set twice",
     {"proxy": {"https": "http://proxy:3128"},
      "extraEnv": [{"name": "HTTPS_PROXY", "value": "http://other:3128"}]},
     "extraEnv sets HTTPS_PROXY"),
    ("an unknown datastore provider", {"global": {"datastore": {"provider": "mysql"}}},
     "use postgresql or mongodb"),
    ("a threshold on an alert without one",
     {"prometheusRule": {"enabled": True,
                         "alerts": {"EventExporterPublishFailing": {"threshold": 3}}}},
     "prometheusRule.alerts.EventExporterPublishFailing.threshold"),
    ("an unknown alert name",
     {"prometheusRule": {"enabled": True, "alerts": {"EventExporterNoSuchAlert": {}}}},
     "prometheusRule.alerts.EventExporterNoSuchAlert: no such alert"),
    ("a non-duration 'for'",
     {"prometheusRule": {"enabled": True,
                         "alerts": {"EventExporterExportStalled": {"for": "ten minutes"}}}},
     "for"),
]


def run_case(binary: Path, defaults: dict, case: dict, chart_dir: Path = CHART,
             wrap: Callable[[dict], dict] | None = None, release: str = RELEASE) -> None:
    name = case["name"]
    values = deep_merge(defaults, case["values"])
    given = wrap(case["values"]) if wrap else case["values"]
    try:
        rendered = render(chart_dir, given, release)
    except helm.HelmError as error:
        fail(f"{name}: render failed: {error}")
        return
    objects = manifests(rendered)
    validate_objects(name, objects)
    configmap, deployment = one(objects, "ConfigMap"), one(objects, "Deployment")
    if not check(configmap is not None and deployment is not None,
                 f"{name}: expected one ConfigMap and one Deployment, got "
                 f"{[o.get('kind') for _, o in objects]}"):
        return
    config_text = configmap["data"]["config.toml"]

    expected = expected_effective(values, case.get("metadata", DEFAULT_METADATA))
    if tomllib is not None:  # an independent TOML parser besides the binary's
        try:
            parsed = tomllib.loads(config_text)
            check(parsed["exporter"]["metadata"] == expected["metadata"],
                  f"{name}: tomllib reads metadata {parsed['exporter']['metadata']}, "
                  f"expected {expected['metadata']}")
        except tomllib.TOMLDecodeError as error:
            fail(f"{name}: rendered config.toml is not valid TOML ({error}):\n{config_text}")

    report = check_config(binary, config_text, name)
    if report is not None:
        check(report.get("unknownKeys") == [],
              f"{name}: the binary does not know these rendered keys: {report.get('unknownKeys')}")
        problems = diff(expected, normalise_effective(report))
        check(not problems, f"{name}: effective settings differ from the values: "
                            + "; ".join(problems))

    rendered_cm = next(text for t, text in rendered.items() if t.endswith("/configmap.yaml"))
    check_deployment(name, deployment, configmap, config_text, values, rendered_cm, release)
    if values["replicaCount"] <= 1:
        check(one(objects, "PodDisruptionBudget") is None,
              f"{name}: a PodDisruptionBudget for a single replica")
    if "extra" in case:
        case["extra"](name, deployment, objects)
    print(f"ok: {name}", flush=True)


def run_disabled(chart_dir: Path, values: dict, name: str) -> None:
    try:
        rendered = render(chart_dir, values)
    except helm.HelmError as error:
        fail(f"{name}: render failed: {error}")
        return
    leftovers = {t: text.strip() for t, text in rendered.items() if text.strip()}
    if check(not leftovers, f"{name}: rendered output although disabled: {sorted(leftovers)}"):
        print(f"ok: {name}", flush=True)


def run_invalid(name: str, values: dict, needle: str) -> None:
    try:
        render(CHART, values)
    except helm.HelmError as error:
        if check(needle in str(error), f"invalid values '{name}': error does not mention "
                                       f"{needle!r}: {error}"):
            print(f"ok: refused {name}: {str(error).strip().splitlines()[-1]}", flush=True)
        return
    fail(f"invalid values '{name}' rendered without an error")


# --------------------------------------------------------------------------------------------
# Monitoring objects: PrometheusRule, ServiceMonitor (+ metrics Service), dashboard ConfigMap.

RULES_FILE = ROOT / "deploy" / "prometheus" / "event-exporter-rules.yaml"
DASHBOARD_FILE = ROOT / "deploy" / "grafana" / "event-exporter.json"
MONITORING_KINDS = {"PrometheusRule", "ServiceMonitor", "Service"}

# The parts of prometheus-operator's CRD schemas (monitoring.coreos.com/v1, PrometheusRule and
# ServiceMonitor, operator v0.7x) that the chart uses, transcribed: kubernetes-validate has
# schemas for built-in kinds only, so the custom resources are validated against these.
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?"
                                          r"(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
_OBJECT_META = {
    "type": "object", "required": ["name", "namespace"],
    "properties": {"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
                            "maxLength": 253},
                   "namespace": {"type": "string"}, "labels": _STRING_MAP,
                   "annotations": _STRING_MAP},
    "additionalProperties": False,
}
PROMETHEUS_RULE_SCHEMA = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": _OBJECT_META,
        "spec": {"type": "object", "properties": {"groups": {"type": "array", "items": {
            "type": "object", "required": ["name", "rules"],
            "properties": {
                "name": {"type": "string", "minLength": 1},
                "interval": _DURATION,
                "rules": {"type": "array", "items": {
                    "type": "object", "required": ["expr"],
                    "properties": {
                        "alert": {"type": "string"}, "record": {"type": "string"},
                        "expr": {"type": ["string", "integer"]}, "for": _DURATION,
                        "keep_firing_for": _DURATION,
                        "labels": _STRING_MAP, "annotations": _STRING_MAP},
                    "additionalProperties": False}}},
            "additionalProperties": False}}},
            "additionalProperties": False},
    },
    "additionalProperties": False,
}
SERVICE_MONITOR_SCHEMA = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": _OBJECT_META,
        "spec": {"type": "object", "required": ["selector"], "properties": {
            "selector": {"type": "object", "properties": {"matchLabels": _STRING_MAP},
                         "additionalProperties": False},
            "namespaceSelector": {"type": "object", "properties": {
                "any": {"type": "boolean"},
                "matchNames": {"type": "array", "items": {"type": "string"}}},
                "additionalProperties": False},
            "endpoints": {"type": "array", "items": {"type": "object", "properties": {
                "port": {"type": "string"}, "path": {"type": "string"},
                "scheme": {"enum": ["http", "https"]},
                "interval": _DURATION, "scrapeTimeout": _DURATION},
                "additionalProperties": False}}},
            "additionalProperties": False},
    },
    "additionalProperties": False,
}


def validate_custom(where: str, obj: dict, schema: dict) -> None:
    import jsonschema  # a dependency of kubernetes-validate

    for error in jsonschema.Draft7Validator(schema).iter_errors(obj):
        path = ".".join(str(p) for p in error.absolute_path)
        fail(f"{where} does not validate against the {obj.get('kind')} CRD schema: {path}: "
             f"{error.message}")


def promtool_check(where: str, groups: list) -> None:
    """`promtool check rules` on rendered rules, when promtool is installed."""
    promtool = shutil.which("promtool")
    if promtool is None:
        print(f"note: {where}: promtool not installed; rendered rules not promtool-checked")
        return
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
        yaml.safe_dump({"groups": groups}, handle)
    try:
        result = subprocess.run([promtool, "check", "rules", handle.name],
                                capture_output=True, text=True, check=False)
        check(result.returncode == 0,
              f"{where}: promtool check rules failed: {result.stdout}{result.stderr}")
    finally:
        os.unlink(handle.name)


def render_objects(case: str, values: dict) -> list[tuple[str, dict]] | None:
    try:
        return manifests(render(CHART, values))
    except helm.HelmError as error:
        fail(f"{case}: render failed: {error}")
        return None


def run_monitoring() -> None:
    plain_groups = yaml.safe_load(RULES_FILE.read_text(encoding="utf-8"))["groups"]
    plain_names = [r["alert"] for g in plain_groups for r in g["rules"]]

    # Off by default: none of the monitoring objects.
    objects = render_objects("monitoring off", {}) or []
    kinds = [o.get("kind") for _, o in objects]
    check(not MONITORING_KINDS & set(kinds) and kinds.count("ConfigMap") == 1,
          f"monitoring off: the default render has {kinds}")

    case = "monitoring on"
    objects = render_objects(case, {"prometheusRule": {"enabled": True},
                                    "serviceMonitor": {"enabled": True},
                                    "grafanaDashboard": {"enabled": True}})
    if objects is None:
        return
    validate_objects(case, [(t, o) for t, o in objects
                            if o.get("apiVersion", "").startswith("monitoring.") is False])
    rule = one(objects, "PrometheusRule")
    monitor = one(objects, "ServiceMonitor")
    service = one(objects, "Service")
    deployment = one(objects, "Deployment")
    dashboards = [o for _, o in objects if o.get("kind") == "ConfigMap"
                  and "event-exporter.json" in (o.get("data") or {})]
    if not check(None not in (rule, monitor, service, deployment) and len(dashboards) == 1,
                 f"{case}: expected a PrometheusRule, a ServiceMonitor, a Service and a "
                 f"dashboard ConfigMap, got {[o.get('kind') for _, o in objects]}"):
        return
    validate_custom(f"{case}: PrometheusRule", rule, PROMETHEUS_RULE_SCHEMA)
    validate_custom(f"{case}: ServiceMonitor", monitor, SERVICE_MONITOR_SCHEMA)
    check(rule["spec"]["groups"] == plain_groups,
          f"{case}: the PrometheusRule's groups differ from {RULES_FILE.relative_to(ROOT)}")
    check(rule["metadata"]["namespace"] == NAMESPACE, f"{case}: PrometheusRule namespace")

    # Service -> pods, ServiceMonitor -> Service, by labels and port name.
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = service["spec"].get("selector") or {}
    check(selector and all(pod_labels.get(k) == v for k, v in selector.items()),
          f"{case}: Service selector {selector} does not select the pods {pod_labels}")
    ports = service["spec"].get("ports") or []
    check(ports == [{"name": "metrics", "port": 2112, "targetPort": "metrics",
                     "protocol": "TCP"}], f"{case}: Service ports {ports}")
    container_ports = [p.get("name") for c in deployment["spec"]["template"]["spec"]["containers"]
                       for p in c.get("ports") or []]
    check("metrics" in container_ports, f"{case}: no container port named metrics")
    match = monitor["spec"]["selector"].get("matchLabels") or {}
    service_labels = service["metadata"].get("labels") or {}
    check(match and all(service_labels.get(k) == v for k, v in match.items()),
          f"{case}: ServiceMonitor selector {match} does not select the Service {service_labels}")
    endpoints = monitor["spec"].get("endpoints") or []
    check([e.get("port") for e in endpoints] == ["metrics"]
          and endpoints[0].get("path") == "/metrics" and endpoints[0].get("interval") == "30s",
          f"{case}: ServiceMonitor endpoints {endpoints}")
    check(monitor["spec"].get("namespaceSelector") == {"matchNames": [NAMESPACE]},
          f"{case}: ServiceMonitor namespaceSelector {monitor['spec'].get('namespaceSelector')}")

    dashboard = dashboards[0]
    check((dashboard["metadata"].get("labels") or {}).get("grafana_dashboard") == "1",
          f"{case}: the dashboard ConfigMap lacks the sidecar label grafana_dashboard: \"1\"")
    try:
        shipped = json.loads(dashboard["data"]["event-exporter.json"])
        check(shipped == json.loads(DASHBOARD_FILE.read_text(encoding="utf-8")),
              f"{case}: the dashboard differs from {DASHBOARD_FILE.relative_to(ROOT)}")
        check(shipped.get("uid") and shipped.get("panels"), f"{case}: dashboard has no panels")
    except json.JSONDecodeError as error:
        fail(f"{case}: the dashboard ConfigMap is not JSON: {error}")
    promtool_check(case, rule["spec"]["groups"])
    print(f"ok: {case} (PrometheusRule, ServiceMonitor, metrics Service, dashboard ConfigMap)",
          flush=True)

    # Overrides: thresholds, for, severity, dropped alerts, extra labels, runbook base.
    case = "monitoring overrides"
    base = "https://docs.example.com/event-exporter/README.md"
    objects = render_objects(case, {
        "prometheusRule": {
            "enabled": True, "labels": {"release": "kube-prometheus-stack"},
            "ruleLabels": {"team": "gpu-infra"}, "runbookBaseUrl": base,
            "alerts": {
                "EventExporterExportStalled": {"threshold": 600, "for": "10m",
                                               "severity": "warning"},
                "EventExporterDatastoreReconnectStorm": {"threshold": 20},
                "EventExporterResumeTokenNotAdvancing": {"threshold": 1800},
                "EventExporterChangelogReadsSlow": {"threshold": 2},
                "EventExporterBackfillStuck": {"enabled": False},
            }},
        "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"},
                           "interval": "15s", "scrapeTimeout": "10s"},
        "grafanaDashboard": {"enabled": True, "namespace": "monitoring",
                             "labels": {"grafana_dashboard": "1", "team": "gpu"},
                             "annotations": {"grafana_folder": "NVSentinel"}},
    })
    if objects is None:
        return
    rule, monitor = one(objects, "PrometheusRule"), one(objects, "ServiceMonitor")
    dashboards = [o for _, o in objects if o.get("kind") == "ConfigMap"
                  and "event-exporter.json" in (o.get("data") or {})]
    if not check(rule is not None and monitor is not None and len(dashboards) == 1,
                 f"{case}: missing objects"):
        return
    validate_custom(f"{case}: PrometheusRule", rule, PROMETHEUS_RULE_SCHEMA)
    validate_custom(f"{case}: ServiceMonitor", monitor, SERVICE_MONITOR_SCHEMA)
    validate_objects(case, [("dashboard", dashboards[0])])
    rules = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    check(set(rules) == set(plain_names) - {"EventExporterBackfillStuck"},
          f"{case}: alerts {sorted(rules)}")
    stalled = rules.get("EventExporterExportStalled", {})
    check("health_events_exporter_stream_lag_seconds > 600" in stalled.get("expr", "")
          and "> 300" not in stalled.get("expr", "") and stalled.get("for") == "10m"
          and stalled.get("labels", {}).get("severity") == "warning",
          f"{case}: ExportStalled overrides not applied: {stalled}")
    check("[15m]) > 20" in rules.get("EventExporterDatastoreReconnectStorm", {}).get("expr", ""),
          f"{case}: reconnect storm threshold not applied")
    check("update_timestamp > 1800" in
          rules.get("EventExporterResumeTokenNotAdvancing", {}).get("expr", ""),
          f"{case}: resume token threshold not applied")
    slow_reads = rules.get("EventExporterChangelogReadsSlow", {}).get("expr", "")
    check("_bucket[10m])) > 2" in slow_reads and "> 0.5" not in slow_reads,
          f"{case}: changelog reads threshold not applied: {slow_reads}")
    for name, r in rules.items():
        check(r.get("labels", {}).get("team") == "gpu-infra", f"{case}: {name} lacks ruleLabels")
        check(r["annotations"]["runbook_url"] == f"{base}#runbook-{name.lower()}",
              f"{case}: {name} runbook_url {r['annotations']['runbook_url']}")
    check(rule["metadata"]["labels"].get("release") == "kube-prometheus-stack",
          f"{case}: PrometheusRule labels {rule['metadata']['labels']}")
    endpoint = (monitor["spec"].get("endpoints") or [{}])[0]
    check(endpoint.get("interval") == "15s" and endpoint.get("scrapeTimeout") == "10s",
          f"{case}: ServiceMonitor endpoint {endpoint}")
    meta = dashboards[0]["metadata"]
    check(meta["namespace"] == "monitoring" and meta["labels"].get("team") == "gpu"
          and meta.get("annotations") == {"grafana_folder": "NVSentinel"},
          f"{case}: dashboard metadata {meta}")
    promtool_check(case, rule["spec"]["groups"])
    print(f"ok: {case}", flush=True)


def run_lint() -> None:
    for name, values in (("default values", None), ("custom metadata", CUSTOM_METADATA)):
        result = helm.lint(str(CHART), values, strict=True, namespace=NAMESPACE)
        errors = result.get("errors") or []
        serious = [m for m in result.get("messages") or [] if m.get("severity", 0) >= 2]
        if check(not errors and not serious,
                 f"helm lint --strict ({name}): errors {errors}, messages {serious}"):
            print(f"ok: helm lint --strict ({name})", flush=True)


def umbrella(tmp: Path) -> Path:
    """A minimal NVSentinel-like umbrella chart with this chart as its event-exporter subchart."""
    root = tmp / "nvsentinel"
    (root / "charts").mkdir(parents=True)
    shutil.copytree(CHART, root / "charts" / "event-exporter")
    (root / "Chart.yaml").write_text(
        "apiVersion: v2\nname: nvsentinel\nversion: 0.0.1\n"
        "dependencies:\n  - name: event-exporter\n    version: 0.1.0\n", encoding="utf-8")
    (root / "values.yaml").write_text(
        "global:\n  metricsPort: 2112\n  datastore:\n    provider: postgresql\n"
        "  eventExporter:\n    enabled: true\n", encoding="utf-8")
    return root


def run_umbrella(binary: Path, defaults: dict) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = umbrella(Path(tmp))
        sub = {"exporter": {"metadata": {"cluster": "gb200-east"},
                            "backfill": CASES[1]["values"]["exporter"]["backfill"]}}
        case = {"name": "as the event-exporter subchart of an umbrella chart",
                # The umbrella's values.yaml sets global.datastore.provider: postgresql.
                "values": deep_merge(sub, {"global": {"metricsPort": 9100,
                                                      "datastore": {"provider": "postgresql"}}}),
                "metadata": {"cluster": "gb200-east", "environment": "production"}}
        run_case(binary, defaults, case, chart_dir=root,
                 wrap=lambda _: {"global": {"metricsPort": 9100}, "event-exporter": sub})
        run_disabled(root, {"global": {"eventExporter": {"enabled": False}},
                            "event-exporter": sub},
                     "umbrella with global.eventExporter.enabled=false renders nothing")


# --------------------------------------------------------------------------------------------
# Plain manifests


def plain_manifests() -> dict[str, str]:
    """deploy/kubernetes/<file> -> text, from the default render."""
    rendered = render(CHART, {})
    files = {}
    for template, text in sorted(rendered.items()):
        if template.endswith("NOTES.txt") or not text.strip():
            continue
        source = template.split("/", 1)[1]
        header = MANIFEST_HEADER.format(source=source, release=RELEASE, namespace=NAMESPACE)
        files[Path(template).name] = header + "---\n" + text.strip("\n") + "\n"
    return files


def check_plain_manifests() -> None:
    failures_before = len(FAILURES)
    expected = plain_manifests()
    actual = {p.name: p.read_text(encoding="utf-8") for p in MANIFESTS.glob("*.yaml")}
    for name in sorted(set(expected) | set(actual)):
        if name not in actual:
            fail(f"deploy/kubernetes/{name} is missing (run tests/helm/check_chart.py "
                 "--write-manifests)")
        elif name not in expected:
            fail(f"deploy/kubernetes/{name} is not produced by the chart's default render")
        elif actual[name] != expected[name]:
            fail(f"deploy/kubernetes/{name} differs from a fresh default render of the chart "
                 "(run tests/helm/check_chart.py --write-manifests)")
    objects = []
    for name, text in sorted(actual.items()):
        objects += [(f"deploy/kubernetes/{name}", d) for d in yaml.safe_load_all(text) if d]
    validate_objects("plain manifests", objects)
    if len(FAILURES) == failures_before:
        print(f"ok: deploy/kubernetes/ matches the default render ({', '.join(sorted(actual))})",
              flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bin", type=Path, default=os.environ.get("EVENT_EXPORTER_BIN"),
                        help="event-exporter binary (default: $EVENT_EXPORTER_BIN, else "
                             "target/debug/event-exporter)")
    parser.add_argument("--write-manifests", action="store_true",
                        help="regenerate deploy/kubernetes/ from the default render and exit")
    args = parser.parse_args()

    if args.write_manifests:
        MANIFESTS.mkdir(parents=True, exist_ok=True)
        for name, text in plain_manifests().items():
            (MANIFESTS / name).write_text(text, encoding="utf-8")
            print(f"wrote deploy/kubernetes/{name}")
        return 0

    binary = args.bin or ROOT / "target" / "debug" / "event-exporter"
    if not Path(binary).is_file():
        print(f"FAIL: event-exporter binary not found at {binary} (cargo build, or set "
              "EVENT_EXPORTER_BIN)")
        return 1
    print(f"helm-python-sdk {helm.__version__} (Helm SDK {helm.helm_sdk_version()}), "
          f"kubernetes-validate {kubernetes_validate.__version__}, binary {binary}", flush=True)

    defaults = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    run_lint()
    for case in CASES:
        run_case(Path(binary), defaults, case)
    run_disabled(CHART, {"global": {"eventExporter": {"enabled": False}}},
                 "global.eventExporter.enabled=false renders nothing")
    run_umbrella(Path(binary), defaults)
    for name, values, needle in INVALID:
        run_invalid(name, values, needle)
    run_monitoring()
    check_plain_manifests()

    if FAILURES:
        print(f"\n{len(FAILURES)} chart check(s) failed", flush=True)
        return 1
    print("\nall chart checks passed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
