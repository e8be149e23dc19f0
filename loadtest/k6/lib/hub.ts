// Helpers shared by the k6 scenarios: settings from __ENV, HS256 tokens, and the hub's
// envelope (docs/protocol.md). Imported with its `.ts` extension because k6 resolves module
// paths literally (tsconfig.json allows the extension, as tsc only type-checks).

import crypto from "k6/crypto";
import encoding from "k6/encoding";

/** A setting from `__ENV`, or `fallback` when it is unset or empty. */
export function envStr(name: string, fallback: string): string {
    const value = __ENV[name];
    return value === undefined || value === "" ? fallback : value;
}

/** An integer setting from `__ENV`, at least `min`; stops the test on anything else. */
export function envInt(name: string, fallback: number, min = 1): number {
    const raw = envStr(name, String(fallback));
    const value = Number(raw);
    if (!Number.isInteger(value) || value < min) {
        throw new Error(`${name} must be an integer >= ${min}, got ${JSON.stringify(raw)}`);
    }
    return value;
}

/** A required setting from `__ENV`; stops the test with a message naming it when unset. */
export function envRequired(name: string): string {
    const value = __ENV[name];
    if (value === undefined || value === "") {
        throw new Error(`${name} is not set (pass it with -e ${name}=... or in the environment)`);
    }
    return value;
}

/**
 * A duration in k6's simple syntax (`500ms`, `30s`, `5m`, `1h`, or a sum like `1m30s`), in
 * milliseconds. Used where the script itself waits; options take the string unchanged.
 */
export function parseDurationMs(text: string): number {
    const units: Record<string, number> = { ms: 1, s: 1000, m: 60000, h: 3600000 };
    const part = /(\d+(?:\.\d+)?)(ms|s|m|h)/g;
    let total = 0;
    let consumed = 0;
    for (let m = part.exec(text); m !== null; m = part.exec(text)) {
        const [whole, amount, unit] = m;
        const factor = unit === undefined ? undefined : units[unit];
        if (amount === undefined || factor === undefined || m.index !== consumed) {
            break;
        }
        total += Number(amount) * factor;
        consumed += whole.length;
    }
    if (consumed === 0 || consumed !== text.length) {
        throw new Error(`not a duration: ${JSON.stringify(text)} (use e.g. 500ms, 30s, 5m, 1h)`);
    }
    return total;
}

/** The hub's base URL without a trailing slash (`HUB_URL`, default http://127.0.0.1:8080). */
export function hubUrl(): string {
    return envStr("HUB_URL", "http://127.0.0.1:8080").replace(/\/+$/, "");
}

/** The same URL with the WebSocket scheme (`http` → `ws`, `https` → `wss`). */
export function hubWsUrl(): string {
    return hubUrl().replace(/^http/, "ws");
}

/** Name of user number `n` (1-based), `k6-<n>` unless `USER_PREFIX` says otherwise. */
export function userName(n: number): string {
    return `${envStr("USER_PREFIX", "k6-")}${n}`;
}

/** Unix seconds now. */
export function nowSeconds(): number {
    return Math.floor(Date.now() / 1000);
}

/**
 * An HS256 JWT for `sub`, valid for `ttlSeconds`, signed with `secret` (the hub's
 * `HUB_JWT_SECRET`). k6 has no JWT module; this is the whole of HS256: base64url (no padding)
 * of the header and the claims, joined by a dot, and the HMAC-SHA256 of that, base64url too.
 */
export function mintToken(secret: string, sub: string, ttlSeconds: number): string {
    const header = encoding.b64encode(JSON.stringify({ alg: "HS256", typ: "JWT" }), "rawurl");
    const payload = JSON.stringify({ sub, exp: nowSeconds() + ttlSeconds });
    const claims = encoding.b64encode(payload, "rawurl");
    const signingInput = `${header}.${claims}`;
    const signature = crypto.hmac("sha256", secret, signingInput, "base64rawurl");
    return `${signingInput}.${signature}`;
}

/** What `connectTarget` returns. */
export interface ConnectTarget {
    url: string;
    headers: Record<string, string>;
}

/** Where connection tokens go: see `authMode`. */
export type AuthMode = "query" | "header";

/**
 * Where the connection token goes, by `AUTH`: `query` (the default, `?token=` as browsers
 * send it) or `header` (`Authorization: Bearer`, which the hub checks first). k6 tags every
 * sample with the full request URL, so in `query` mode the token lands in k6's outputs (JSON,
 * CSV, cloud); use `AUTH=header` when those outputs are kept. Read it in the init context, so
 * a bad value stops the test before it starts.
 */
export function authMode(): AuthMode {
    const mode = envStr("AUTH", "query");
    if (mode !== "query" && mode !== "header") {
        throw new Error(`AUTH must be "query" or "header", got ${JSON.stringify(mode)}`);
    }
    return mode;
}

/** URL and headers for a client connection (`/ws` or `/sse`) carrying `token`. */
export function connectTarget(
    base: string,
    path: string,
    token: string,
    mode: AuthMode,
): ConnectTarget {
    return mode === "header"
        ? { url: `${base}${path}`, headers: { Authorization: `Bearer ${token}` } }
        : { url: `${base}${path}?token=${encodeURIComponent(token)}`, headers: {} };
}

/** One hub message: `{id, type, data, ts}`; control messages (`hub.*`) have no `id`. */
export interface Envelope {
    id?: string;
    type: string;
    data?: unknown;
    ts?: number;
}

/**
 * The fields of a `load` notification's data (`{sent_us, seq}`, as `publish.ts` and
 * `hub-loadgen` send them), each `null` when absent or not a number.
 */
export interface LoadFields {
    /** Publisher's wall clock at send time, microseconds since the epoch. */
    sentUs: number | null;
    /** 1, 2, … per user. */
    seq: number | null;
}

/** A JSON object (not an array, not null). */
export function isRecord(value: unknown): value is Record<string, unknown> {
    return typeof value === "object" && value !== null && !Array.isArray(value);
}

/** Parses one envelope; `null` when the text is not JSON or lacks a string `type`. */
export function parseEnvelope(text: string): Envelope | null {
    let value: unknown;
    try {
        value = JSON.parse(text);
    } catch {
        return null;
    }
    if (!isRecord(value) || typeof value.type !== "string") {
        return null;
    }
    const envelope: Envelope = { type: value.type, data: value.data };
    if (typeof value.id === "string") {
        envelope.id = value.id;
    }
    if (typeof value.ts === "number") {
        envelope.ts = value.ts;
    }
    return envelope;
}

/** `sent_us` and `seq` of an envelope's data, where present. */
export function loadFields(envelope: Envelope): LoadFields {
    const data = envelope.data;
    if (!isRecord(data)) {
        return { sentUs: null, seq: null };
    }
    return {
        sentUs: typeof data.sent_us === "number" ? data.sent_us : null,
        seq: typeof data.seq === "number" ? data.seq : null,
    };
}

/** The `user` a `hub.connected` envelope names, or `null`. */
export function connectedUser(envelope: Envelope): string | null {
    const data = envelope.data;
    return envelope.type === "hub.connected" && isRecord(data) && typeof data.user === "string"
        ? data.user
        : null;
}
