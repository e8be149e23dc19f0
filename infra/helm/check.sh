#!/usr/bin/env bash
# Checks of the Helm chart (part of `make ops-check`):
#   helm lint, with the default values and with ci/full-values.yaml (every option on);
#   helm template of both, parsed, with the properties the deployment relies on asserted
#   (check_rendered.py: probes, drain timing, security context, resources, secrets by
#   reference only, HPA, PDB, routes ConfigMap, ingress timeouts, selectors);
#   every rendered object decodes strictly into its Kubernetes API type (validate/, Go: unknown
#   or misplaced fields, wrong types and bad quantities fail);
#   values that would deploy a broken system are refused (several hub replicas without Redis).
# Needs Go, helm 3 (infra/local/ops-deps.sh builds it into $(go env GOPATH)/bin) and python3-yaml.
set -euo pipefail
cd "$(dirname "$0")"
CHART=notification-hub
KUBE=1.30.0

die() { echo "helm check: $*" >&2; exit 1; }
HELM=$(command -v helm || true)
if [[ -z $HELM ]] && command -v go >/dev/null && [[ -x $(go env GOPATH)/bin/helm ]]; then HELM=$(go env GOPATH)/bin/helm; fi
[[ -n $HELM ]] || die "helm missing; run infra/local/ops-deps.sh"
/usr/bin/python3 -c 'import yaml' 2>/dev/null || die "python3-yaml missing; run infra/local/ops-deps.sh"

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

"$HELM" lint --strict "$CHART" --kube-version "$KUBE" 
"$HELM" lint --strict "$CHART" --kube-version "$KUBE" -f "$CHART/ci/full-values.yaml"
"$HELM" template hub "$CHART" --kube-version "$KUBE" > "$out/default.yaml"
"$HELM" template hub "$CHART" --kube-version "$KUBE" -f "$CHART/ci/full-values.yaml" > "$out/full.yaml"
/usr/bin/python3 check_rendered.py default "$out/default.yaml"
/usr/bin/python3 check_rendered.py full "$out/full.yaml"
# Strict decoding into the Kubernetes API types (validate/, Go; modules from the Go module proxy).
(cd validate && GOFLAGS=-mod=mod nice -n 10 go build -o "$out/validate" .)
"$out/validate" "$out/default.yaml"
"$out/validate" "$out/full.yaml"

# Refused values: each must fail to render, naming the setting.
refused() {
  local want=$1; shift
  if "$HELM" template hub "$CHART" --kube-version "$KUBE" "$@" > /dev/null 2> "$out/err"; then
    die "helm template $* rendered; it must be refused ($want)"
  fi
  grep -q "$want" "$out/err" || die "helm template $* failed without naming $want: $(cat "$out/err")"
  echo "helm check: refused as expected: $* ($want)"
}
refused external.redis.url --set external.redis.url=
refused hub.shutdownGraceSeconds --set hub.shutdownGraceSeconds=5
refused secrets.jwt --set secrets.jwt.name=
refused external.kafka.sasl.secret --set external.kafka.securityProtocol=sasl_ssl
refused external.redis.sentinel.master --set external.redis.sentinel.urls=redis://sentinel:26379
# Behind Sentinel: the Sentinels and the master's name replace the Redis URL.
"$HELM" template hub "$CHART" --kube-version "$KUBE" --set external.redis.sentinel.urls=redis://sentinel:26379 \
  --set external.redis.sentinel.master=hub --set external.redis.sentinel.passwordSecret.name=redis-pw > "$out/sentinel.yaml"
/usr/bin/python3 - "$out/sentinel.yaml" <<'PY' || die "the Sentinel settings are not rendered as expected"
import sys, yaml
hub = next(d for d in yaml.safe_load_all(open(sys.argv[1])) if d and d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-hub"))
env = {e["name"]: e for e in hub["spec"]["template"]["spec"]["containers"][0]["env"]}
assert env["HUB_REDIS_SENTINEL_URLS"]["value"] == "redis://sentinel:26379", env
assert env["HUB_REDIS_SENTINEL_MASTER"]["value"] == "hub", env
assert env["HUB_REDIS_SENTINEL_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "redis-pw", env
assert "HUB_REDIS_URL" not in env, env
PY
echo "helm check: the Sentinel settings render"
echo "helm check: passed"
