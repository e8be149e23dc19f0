"""Turns the chart's rendered hub Deployment into what `podman kube play` runs for the smoke
test (infra/helm/kube-play.sh), which runs it on the host's network: the Secret references
become literal values (podman's Secret support differs between versions; the chart itself
never renders a secret), and the container ports are dropped (podman refuses port mappings on
the host network), the probes' named ports becoming their numbers. Everything else is kept as
rendered: image, command, environment, probes, security context, resources, volumes.

    kube_play_prepare.py RENDERED OUT NAME/KEY=VALUE...
"""

import sys

import yaml


def main() -> int:
    rendered, out, *pairs = sys.argv[1:]
    secrets = dict(p.split("=", 1) for p in pairs)
    docs = [d for d in yaml.safe_load_all(open(rendered)) if d]
    deployments = [d for d in docs if d.get("kind") == "Deployment"]
    if len(deployments) != 1:
        print(f"kube play: expected one Deployment in {rendered}, got {len(deployments)}", file=sys.stderr)
        return 1
    for container in deployments[0]["spec"]["template"]["spec"]["containers"]:
        named = {p["name"]: p["containerPort"] for p in container.pop("ports", []) if "name" in p}
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            get = (container.get(probe) or {}).get("httpGet")
            if get and get.get("port") in named:
                get["port"] = named[get["port"]]
        for env in container.get("env", []):
            ref = (env.get("valueFrom") or {}).get("secretKeyRef")
            if ref is None:
                continue
            key = f"{ref['name']}/{ref['key']}"
            if key not in secrets:
                print(f"kube play: no value given for the Secret reference {key}", file=sys.stderr)
                return 1
            env.pop("valueFrom")
            env["value"] = secrets[key]
    with open(out, "w") as f:
        yaml.safe_dump_all(deployments, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
