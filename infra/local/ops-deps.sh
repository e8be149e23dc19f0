#!/usr/bin/env bash
# Installs, when missing, what the deployment and observability checks (`make ops-check`) need
# (idempotent; Debian/Ubuntu):
#   prometheus, promtool   Debian's `prometheus` package; its own service is kept from starting
#                          (the Debian policy-rc.d hook while installing, then disabled when
#                          systemd runs), since the checks and `make demo` run their own
#   /usr/bin/python3 yaml  Debian's `python3-yaml`, for the checks' YAML and JSON parsing
#   kcat                   Debian's `kcat`: the dashboard test writes undecodable records with it
#   helm                   Helm 3 (HELM_VERSION, default v3.22.0) built from the Go module proxy
#                          with `go install` into $(go env GOPATH)/bin (cached there; about a
#                          minute of compiling the first time); needs Go (`golang-go` when missing)
# With arguments, only those of: prometheus, python-yaml, kcat, helm (`make demo` needs only
# prometheus). Prints the versions. Fails (exit 1) when something cannot be installed.
set -euo pipefail

WANT=" ${*:-prometheus python-yaml kcat helm} "
for w in $WANT; do
  [[ $w =~ ^(prometheus|python-yaml|kcat|helm)$ ]] || { echo "ops-deps: unknown part '$w' (prometheus, python-yaml, kcat, helm)" >&2; exit 2; }
done
wants() { [[ $WANT == *" $1 "* ]]; }

HELM_VERSION=${HELM_VERSION:-v3.22.0}
SUDO=""
[[ $(id -u) -ne 0 ]] && SUDO=sudo

say() { echo "ops-deps: $*"; }
die() { echo "ops-deps: $*" >&2; exit 1; }

updated=0
apt_install() {
  command -v apt-get >/dev/null || die "$* missing and apt-get is not available; install it and retry"
  if ((!updated)); then $SUDO apt-get update -qq; updated=1; fi
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}

# Debian's prometheus: the checks need promtool, the dashboard test and `make demo` the server.
if wants prometheus && ! [[ -x /usr/bin/promtool && -x /usr/bin/prometheus ]]; then
  say "installing the Debian package prometheus (promtool and the server; its service is not started)"
  policy=/usr/sbin/policy-rc.d made_policy=0 rc=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null && $SUDO chmod 755 "$policy" && made_policy=1
  fi
  apt_install prometheus || rc=$?
  if ((made_policy)); then $SUDO rm -f "$policy"; fi
  ((rc == 0)) || die "apt-get failed (exit $rc) while installing prometheus"
  # Keep the distro's service off for later boots too (only where systemd runs).
  if [[ -d /run/systemd/system ]]; then
    $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true
  fi
  [[ -x /usr/bin/promtool ]] || die "promtool missing after installing prometheus"
fi

if wants python-yaml && ! /usr/bin/python3 -c 'import yaml' 2>/dev/null; then
  say "installing the Debian package python3-yaml"
  apt_install python3-yaml
  /usr/bin/python3 -c 'import yaml' || die "python3-yaml installed, but /usr/bin/python3 cannot import yaml"
fi

if wants kcat && ! command -v kcat >/dev/null; then say "installing the Debian package kcat"; apt_install kcat; fi

# Helm: from the Go module proxy (no binary download), cached in GOPATH/bin. A helm built by
# `go install` reports only its minor version (e.g. "v3.22"), so that is what is compared.
HELM_MINOR=${HELM_VERSION%.*}
helm_ok() {
  local v re="^${HELM_MINOR//./\\.}([.+]|\$)"
  v=$("$1" version --short 2>/dev/null) && [[ $v =~ $re ]]
}
helm_bin() {
  local gobin
  if command -v helm >/dev/null && helm_ok "$(command -v helm)"; then
    command -v helm
    return 0
  fi
  command -v go >/dev/null || return 1
  gobin=$(go env GOBIN)
  [[ -n $gobin ]] || gobin=$(go env GOPATH)/bin
  if [[ -x $gobin/helm ]] && helm_ok "$gobin/helm"; then
    echo "$gobin/helm"
    return 0
  fi
  return 1
}

if wants helm && ! helm_bin >/dev/null; then
  command -v go >/dev/null || { say "installing the Debian package golang-go (to build helm)"; apt_install golang-go; }
  say "building helm $HELM_VERSION with go install (Go module proxy; cached in $(go env GOPATH)/bin)"
  GOFLAGS=-mod=mod nice -n 10 go install "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" \
    || die "go install helm.sh/helm/v3/cmd/helm@$HELM_VERSION failed"
  helm_bin >/dev/null || die "helm $HELM_VERSION not found after go install"
fi

versions=()
wants prometheus && versions+=("promtool $(/usr/bin/promtool --version 2>&1 | awk 'NR==1{print $3}')")
wants python-yaml && versions+=("$(/usr/bin/python3 -c 'import yaml; print("PyYAML", yaml.__version__)')")
wants kcat && versions+=("kcat")
wants helm && versions+=("helm $(helm_bin) ($HELM_VERSION)")
joined=$(IFS=,; echo "${versions[*]}")
say "${joined//,/, }"
