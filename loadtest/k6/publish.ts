// k6 publisher scenario: POST /api/publish at a constant arrival rate (RATE per second for
// DURATION), round-robin to users k6-1 … k6-USERS, each body
// {"user_id": "k6-<n>", "type": "load", "data": {"sent_us": …, "seq": …}} — the shape
// hub-loadgen publishes and ws.ts / sse.ts read. Checks each response is 200 with an id.
//
//   k6 run -e HUB_API_KEY="$HUB_API_KEY" -e USERS=100 -e RATE=500 -e DURATION=30s \
//     loadtest/k6/publish.ts
//
// Settings (__ENV): HUB_URL (http://127.0.0.1:8080), HUB_API_KEY (required), RATE (100/s),
// DURATION (30s), USERS (10; the VUS of the ws.ts / sse.ts run), USER_PREFIX (k6-),
// PRE_VUS (20) and MAX_VUS (200): the VUs k6 keeps for the arrival rate. If k6 reports
// dropped_iterations, MAX_VUS was too low for the hub's response time at this rate.
//
// seq is derived from the test-wide iteration number (iteration i goes to user i % USERS + 1
// with seq i / USERS + 1), so each user's seqs are 1, 2, … without shared state between VUs.
// Concurrent VUs may reach the hub in a slightly different order, so readers count
// duplicates and gaps, not order. sent_us has millisecond resolution (Date.now() * 1000).

import { check } from "k6";
import exec from "k6/execution";
import http from "k6/http";
import type { Options } from "k6/options";

import { envInt, envRequired, envStr, hubUrl, isRecord, userName } from "./lib/hub.ts";

const RATE = envInt("RATE", 100);
const DURATION = envStr("DURATION", "30s");
const USERS = envInt("USERS", 10);
const PRE_VUS = envInt("PRE_VUS", 20);
const MAX_VUS = envInt("MAX_VUS", Math.max(200, PRE_VUS));
const API_KEY = envRequired("HUB_API_KEY");
const PUBLISH_URL = `${hubUrl()}/api/publish`;
/** Failed publishes this VU logs before it goes quiet (the checks still count them all). */
const MAX_WARNINGS = 3;
let warned = 0;

export const options: Options = {
    scenarios: {
        publish: {
            executor: "constant-arrival-rate",
            rate: RATE,
            timeUnit: "1s",
            duration: DURATION,
            preAllocatedVUs: PRE_VUS,
            maxVUs: MAX_VUS,
        },
    },
    thresholds: {
        checks: ["rate==1"],
        http_req_failed: ["rate==0"],
    },
};

/** The `id` of a `200 {"id": "..."}` publish response, or `null`. */
function publishedId(body: string | null): string | null {
    if (body === null) {
        return null;
    }
    try {
        const value: unknown = JSON.parse(body);
        if (isRecord(value) && typeof value.id === "string") {
            return value.id;
        }
    } catch {
        // not JSON: falls through
    }
    return null;
}

export default function (): void {
    const i = exec.scenario.iterationInTest;
    const user = userName((i % USERS) + 1);
    const seq = Math.floor(i / USERS) + 1;
    const body = JSON.stringify({
        user_id: user,
        type: "load",
        data: { sent_us: Date.now() * 1000, seq },
    });
    const res = http.post(PUBLISH_URL, body, {
        headers: { Authorization: `Bearer ${API_KEY}`, "Content-Type": "application/json" },
        responseType: "text",
        tags: { name: "POST /api/publish" },
    });
    const ok = check(res, {
        "publish status 200": (r) => r.status === 200,
        "publish returned an id": (r) => publishedId(r.body) !== null,
    });
    if (!ok && warned < MAX_WARNINGS) {
        warned += 1;
        // The hub's errors are JSON {"error": "..."} and never echo the key.
        const reason = res.error || String(res.body);
        console.warn(`publish to ${user} seq ${seq}: ${res.status} ${reason}`);
    }
}
