// k6 WebSocket scenario: VUS connections to GET /ws, one user each (k6-1 … k6-VUS), held for
// DURATION. Checks the handshake and that hub.connected comes first; counts `load`
// notifications (publish.ts sends them) and records publish → receive latency from their
// data.sent_us.
//
//   k6 run -e HUB_JWT_SECRET="$HUB_JWT_SECRET" -e VUS=100 -e DURATION=2m loadtest/k6/ws.ts
//
// Settings (__ENV): HUB_URL (http://127.0.0.1:8080), HUB_JWT_SECRET (required), VUS (10),
// DURATION (60s, how long each connection is held), USER_PREFIX (k6-), AUTH (query|header).
//
// Latency has millisecond resolution (k6 and publish.ts only have Date.now()) and compares two
// clocks: run publish.ts on the same machine, or read the figure as including clock skew.
// hub-loadgen (loadtest/README.md) is the measuring tool; this is a k6 view of the same flow.

import { check } from "k6";
import exec from "k6/execution";
import { Counter, Trend } from "k6/metrics";
import type { Options } from "k6/options";
import ws from "k6/ws";
import type { Params } from "k6/ws";

import {
    authMode,
    connectTarget,
    connectedUser,
    envInt,
    envRequired,
    envStr,
    hubWsUrl,
    loadFields,
    mintToken,
    parseEnvelope,
    parseDurationMs,
    userName,
} from "./lib/hub.ts";

const VUS = envInt("VUS", 10);
const DURATION = envStr("DURATION", "60s");
const HOLD_MS = parseDurationMs(DURATION);
const SECRET = envRequired("HUB_JWT_SECRET");
const AUTH = authMode();
// An hour, or longer than the hold: the hub closes a connection at its token's exp (4001).
const TOKEN_TTL_S = Math.max(3600, Math.ceil(HOLD_MS / 1000) + 60);

export const options: Options = {
    scenarios: {
        ws: {
            executor: "per-vu-iterations",
            vus: VUS,
            iterations: 1,
            // The hold plus time for the handshake and the close.
            maxDuration: `${Math.ceil(HOLD_MS / 1000) + 60}s`,
        },
    },
    thresholds: {
        checks: ["rate==1"],
        hub_ws_unexpected_close: ["count==0"],
        hub_load_duplicates: ["count==0"],
    },
};

/** Start of ws.connect → hub.connected received. */
const connectedTime = new Trend("hub_ws_connected_time", true);
/** Publisher's sent_us → receipt here, in ms. */
const latency = new Trend("hub_delivery_latency", true);
/** `load` envelopes received, over all connections. */
const loadReceived = new Counter("hub_load_received");
/** A seq received twice on one connection (the hub promises once). */
const duplicates = new Counter("hub_load_duplicates");
/**
 * Per connection, highest seq received minus distinct seqs received: a loss estimate. It also
 * counts publishes that publish.ts saw fail (compare with its failed checks) and cannot see
 * losses after the last seq received.
 */
const seqGaps = new Counter("hub_load_seq_gaps");
/** sent_us later than the receipt: the publisher's clock is ahead of this one. */
const clockSkewed = new Counter("hub_latency_negative");
/** Frames that are not an envelope. */
const badMessages = new Counter("hub_ws_bad_messages");
/** The server closed the connection before the hold ended (tagged with the close code). */
const unexpectedClose = new Counter("hub_ws_unexpected_close");

export default function (): void {
    const user = userName(exec.vu.idInTest);
    const token = mintToken(SECRET, user, TOKEN_TTL_S);
    const target = connectTarget(hubWsUrl(), "/ws", token, AUTH);
    const params: Params = { headers: target.headers, tags: { name: "GET /ws" } };

    const started = Date.now();
    let sawFirst = false;
    let closingOnPurpose = false;
    const seen = new Set<number>();
    let maxSeq = 0;

    let status = 0;
    try {
        const res = ws.connect(target.url, params, (socket) => {
            socket.on("message", (text) => {
                const envelope = parseEnvelope(text);
                if (envelope === null) {
                    badMessages.add(1);
                    return;
                }
                if (!sawFirst) {
                    sawFirst = true;
                    connectedTime.add(Date.now() - started);
                    check(envelope, {
                        "first message is hub.connected": (e) => e.type === "hub.connected",
                        "hub.connected names this user": (e) => connectedUser(e) === user,
                    });
                }
                if (envelope.type !== "load") {
                    return;
                }
                loadReceived.add(1);
                const { sentUs, seq } = loadFields(envelope);
                if (sentUs !== null) {
                    const ms = Date.now() - sentUs / 1000;
                    if (ms >= 0) {
                        latency.add(ms);
                    } else {
                        clockSkewed.add(1);
                    }
                }
                if (seq !== null) {
                    if (seen.has(seq)) {
                        duplicates.add(1);
                    } else {
                        seen.add(seq);
                        maxSeq = Math.max(maxSeq, seq);
                    }
                }
            });
            socket.on("error", (e) => {
                if (!closingOnPurpose) {
                    console.warn(`${user}: ${e.error()}`);
                }
            });
            socket.on("close", (code) => {
                if (!closingOnPurpose) {
                    unexpectedClose.add(1, { code: String(code) });
                }
            });
            socket.setTimeout(() => {
                closingOnPurpose = true;
                socket.close(1000);
            }, HOLD_MS);
        });
        status = res.status;
    } catch (e) {
        // A refused handshake (401, 429, 503, …) or a network error.
        console.warn(`${user}: connect failed: ${String(e)}`);
    }

    check(status, { "handshake status 101": (s) => s === 101 });
    check(sawFirst, { "received hub.connected": (got) => got });
    if (maxSeq > 0) {
        seqGaps.add(maxSeq - seen.size);
    }
}
