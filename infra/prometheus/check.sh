#!/usr/bin/env bash
# Static checks of the Prometheus configuration (part of `make ops-check`):
#   promtool check config prometheus.yml (which also checks the rule files it loads)
#   promtool check rules rules/*.yml
#   promtool test rules tests/*.yml
#   every alert has a test where it fires and one where it does not, and a runbook section in
#   docs/operations.md; every recording rule is evaluated by a test
# Needs promtool and /usr/bin/python3 with yaml (infra/local/ops-deps.sh installs both).
set -euo pipefail
cd "$(dirname "$0")"

die() { echo "prometheus check: $*" >&2; exit 1; }
[[ -x /usr/bin/promtool ]] || die "promtool missing; run infra/local/ops-deps.sh"
/usr/bin/python3 -c 'import yaml' 2>/dev/null || die "python3-yaml missing; run infra/local/ops-deps.sh"

/usr/bin/promtool check config prometheus.yml
/usr/bin/promtool check rules rules/*.yml
/usr/bin/promtool test rules tests/*.yml

/usr/bin/python3 - <<'PY'
import glob, sys, yaml

alerts, records = set(), set()
for f in sorted(glob.glob("rules/*.yml")):
    for group in yaml.safe_load(open(f))["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                alerts.add(rule["alert"])
                for key in ("summary", "description", "runbook"):
                    if key not in rule.get("annotations", {}):
                        sys.exit(f"prometheus check: alert {rule['alert']} has no {key} annotation")
            else:
                records.add(rule["record"])

fires, quiet, evaluated = set(), set(), set()
for f in sorted(glob.glob("tests/*.yml")):
    for test in yaml.safe_load(open(f))["tests"]:
        for case in test.get("alert_rule_test", []):
            (fires if case.get("exp_alerts") else quiet).add(case["alertname"])
        for case in test.get("promql_expr_test", []):
            for name in records:
                if name in case["expr"]:
                    evaluated.add(name)

problems = []
for name in sorted(alerts):
    if name not in fires:
        problems.append(f"alert {name}: no test where it fires")
    if name not in quiet:
        problems.append(f"alert {name}: no test where it does not fire")
for name in sorted(records - evaluated):
    problems.append(f"recording rule {name}: no promql_expr_test evaluates it")
# Each alert's runbook is a section of docs/operations.md.
docs = open("../../docs/operations.md").read()
for name in sorted(alerts):
    if f"\n#### {name}\n" not in docs:
        problems.append(f"alert {name}: no '#### {name}' section (its runbook) in docs/operations.md")
if problems:
    sys.exit("prometheus check:\n  " + "\n  ".join(problems))
print(f"prometheus check: {len(alerts)} alerts each tested firing and not firing; "
      f"{len(records)} recording rules each evaluated by a test")
PY
