#!/usr/bin/python3
"""Every dashboard query, evaluated against a live Prometheus that scrapes a live system.

Run by infra/grafana/check.sh (part of `make ops-check`), which builds the binaries and starts
Kafka and PostgreSQL first. This script:

 1. checks the dashboards' structure (ids, titles, descriptions, datasource, targets), that
    docs/operations.md describes every panel, and the provisioning files;
 2. starts a hub node (Kafka ingest on, routes for this run's topics) and the order, payment,
    delivery and moderation services, on free 127.0.0.1 ports, with their own databases and
    topics under a random prefix;
 3. starts Debian's Prometheus on a free port with infra/prometheus/prometheus.yml (targets
    rewritten to those ports, scrape and rule intervals shortened to 1 s) and the repo's rules;
 4. makes traffic: an SSE client, API publishes, a resume, a refused handshake, an order that
    walks the whole saga, a moderation report, and one undecodable record each into a topic
    of the hub's ingest and of the payment service (so that both DLQ counters exist);
 5. evaluates every panel's `targets[].expr` (and every query variable) with /api/v1/query
    until each returns at least one sample that is a number (not NaN), or the deadline passes;
 6. stops everything it started and drops its databases and topics, also on failure.

Exits 1 naming each query that returned nothing. Uses only the standard library and PyYAML
(Debian's python3-yaml, hence /usr/bin/python3).
"""

import base64
import glob
import hashlib
import hmac
import json
import math
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import yaml

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BIN = os.environ.get("OPS_CHECK_BIN", os.path.join(ROOT, "target", "debug"))
KAFKA = f"127.0.0.1:{os.environ.get('LOCAL_KAFKA_PORT', '9092')}"
QUERY_DEADLINE = float(os.environ.get("OPS_CHECK_QUERY_DEADLINE", "120"))
START_DEADLINE = 60.0
SERVICES = ["order", "payment", "delivery", "moderation"]
# Template variables and Grafana's built-ins, as Grafana would expand them with "All" chosen.
VARIABLES = {
    "instance": ".*",
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "1h",
}


def say(msg):
    print(f"dashboards: {msg}", flush=True)


class Failure(Exception):
    pass


def wait_for(what, check, deadline_s, interval=0.2):
    """Polls `check` until it returns a truthy value; fails naming `what` after the deadline."""
    end = time.monotonic() + deadline_s
    last = None
    while True:
        try:
            value = check()
            if value:
                return value
        except Exception as e:  # the condition is not met yet: remember why
            last = e
        if time.monotonic() > end:
            raise Failure(f"{what}: not within {deadline_s:.0f} s" + (f" ({last})" if last else ""))
        time.sleep(interval)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method, url, body=None, headers=None, timeout=5):
    data = None
    headers = dict(headers or {})
    if body is not None:
        data = json.dumps(body).encode()
        headers.setdefault("content-type", "application/json")
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


# ---------------------------------------------------------------------------------------------
# 1. Static checks


def panels_of(dashboard):
    for p in dashboard.get("panels", []):
        yield p
        yield from p.get("panels", [])  # collapsed rows keep their panels inside


def static_checks():
    problems, queries, variables = [], [], []
    files = sorted(glob.glob(os.path.join(ROOT, "infra/grafana/dashboards/*.json")))
    if not files:
        raise Failure("no dashboards in infra/grafana/dashboards")
    uids = set()
    for f in files:
        name = os.path.relpath(f, ROOT)
        d = json.load(open(f))
        for key in ("uid", "title", "panels", "schemaVersion"):
            if key not in d:
                problems.append(f"{name}: no {key}")
        if d.get("uid") in uids:
            problems.append(f"{name}: uid {d.get('uid')} used twice")
        uids.add(d.get("uid"))
        ids = set()
        for p in panels_of(d):
            if p.get("id") in ids:
                problems.append(f"{name}: panel id {p.get('id')} used twice")
            ids.add(p.get("id"))
            if p.get("type") == "row":
                continue
            title = p.get("title")
            if not title or not p.get("description"):
                problems.append(f"{name}: panel {p.get('id')} needs a title and a description")
            if p.get("datasource", {}).get("uid") != "${datasource}":
                problems.append(f"{name}: panel {title!r} does not use the ${{datasource}} variable")
            if not p.get("targets"):
                problems.append(f"{name}: panel {title!r} has no targets")
            for t in p.get("targets", []):
                if not t.get("expr"):
                    problems.append(f"{name}: panel {title!r} target {t.get('refId')} has no expr")
                else:
                    queries.append((name, title, t["refId"], t["expr"]))
        for v in d.get("templating", {}).get("list", []):
            if v.get("type") == "query":
                q = v.get("query")
                q = q.get("query") if isinstance(q, dict) else q
                variables.append((name, v["name"], q))
    # No screenshot can show a panel: docs/operations.md describes each one.
    docs = open(os.path.join(ROOT, "docs/operations.md")).read()
    for _, title, _, _ in queries:
        if f"\n| {title} |" not in docs:
            problems.append(f"panel {title!r} is not described in docs/operations.md (Dashboards)")
    for f in sorted(glob.glob(os.path.join(ROOT, "infra/grafana/provisioning/*/*.yaml"))):
        doc = yaml.safe_load(open(f))
        if doc.get("apiVersion") != 1 or not (doc.get("datasources") or doc.get("providers")):
            problems.append(f"{os.path.relpath(f, ROOT)}: not a Grafana provisioning file")
    if problems:
        raise Failure("dashboard structure:\n  " + "\n  ".join(problems))
    say(f"{len(files)} dashboards, {len(queries)} panel queries, {len(variables)} query variables")
    return queries, variables


def expand(expr):
    def sub(m):
        name = m.group(1) or m.group(2)
        if name not in VARIABLES:
            raise Failure(f"unknown template variable ${name} in {expr}")
        return VARIABLES[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", sub, expr)


# ---------------------------------------------------------------------------------------------
# 2-6. The live system


class Run:
    def __init__(self):
        self.id = secrets.token_hex(4)
        self.prefix = f"opscheck-{self.id}."
        self.dir = tempfile.mkdtemp(prefix="ops-check-")
        self.procs = {}  # name -> (Popen, log path)
        self.dbs = []
        self.topics_made = False
        self.secret = secrets.token_hex(32)
        self.api_key = secrets.token_hex(24)
        self.ports = {name: free_port() for name in ["hub", "prometheus"] + SERVICES}

    # -- processes

    def spawn(self, name, argv, env):
        log = os.path.join(self.dir, f"{name}.log")
        full_env = {k: v for k, v in os.environ.items() if not re.match(r"^(HUB|ORDER|PAYMENT|DELIVERY|MODERATION)_", k)}
        full_env.update(env)
        with open(log, "wb") as out:
            p = subprocess.Popen(argv, env=full_env, stdout=out, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, cwd=self.dir)
        self.procs[name] = (p, log)
        return p

    def wait_ready(self, name, url):
        p, log = self.procs[name]

        def ready():
            if p.poll() is not None:
                raise Failure(f"{name} exited with {p.returncode}; log:\n{tail(log)}")
            return http("GET", url, timeout=2)[0] == 200

        try:
            wait_for(f"{name} ready at {url}", ready, START_DEADLINE)
        except Failure as e:
            raise Failure(f"{e}\n{tail(log)}") from None

    def stop_all(self):
        for name, (p, _) in reversed(list(self.procs.items())):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for name, (p, _) in reversed(list(self.procs.items())):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                say(f"{name} did not stop within 15 s of SIGTERM; killing it")
                p.kill()
                p.wait()

    # -- PostgreSQL and Kafka

    def pg(self, *args):
        return subprocess.run([os.path.join(ROOT, "infra/local/postgres.sh"), *args], check=True,
                              capture_output=True, text=True).stdout.strip()

    def create_dbs(self):
        for s in SERVICES:
            db = f"opscheck_{self.id}_{s}"
            self.pg("createdb", db)
            self.dbs.append(db)

    def drop_dbs(self):
        psql = sorted(glob.glob("/usr/lib/postgresql/*/bin/psql"))
        psql = psql[-1] if psql else "psql"
        url = self.pg("url", "postgres")
        for db in self.dbs:
            r = subprocess.run([psql, "-X", "-qtA", "-d", url, "-c", f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'],
                               capture_output=True, text=True)
            if r.returncode != 0:
                say(f"could not drop database {db}: {r.stderr.strip()}")

    def topics(self):
        # Every topic the saga and moderation flows use, and a .dlq for each (the hub's ingest
        # DLQs the two it consumes). One partition each: nothing here needs more.
        base = ["order.created", "payment.completed", "delivery.status.updated",
                "order.status.changed", "moderation.tasks", "moderation.results"]
        return [self.prefix + t for t in base] + [self.prefix + t + ".dlq" for t in base]

    def create_topics(self):
        kafka = os.path.join(ROOT, "infra/local/kafka.sh")
        pending = self.topics()
        self.topics_made = True
        # Each create is a JVM start: four at a time, after a first one alone (it resolves the
        # Kafka classpath when this checkout has none yet, e.g. with a broker started elsewhere;
        # concurrent resolutions would race).
        first = True
        while pending:
            size = 1 if first else 4
            first = False
            batch, pending = pending[:size], pending[size:]
            procs = [subprocess.Popen([kafka, "topics-create", t, "1"], stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True) for t in batch]
            for t, p in zip(batch, procs):
                out, _ = p.communicate(timeout=120)
                if p.returncode != 0:
                    raise Failure(f"creating topic {t} failed:\n{out}")

    def delete_topics(self):
        kafka = os.path.join(ROOT, "infra/local/kafka.sh")
        r = subprocess.run([kafka, "run-class", "org.apache.kafka.tools.TopicCommand", "--bootstrap-server", KAFKA,
                            "--delete", "--topic", re.escape(self.prefix) + ".*"],
                           capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            say(f"could not delete the topics {self.prefix}*: {r.stdout}{r.stderr}")

    # -- the system under test

    def start_system(self):
        routes = os.path.join(self.dir, "routes.toml")
        with open(routes, "w") as f:
            f.write(f'''# The built-in routes, on this run's topics.
[[route]]
name = "order-status"
topic = "{self.prefix}order.status.changed"
message = "notifications.orders.v1.OrderStatusChanged"
type = "order.status"
recipients = ["user_id"]
data = {{ order_id = "order_id", status = "status", previous_status = "previous_status" }}

[[route]]
name = "moderation-reporter"
topic = "{self.prefix}moderation.results"
message = "notifications.moderation.v1.ModerationResult"
type = "moderation.result"
recipients = ["reporter_id"]
data = {{ report_id = "report_id", target_type = "target_type", target_id = "target_id", decision = "decision" }}
constants = {{ role = "reporter" }}
''')
        hub_port = self.ports["hub"]
        self.spawn("hub", [os.path.join(BIN, "hub"), "serve"], {
            "HUB_ADDR": f"127.0.0.1:{hub_port}",
            "HUB_JWT_SECRET": self.secret,
            "HUB_API_KEY": self.api_key,
            "HUB_KAFKA_BROKERS": KAFKA,
            "HUB_KAFKA_GROUP": f"opscheck-{self.id}-hub",
            "HUB_INGEST_ROUTES": routes,
            "HUB_INGEST_BUILTIN_ROUTES": "false",
            "HUB_PING_INTERVAL": "5s",
            "HUB_LOG": "info",
        })
        for s in SERVICES:
            up = s.upper()
            env = {
                f"{up}_ADDR": f"127.0.0.1:{self.ports[s]}",
                f"{up}_DATABASE_URL": self.pg("url", f"opscheck_{self.id}_{s}"),
                f"{up}_DATABASE_POOL_SIZE": "3",
                f"{up}_KAFKA_BROKERS": KAFKA,
                f"{up}_KAFKA_GROUP": f"opscheck-{self.id}-{s}",
                f"{up}_TOPIC_PREFIX": self.prefix,
                f"{up}_OUTBOX_POLL": "200ms",
            }
            if s in ("order", "moderation"):
                env[f"{up}_JWT_SECRET"] = self.secret
            if s == "delivery":
                env["DELIVERY_STEP_INTERVAL"] = "200ms"
            self.spawn(s, [os.path.join(BIN, f"{s}-service")], env)
        self.wait_ready("hub", f"http://127.0.0.1:{hub_port}/readyz")
        for s in SERVICES:
            self.wait_ready(s, f"http://127.0.0.1:{self.ports[s]}/readyz")
        say(f"hub on :{hub_port}, " + ", ".join(f"{s} on :{self.ports[s]}" for s in SERVICES))

    def start_prometheus(self):
        cfg = yaml.safe_load(open(os.path.join(ROOT, "infra/prometheus/prometheus.yml")))
        cfg["global"].update({"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"})
        cfg["rule_files"] = [os.path.join(ROOT, "infra/prometheus/rules/*.yml")]
        targets = {"hub": "hub", "prometheus": "prometheus", **{f"{s}-service": s for s in SERVICES}}
        jobs = [sc["job_name"] for sc in cfg["scrape_configs"]]
        if sorted(jobs) != sorted(targets):
            raise Failure(f"infra/prometheus/prometheus.yml has the jobs {jobs}; the dashboards expect {sorted(targets)}")
        for sc in cfg["scrape_configs"]:
            sc["static_configs"] = [{"targets": [f"127.0.0.1:{self.ports[targets[sc['job_name']]]}"]}]
        path = os.path.join(self.dir, "prometheus.yml")
        with open(path, "w") as f:
            yaml.safe_dump(cfg, f)
        port = self.ports["prometheus"]
        self.spawn("prometheus", ["/usr/bin/prometheus", f"--config.file={path}",
                                  f"--storage.tsdb.path={os.path.join(self.dir, 'tsdb')}",
                                  f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"], {})
        self.wait_ready("prometheus", f"http://127.0.0.1:{port}/-/ready")

        def all_up():
            _, body = http("GET", f"http://127.0.0.1:{port}/api/v1/targets")
            active = json.loads(body)["data"]["activeTargets"]
            down = [t["labels"]["job"] for t in active if t["health"] != "up"]
            if len(active) != len(targets) or down:
                raise Failure(f"targets not up yet: {down or 'none listed'}")
            return True

        wait_for("every Prometheus target up", all_up, 30)
        say(f"prometheus on :{port}, {len(targets)} targets up")

    # -- traffic

    def token(self, user, audience=None):
        """An HS256 token signed with the run's secret, for one hour."""
        now = int(time.time())
        claims = {"sub": user, "iat": now, "exp": now + 3600}
        if audience:
            claims["aud"] = audience

        def b64(data):
            return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

        head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
        body = b64(json.dumps(claims, separators=(",", ":")).encode())
        sig = hmac.new(self.secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
        return f"{head}.{body}.{b64(sig)}"

    def post_as(self, user, service, path, body, audience):
        """POST to a service as `user`: with a token without audience, then, if the service
        wants one (401), with its audience."""
        url = f"http://127.0.0.1:{self.ports[service]}{path}"
        for token in (self.token(user), self.token(user, audience)):
            status, answer = http("POST", url, body, {"authorization": f"Bearer {token}"})
            if status != 401:
                break
        return status, answer

    def publish(self, user, n):
        status, body = http("POST", f"http://127.0.0.1:{self.ports['hub']}/api/publish",
                            {"user_id": user, "type": "ops.check", "data": {"n": n}},
                            {"authorization": f"Bearer {self.api_key}"})
        if status != 200:
            raise Failure(f"publish answered {status}: {body[:200]!r}")

    def traffic(self):
        hub = f"http://127.0.0.1:{self.ports['hub']}"
        user = "alice"
        token = self.token(user)
        ids = []

        def listen():
            req = urllib.request.Request(f"{hub}/sse?token={token}")
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    for raw in r:
                        line = raw.decode(errors="replace").rstrip("\r\n")
                        if line.startswith("id:"):
                            ids.append(line[3:].strip())
            except Exception:
                pass  # the stream ends when the hub stops

        threading.Thread(target=listen, daemon=True).start()
        wait_for("the SSE connection counted", lambda: '"sse"} 1' in
                 http("GET", f"{hub}/metrics")[1].decode(), 10)
        for n in range(5):
            self.publish(user, n)
        wait_for("5 notifications over SSE", lambda: len(ids) >= 5, 10)
        # A resume from the first id: 4 replayed, counted as hub_resumes_total{outcome="replayed"}.
        req = urllib.request.Request(f"{hub}/sse?token={token}", headers={"Last-Event-ID": ids[0]})
        with urllib.request.urlopen(req, timeout=10) as r:
            first = r.readline()  # the stream has started: the resume is counted
        if not first:
            raise Failure("the resumed SSE stream sent nothing")
        # A refused handshake.
        status, _ = http("GET", f"{hub}/sse?token=not-a-token")
        if status != 401:
            raise Failure(f"a bad token got {status}, not 401")
        # An order through the whole saga, and a moderation report.
        status, body = self.post_as(user, "order", "/orders",
                                    {"items": [{"product_id": "p1", "quantity": 1, "price_cents": 1000}],
                                     "delivery_address": "1 Main St"}, "orders")
        if status != 201:
            raise Failure(f"POST /orders answered {status}: {body[:200]!r}")
        report = {"target_type": "user", "target_id": "bob", "reason": "spam"}
        status, body = self.post_as(user, "moderation", "/reports", report, "moderation")
        if status == 400 and b"target_owner_id" in body:
            # A service that still takes the owner from the body (older producers/README.md).
            status, body = self.post_as(user, "moderation", "/reports", {**report, "target_owner_id": "bob"},
                                        "moderation")
        if status != 202:
            raise Failure(f"POST /reports answered {status}: {body[:200]!r}")
        # One undecodable record for the hub's ingest and one for the payment service: each goes
        # to its DLQ (and creates the DLQ counters the dashboards show).
        for topic in ("order.status.changed", "order.created"):
            subprocess.run(["kcat", "-P", "-b", KAFKA, "-t", self.prefix + topic, "-k", "ops-check"],
                           input=b"not an event", check=True, timeout=30)
        wait_for("the order's five statuses ingested by the hub", lambda: self.delivered(hub), 60, 0.5)
        return user

    def delivered(self, hub):
        # The order's statuses reached history: ingest published CREATED, PAID, IN_TRANSIT,
        # OUT_FOR_DELIVERY and DELIVERED.
        text = http("GET", f"{hub}/metrics")[1].decode()
        m = re.search(r'hub_ingest_events_total\{outcome="published",topic="[^"]*order\.status\.changed"\} (\d+)', text)
        return m and int(m.group(1)) >= 5

    # -- queries

    def query(self, expr):
        url = f"http://127.0.0.1:{self.ports['prometheus']}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        status, body = http("GET", url)
        doc = json.loads(body)
        if doc.get("status") != "success":
            raise Failure(f"query error: {doc.get('error')}: {expr}")
        data = doc["data"]
        if data["resultType"] == "scalar":
            values = [data["result"][1]]
        else:
            values = [s["value"][1] for s in data["result"]]
        return [float(v) for v in values]

    def check_queries(self, queries, variables, user):
        pending = {(f, t, r): expand(e) for f, t, r, e in queries}
        results = {}
        end = time.monotonic() + QUERY_DEADLINE
        n = 0
        while pending:
            # Keep traffic flowing so that rates and quantiles have something in their window.
            self.publish(user, 100 + n)
            n += 1
            for key, expr in list(pending.items()):
                values = self.query(expr)
                numbers = [v for v in values if not math.isnan(v)]
                if numbers:
                    results[key] = (len(values), numbers[0])
                    del pending[key]
            if not pending or time.monotonic() > end:
                break
            time.sleep(1)
        for (f, t, r), (count, first) in sorted(results.items()):
            say(f"ok   {f} | {t} [{r}]: {count} series, e.g. {first:g}")
        problems = [f"{f} | {t} [{r}]: no numeric result for {e}" for (f, t, r), e in sorted(pending.items())]
        port = self.ports["prometheus"]
        for f, name, q in variables:
            m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", q.strip())
            if not m:
                problems.append(f"{f}: variable {name}: only label_values(selector, label) queries are checked, got {q}")
                continue
            url = f"http://127.0.0.1:{port}/api/v1/label/{m.group(2)}/values?" + urllib.parse.urlencode({"match[]": m.group(1)})
            values = json.loads(http("GET", url)[1])["data"]
            if values:
                say(f"ok   {f} | variable {name}: {values}")
            else:
                problems.append(f"{f}: variable {name}: {q} lists no values")
        if problems:
            raise Failure(f"{len(problems)} of {len(queries) + len(variables)} queries returned nothing within "
                          f"{QUERY_DEADLINE:.0f} s:\n  " + "\n  ".join(problems))
        say(f"all {len(queries)} panel queries and {len(variables)} variables return data")


def tail(path, n=15):
    try:
        lines = open(path, errors="replace").read().splitlines()[-n:]
    except OSError:
        return ""
    return "\n".join(f"    {line}" for line in lines)


def main():
    t0 = time.monotonic()
    queries, variables = static_checks()
    for b in ["hub"] + [f"{s}-service" for s in SERVICES]:
        if not os.access(os.path.join(BIN, b), os.X_OK):
            raise Failure(f"{BIN}/{b} missing; build with cargo build -p hub -p producers")
    run = Run()
    ok = False
    try:
        run.create_dbs()
        run.create_topics()
        say(f"databases and topics ready (prefix {run.prefix}) after {time.monotonic() - t0:.0f} s")
        run.start_system()
        run.start_prometheus()
        user = run.traffic()
        say(f"traffic made after {time.monotonic() - t0:.0f} s; evaluating queries")
        run.check_queries(queries, variables, user)
        ok = True
    finally:
        run.stop_all()
        if not ok:
            for name, (_, log) in run.procs.items():
                print(f"--- {name} log (last lines):\n{tail(log)}", file=sys.stderr)
        run.drop_dbs()
        if run.topics_made:
            run.delete_topics()
        if ok:
            subprocess.run(["rm", "-rf", run.dir])
        else:
            say(f"logs kept in {run.dir}")
        say(f"{'passed' if ok else 'FAILED'} in {time.monotonic() - t0:.0f} s")


def terminated(signum, frame):
    # SIGTERM (e.g. from make's or CI's timeout): unwind through main's cleanup, as for Ctrl-C.
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, terminated)
    try:
        main()
    except Failure as e:
        print(f"dashboards: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
