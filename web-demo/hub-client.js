// hub-client.js — a small browser client for the notification hub. No dependencies; copy it.
//
// Connects over WebSocket or Server-Sent Events, remembers the id of the last notification, and
// after any disconnect (network, token expiry, node drain, slow consumer) reconnects with a fresh
// token and resumes from that id: the hub replays what was missed, once and in order, then live
// ones. A `hub.gap` control message means the hub could not replay everything (the resume point
// is older than its history): refetch your state from your application.
//
//   import { HubClient } from "/hub-client.js";
//   const client = new HubClient({
//     transport: "ws",                      // or "sse"
//     getToken: async () => "<jwt>",        // called before every (re)connect
//     onNotification: (n) => render(n),     // {id, type, data, ts}
//     onGap: (g) => refetchState(),         // g.data.reason
//     onState: (s) => show(s),              // "connecting" | "connected" | "disconnected"
//   });
//   client.connect();
//
// Also: client.disconnect() (stays down until connect(); the resume point is kept),
// client.setTransport("sse") (reconnects at once over the other transport, resuming),
// client.dropConnection() (drops the connection as a network failure would; resumes by itself).
// Options: baseUrl (the hub; default this page's origin), lastId (resume point for the first
// connect, e.g. one the app stored), onControl (every `hub.*` message, hub.connected included).
// Properties: state, transport, lastId.

export class HubClient {
  constructor({ baseUrl, transport = "ws", getToken, lastId = null,
                onNotification, onGap, onState, onControl } = {}) {
    if (typeof getToken !== "function") throw new TypeError("HubClient: getToken is required");
    this.baseUrl = (baseUrl || location.origin).replace(/\/+$/, "");
    this.transport = checkTransport(transport);
    this.getToken = getToken;
    this.lastId = lastId;
    this.onNotification = onNotification || noop;
    this.onGap = onGap || noop;
    this.onState = onState || noop;
    this.onControl = onControl || noop;
    this.state = "disconnected";
    this.running = false;  // true between connect() and disconnect()
    this.socket = null;
    this.generation = 0;   // bumped by every teardown: callbacks of an older connection do nothing
    this.attempt = 0;      // failed attempts since the last hub.connected, for the backoff
    this.reconnectTimer = null;
    this.refreshTimer = null;
  }

  connect() {
    if (this.running) return;
    this.running = true;
    this.open();
  }

  disconnect() {
    this.running = false;
    this.teardown();
    this.setState("disconnected");
  }

  dropConnection() {
    if (!this.running) return;
    this.teardown();
    this.reconnect();
  }

  setTransport(transport) {
    this.transport = checkTransport(transport);
    if (this.running) {
      this.teardown();
      this.open();
    }
  }

  setState(state) {
    if (state === this.state) return;
    this.state = state;
    this.onState(state);
  }

  teardown() {
    this.generation += 1;
    clearTimeout(this.reconnectTimer);
    clearTimeout(this.refreshTimer);
    const s = this.socket;
    this.socket = null;
    if (!s) return;
    s.onopen = s.onmessage = s.onerror = s.onclose = null;
    if (s instanceof WebSocket) s.close(1000);
    else s.close();
  }

  async open() {
    const gen = this.generation;
    this.setState("connecting");
    let token;
    try {
      token = await this.getToken();
    } catch (e) {
      if (gen === this.generation) this.reconnect();
      return;
    }
    if (gen !== this.generation || !this.running) return;
    const q = new URLSearchParams({ token });
    if (this.transport === "ws") {
      if (this.lastId) q.set("since", this.lastId);
      const ws = new WebSocket(`${this.baseUrl.replace(/^http/, "ws")}/ws?${q}`);
      this.socket = ws;
      ws.onmessage = (ev) => this.handle(ev.data);
      // Whatever the close code (4001 expired, 1012 draining, 4008 slow consumer, network...),
      // reconnect with a fresh token and the last id.
      ws.onclose = () => {
        this.socket = null;
        clearTimeout(this.refreshTimer);
        this.reconnect();
      };
      this.scheduleRefresh(token, ws, gen);
    } else {
      if (this.lastId) q.set("last_event_id", this.lastId);
      const es = new EventSource(`${this.baseUrl}/sse?${q}`);
      this.socket = es;
      es.onmessage = (ev) => this.handle(ev.data);
      // The stream ended (token expiry, drain, network) or was refused. EventSource would retry
      // with the same URL, so the same (maybe expired) token: close it and reconnect ourselves.
      es.onerror = () => {
        es.onerror = es.onmessage = null;
        es.close();
        this.socket = null;
        this.reconnect();
      };
    }
  }

  handle(text) {
    let n;
    try {
      n = JSON.parse(text);
    } catch (e) {
      return;
    }
    if (!n || typeof n.type !== "string") return;
    if (n.type.startsWith("hub.")) {
      if (n.type === "hub.connected") {
        this.attempt = 0;
        this.setState("connected");
      } else if (n.type === "hub.gap") {
        this.onGap(n);
      }
      this.onControl(n);
      return;
    }
    if (n.id) this.lastId = n.id;
    this.onNotification(n);
  }

  // Jittered exponential backoff: 125-250 ms after a healthy connection, up to 5-10 s.
  reconnect() {
    if (!this.running) return;
    this.setState("connecting");
    const delay = Math.min(10000, 250 * 2 ** this.attempt) * (0.5 + Math.random() / 2);
    this.attempt += 1;
    clearTimeout(this.reconnectTimer);
    this.reconnectTimer = setTimeout(() => {
      if (this.running && !this.socket) this.open();
    }, delay);
  }

  // Over WebSocket, replace the token before it expires so the connection stays open.
  // (An SSE stream ends at expiry and is resumed by reconnecting with a fresh token.)
  scheduleRefresh(token, ws, gen) {
    const exp = tokenExp(token);
    if (!exp) return;
    const ms = Math.max(1000, (exp * 1000 - Date.now()) * 0.8);
    this.refreshTimer = setTimeout(async () => {
      try {
        const fresh = await this.getToken();
        if (gen !== this.generation || ws.readyState !== WebSocket.OPEN) return;
        ws.send(JSON.stringify({ type: "refresh", token: fresh }));
        this.scheduleRefresh(fresh, ws, gen);
      } catch (e) {
        /* the close at expiry reconnects */
      }
    }, ms);
  }
}

function checkTransport(t) {
  if (t !== "ws" && t !== "sse") throw new TypeError(`HubClient: transport must be "ws" or "sse", not ${t}`);
  return t;
}

function tokenExp(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(part)).exp;
  } catch (e) {
    return null;
  }
}

function noop() {}
