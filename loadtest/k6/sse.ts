// k6 Server-Sent Events check: VUS streams from GET /sse, one user each (k6-1 … k6-VUS).
// Checks status 200, Content-Type text/event-stream, that the stream starts with `retry:` and
// that its first event is hub.connected for this user; counts the `load` notifications the
// stream carried (publish.ts sends them) and checks each has an `id:` line equal to its id.
//
//   k6 run -e HUB_JWT_SECRET="$HUB_JWT_SECRET" -e VUS=50 loadtest/k6/sse.ts
//
// Settings (__ENV): HUB_URL (http://127.0.0.1:8080), HUB_JWT_SECRET (required), VUS (10),
// ITERATIONS (1, streams per VU, one after another), SSE_TOKEN_TTL (5, seconds),
// HUB_JWT_LEEWAY (30s, the hub's setting of that name), USER_PREFIX (k6-), AUTH (query|header).
//
// What k6 cannot do here, honestly:
// - k6's HTTP client has no streaming: http.get returns only once the response has ended and
//   hands over the whole body at once. An endless stream cut by the request `timeout` does not
//   give a partial body: k6 reports status 0 with error_code 1050 (request timeout) and no
//   headers. So this script makes the stream end by itself: the hub ends an SSE stream at the
//   token's exp plus its clock leeway (docs/protocol.md), so each stream gets a token valid for
//   SSE_TOKEN_TTL seconds and lasts SSE_TOKEN_TTL + HUB_JWT_LEEWAY; the request timeout is
//   that plus 15 s. If HUB_JWT_LEEWAY does not match the hub's, expect timeouts (status 0).
// - No delivery latency: k6 sees no event before the stream ends, so receipt times are
//   unknown. ws.ts measures latency; hub-loadgen --transport sse measures it for SSE.
// - No reconnect or Last-Event-ID resume, unlike EventSource; each iteration is one stream.
// - Each stream's body is held in memory until it ends: keep streams short.
// For real streaming SSE in k6, an extension such as xk6-sse (a custom k6 build) is needed.

import { check } from "k6";
import exec from "k6/execution";
import http from "k6/http";
import { Counter } from "k6/metrics";
import type { Options } from "k6/options";

import {
    authMode,
    connectTarget,
    connectedUser,
    envInt,
    envRequired,
    envStr,
    hubUrl,
    loadFields,
    mintToken,
    parseDurationMs,
    parseEnvelope,
    userName,
} from "./lib/hub.ts";
import type { Envelope } from "./lib/hub.ts";

const VUS = envInt("VUS", 10);
const ITERATIONS = envInt("ITERATIONS", 1);
const TOKEN_TTL_S = envInt("SSE_TOKEN_TTL", 5);
const LEEWAY_S = Math.ceil(parseDurationMs(envStr("HUB_JWT_LEEWAY", "30s")) / 1000);
const TIMEOUT_S = TOKEN_TTL_S + LEEWAY_S + 15;
const SECRET = envRequired("HUB_JWT_SECRET");
const AUTH = authMode();

export const options: Options = {
    scenarios: {
        sse: {
            executor: "per-vu-iterations",
            vus: VUS,
            iterations: ITERATIONS,
            maxDuration: `${ITERATIONS * TIMEOUT_S + 30}s`,
        },
    },
    thresholds: {
        checks: ["rate==1"],
        hub_load_duplicates: ["count==0"],
    },
};

/** `load` events received, over all streams. */
const loadReceived = new Counter("hub_load_received");
/** A seq received twice in one stream. */
const duplicates = new Counter("hub_load_duplicates");
/** Per stream, highest seq received minus distinct seqs received: a loss estimate (see ws.ts). */
const seqGaps = new Counter("hub_load_seq_gaps");
/** `data:` payloads that are not an envelope. */
const badEvents = new Counter("hub_sse_bad_events");

/** One SSE event: its `id:` field, if any, and its `data:` lines joined by newlines. */
interface SseEvent {
    id: string | null;
    data: string;
}

/** Splits a complete SSE body into events with data; comments and `retry:` are skipped. */
function parseSse(body: string): SseEvent[] {
    const events: SseEvent[] = [];
    for (const block of body.split(/\r?\n\r?\n/)) {
        let id: string | null = null;
        const data: string[] = [];
        for (const line of block.split(/\r?\n/)) {
            if (line === "" || line.startsWith(":")) {
                continue;
            }
            const colon = line.indexOf(":");
            const field = colon < 0 ? line : line.slice(0, colon);
            let value = colon < 0 ? "" : line.slice(colon + 1);
            if (value.startsWith(" ")) {
                value = value.slice(1);
            }
            if (field === "data") {
                data.push(value);
            } else if (field === "id") {
                id = value;
            }
        }
        if (data.length > 0) {
            events.push({ id, data: data.join("\n") });
        }
    }
    return events;
}

export default function (): void {
    const user = userName(exec.vu.idInTest);
    const token = mintToken(SECRET, user, TOKEN_TTL_S);
    const target = connectTarget(hubUrl(), "/sse", token, AUTH);

    const res = http.get(target.url, {
        headers: target.headers,
        timeout: `${TIMEOUT_S}s`,
        responseType: "text",
        tags: { name: "GET /sse" },
    });
    const body = typeof res.body === "string" ? res.body : "";
    const events = parseSse(body);

    const envelopes: { envelope: Envelope; id: string | null }[] = [];
    for (const event of events) {
        const envelope = parseEnvelope(event.data);
        if (envelope === null) {
            badEvents.add(1);
        } else {
            envelopes.push({ envelope, id: event.id });
        }
    }
    const first = envelopes[0];
    const loads = envelopes.filter((e) => e.envelope.type === "load");

    check(res, {
        "sse status 200": (r) => r.status === 200,
        "content-type text/event-stream": (r) =>
            (r.headers["Content-Type"] ?? "").startsWith("text/event-stream"),
        "stream starts with retry:": () => body.startsWith("retry:"),
        "first event is hub.connected for this user": () =>
            first !== undefined && connectedUser(first.envelope) === user,
        "every notification has an id: line equal to its id": () =>
            loads.every((e) => e.id !== null && e.id === e.envelope.id),
    });
    if (res.status === 0) {
        console.warn(
            `${user}: ${res.error} (error_code ${res.error_code}): the stream did not end within ` +
                `${TIMEOUT_S}s; is HUB_JWT_LEEWAY the hub's leeway?`,
        );
    }

    loadReceived.add(loads.length);
    const seen = new Set<number>();
    let maxSeq = 0;
    for (const { envelope } of loads) {
        const { seq } = loadFields(envelope);
        if (seq === null) {
            continue;
        }
        if (seen.has(seq)) {
            duplicates.add(1);
        } else {
            seen.add(seq);
            maxSeq = Math.max(maxSeq, seq);
        }
    }
    if (maxSeq > 0) {
        seqGaps.add(maxSeq - seen.size);
    }
}
