#!/usr/bin/python3
"""Asserts the properties of a rendered chart (`helm template`) that deployments rely on.

Usage: check_rendered.py default|full FILE. `full` is ci/full-values.yaml (every option on).
Prints one line per failed property and exits 1; otherwise one summary line.
"""
import sys

import yaml

mode, path = sys.argv[1], sys.argv[2]
docs = [d for d in yaml.safe_load_all(open(path)) if d]
problems = []


def check(cond, msg):
    if not cond:
        problems.append(msg)


def of_kind(kind):
    return [d for d in docs if d["kind"] == kind]


def seconds(v):
    assert v.endswith("s"), v
    return int(v[:-1])


by_name = {(d["kind"], d["metadata"]["name"]): d for d in docs}
deployments = {d["metadata"]["name"]: d for d in of_kind("Deployment")}
hub_name = next((n for n in deployments if n.endswith("-hub")), None)
check(hub_name, "no hub Deployment")
check(len(deployments) == 5, f"expected the hub and 4 service Deployments, got {sorted(deployments)}")

# Every Deployment: non-root, read-only root filesystem, no capabilities, resources, probes,
# secrets only by reference; its Service selects its pods.
for name, d in deployments.items():
    pod = d["spec"]["template"]["spec"]
    labels = d["spec"]["template"]["metadata"]["labels"]
    check(d["spec"]["selector"]["matchLabels"].items() <= labels.items(), f"{name}: selector does not match its pod labels")
    check(pod.get("securityContext", {}).get("runAsNonRoot") is True, f"{name}: pod securityContext.runAsNonRoot is not true")
    check(pod.get("automountServiceAccountToken") is False, f"{name}: mounts a service account token")
    for c in pod["containers"]:
        where = f"{name}/{c['name']}"
        sc = c.get("securityContext", {})
        check(sc.get("runAsNonRoot") is True, f"{where}: runAsNonRoot is not true")
        check(sc.get("readOnlyRootFilesystem") is True, f"{where}: readOnlyRootFilesystem is not true")
        check(sc.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation is not false")
        check("ALL" in sc.get("capabilities", {}).get("drop", []), f"{where}: capabilities do not drop ALL")
        res = c.get("resources", {})
        for kind in ("requests", "limits"):
            check({"cpu", "memory"} <= set(res.get(kind, {})), f"{where}: resources.{kind} needs cpu and memory")
        check(c.get("readinessProbe", {}).get("httpGet", {}).get("path") == "/readyz", f"{where}: readiness probe is not GET /readyz")
        check(c.get("livenessProbe", {}).get("httpGet", {}).get("path") == "/healthz", f"{where}: liveness probe is not GET /healthz")
        for e in c.get("env", []):
            if any(word in e["name"] for word in ("SECRET", "API_KEY", "DATABASE_URL", "PASSWORD")):
                check("valueFrom" in e and "secretKeyRef" in e["valueFrom"], f"{where}: {e['name']} must come from a secretKeyRef")
    services = [s for s in of_kind("Service") if s["spec"]["selector"].items() <= labels.items()]
    check(len(services) == 1, f"{name}: expected one Service selecting its pods, got {len(services)}")

# No Secret is rendered: the chart only references existing ones.
check(not of_kind("Secret"), "the chart renders a Secret; secrets must be referenced, not templated")

# The hub: drain timing, preStop, env.
if hub_name:
    pod = deployments[hub_name]["spec"]["template"]["spec"]
    hub = pod["containers"][0]
    env = {e["name"]: e for e in hub.get("env", [])}
    pre = hub.get("lifecycle", {}).get("preStop", {})
    check(pre, "hub: no preStop hook")
    pre_s = int(pre.get("exec", {}).get("command", ["sleep", "0"])[-1]) if "exec" in pre else pre.get("sleep", {}).get("seconds", 0)
    drain = seconds(env["HUB_DRAIN_WINDOW"]["value"])
    grace = seconds(env["HUB_SHUTDOWN_GRACE"]["value"])
    tgp = pod.get("terminationGracePeriodSeconds", 30)
    check(grace >= drain, f"hub: HUB_SHUTDOWN_GRACE {grace}s is shorter than HUB_DRAIN_WINDOW {drain}s")
    check(tgp > pre_s + grace, f"hub: terminationGracePeriodSeconds {tgp} is not above preStop {pre_s}s + HUB_SHUTDOWN_GRACE {grace}s")
    check(tgp >= pre_s + drain, f"hub: terminationGracePeriodSeconds {tgp} is shorter than the drain window")
    check(env.get("HUB_ENV", {}).get("value") == "production", "hub: HUB_ENV is not production")
    check("HUB_REDIS_URL" in env, "hub: no HUB_REDIS_URL with several replicas")
    strategy = deployments[hub_name]["spec"].get("strategy", {}).get("rollingUpdate", {})
    check(strategy.get("maxUnavailable") == 0, "hub: a rolling update may take a node down before its replacement is ready")

    hpas = of_kind("HorizontalPodAutoscaler")
    check(len(hpas) == 1, "hub: no HorizontalPodAutoscaler")
    if hpas:
        h = hpas[0]["spec"]
        check(h["scaleTargetRef"]["name"] == hub_name, "HPA does not target the hub Deployment")
        check("replicas" not in deployments[hub_name]["spec"], "hub: replicas set although the HPA owns them")
        kinds = [(m["type"], (m.get("resource") or m.get("pods", {}).get("metric", {})).get("name")) for m in h["metrics"]]
        check(("Resource", "cpu") in kinds, "HPA does not scale on CPU")
        want_conn = mode == "full"
        check((("Pods", "hub_connections") in kinds) == want_conn,
              f"HPA connections metric {'missing' if want_conn else 'present'} (values flag hub.autoscaling.connections.enabled)")
    pdbs = of_kind("PodDisruptionBudget")
    check(len(pdbs) == 1, "hub: no PodDisruptionBudget")
    if pdbs:
        hub_labels = deployments[hub_name]["spec"]["template"]["metadata"]["labels"]
        check(pdbs[0]["spec"]["selector"]["matchLabels"].items() <= hub_labels.items(), "PDB does not select the hub pods")

    cms = of_kind("ConfigMap")
    if mode == "full":
        check("HUB_INGEST_ROUTES" in env, "hub: HUB_INGEST_ROUTES not set although routes are given")
        check(len(cms) == 1 and "routes.toml" in cms[0]["data"] and "[[route]]" in cms[0]["data"]["routes.toml"],
              "no ConfigMap with the routes file")
        mounts = {m["mountPath"]: m["name"] for m in hub.get("volumeMounts", [])}
        routes_path = env.get("HUB_INGEST_ROUTES", {}).get("value", "")
        mount_dir = routes_path.rsplit("/", 1)[0]
        vol = {v["name"]: v for v in pod.get("volumes", [])}.get(mounts.get(mount_dir, ""), {})
        check(cms and vol.get("configMap", {}).get("name") == cms[0]["metadata"]["name"],
              f"hub: {routes_path} is not mounted from the routes ConfigMap")
        check(env.get("HUB_REDIS_URL", {}).get("valueFrom"), "hub: the Redis URL secret is not referenced")
    else:
        check(not cms and "HUB_INGEST_ROUTES" not in env, "routes ConfigMap rendered without routes")

ingresses = of_kind("Ingress")
if mode == "full":
    check(len(ingresses) == 1, "no Ingress although ingress.enabled")
    if ingresses:
        a = ingresses[0]["metadata"].get("annotations", {})
        for key in ("proxy-read-timeout", "proxy-send-timeout"):
            v = a.get(f"nginx.ingress.kubernetes.io/{key}", "0")
            check(int(v) >= 3600, f"Ingress: {key} {v} is shorter than an hour (WebSocket/SSE connections are long-lived)")
        check(a.get("nginx.ingress.kubernetes.io/proxy-buffering") == "off", "Ingress: proxy-buffering is not off (SSE needs it)")
        paths = {p["path"]: p["backend"]["service"]["name"] for r in ingresses[0]["spec"]["rules"] for p in r["http"]["paths"]}
        check(paths.get("/ws", "").endswith("-hub") and paths.get("/sse", "").endswith("-hub"), f"Ingress: /ws and /sse must reach the hub, got {paths}")
        services = {s["metadata"]["name"] for s in of_kind("Service")}
        check(set(paths.values()) <= services, f"Ingress: backends {set(paths.values()) - services} are not Services of the chart")
else:
    check(not ingresses, "Ingress rendered although ingress.enabled is false")

# Kafka security: every component's clients get the same protocol; with SASL the credentials
# come from Secrets (the hub's own when given); with a CA Secret it is mounted where the
# *_KAFKA_SSL_CA_FILE setting points.
for name, d in deployments.items():
    pod = d["spec"]["template"]["spec"]
    c = pod["containers"][0]
    env = {e["name"]: e for e in c.get("env", [])}
    prefix = "HUB" if name == hub_name else name.rsplit("-", 1)[1].upper()
    protocol = env.get(f"{prefix}_KAFKA_SECURITY_PROTOCOL", {}).get("value")
    password = env.get(f"{prefix}_KAFKA_SASL_PASSWORD", {}).get("valueFrom", {}).get("secretKeyRef", {})
    ca_file = env.get(f"{prefix}_KAFKA_SSL_CA_FILE", {}).get("value", "")
    mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    if mode == "full":
        check(protocol == "sasl_ssl", f"{name}: {prefix}_KAFKA_SECURITY_PROTOCOL is {protocol}, not sasl_ssl")
        check(env.get(f"{prefix}_KAFKA_SASL_MECHANISM", {}).get("value") == "SCRAM-SHA-512", f"{name}: SASL mechanism not passed")
        want = "notification-hub-kafka-hub" if name == hub_name else "notification-hub-kafka"
        check(password.get("name") == want, f"{name}: the Kafka password does not come from the Secret {want}: {password}")
        ca_dir = ca_file.rsplit("/", 1)[0]
        secret = volumes.get(mounts.get(ca_dir, ""), {}).get("secret", {}).get("secretName")
        check(secret == "kafka-ca", f"{name}: {prefix}_KAFKA_SSL_CA_FILE {ca_file!r} is not in the mounted Secret kafka-ca")
    else:
        check(protocol == "plaintext", f"{name}: {prefix}_KAFKA_SECURITY_PROTOCOL is {protocol}, not plaintext")
        check(not password and not ca_file and "kafka-ca" not in volumes, f"{name}: Kafka credentials or CA rendered without being asked for")

if problems:
    print(f"helm check ({mode} values):\n  " + "\n  ".join(problems), file=sys.stderr)
    sys.exit(1)
print(f"helm check ({mode} values): {len(docs)} objects ({', '.join(sorted({d['kind'] for d in docs}))}); every property holds")
