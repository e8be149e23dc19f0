// hub-client.js — a small browser client for the notification hub, free to copy.
//
// Connects over WebSocket or Server-Sent Events, remembers the last notification id, and on
// any disconnect (token expiry, node drain, slow consumer, network) reconnects with a fresh
// token and resumes from that id, so the app sees every notification once and in order.
// A `hub.gap` control message means the hub could not replay everything: refetch your state.
//
//   const client = new HubClient({
//     transport: "ws",                      // or "sse"
//     getToken: async () => "<jwt>",        // called before every (re)connect
//     onNotification: (n) => render(n),     // {id, type, data, ts}
//     onGap: () => refetchState(),
//     onState: (s) => showState(s),         // "connecting" | "open" | "closed"
//   });
//   client.connect();

export class HubClient {
  constructor({ baseUrl = "", transport = "ws", getToken, onNotification, onGap, onState, onControl }) {
    this.baseUrl = baseUrl || `${location.protocol}//${location.host}`;
    this.transport = transport;
    this.getToken = getToken;
    this.onNotification = onNotification || (() => {});
    this.onGap = onGap || (() => {});
    this.onState = onState || (() => {});
    this.onControl = onControl || (() => {});
    this.lastId = null;
    this.stopped = true;
    this.attempt = 0;
    this.socket = null;
    this.refreshTimer = null;
  }

  connect() {
    this.stopped = false;
    this.open();
  }

  /// Stops for good (no reconnect).
  close() {
    this.stopped = true;
    this.teardown();
    this.onState("closed");
  }

  /// Drops the current connection as a network failure would; the client resumes by itself.
  dropConnection() {
    this.teardown();
    this.scheduleReconnect();
  }

  setTransport(transport) {
    this.transport = transport;
    if (!this.stopped) {
      this.teardown();
      this.open();
    }
  }

  teardown() {
    clearTimeout(this.refreshTimer);
    if (this.socket) {
      const s = this.socket;
      this.socket = null;
      if (s instanceof WebSocket) {
        s.onclose = s.onmessage = s.onerror = null;
        s.close(1000);
      } else {
        s.onmessage = s.onerror = s.onopen = null;
        s.close();
      }
    }
  }

  async open() {
    this.onState("connecting");
    let token;
    try {
      token = await this.getToken();
    } catch (e) {
      this.scheduleReconnect();
      return;
    }
    if (this.stopped) return;
    const params = new URLSearchParams({ token });
    if (this.transport === "ws") {
      if (this.lastId) params.set("since", this.lastId);
      const url = `${this.baseUrl.replace(/^http/, "ws")}/ws?${params}`;
      const ws = new WebSocket(url);
      this.socket = ws;
      ws.onmessage = (ev) => this.handle(ev.data);
      ws.onclose = (ev) => {
        if (this.socket !== ws) return;
        this.socket = null;
        clearTimeout(this.refreshTimer);
        // 4001 expired, 1012 draining, 4008 slow consumer, 4003 refresh refused: all resume.
        this.scheduleReconnect(ev.code === 1012 || ev.code === 4001 ? 0 : undefined);
      };
      this.scheduleRefresh(token, ws);
    } else {
      if (this.lastId) params.set("last_event_id", this.lastId);
      const es = new EventSource(`${this.baseUrl}/sse?${params}`);
      this.socket = es;
      es.onmessage = (ev) => this.handle(ev.data);
      // The stream ends at token expiry or on drain. EventSource would retry with the same
      // (expired) token, so reconnect ourselves with a fresh one and the last id.
      es.onerror = () => {
        if (this.socket !== es) return;
        es.close();
        this.socket = null;
        this.scheduleReconnect(0);
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
    if (n.type === "hub.connected") {
      this.attempt = 0;
      this.onState("open");
      this.onControl(n);
      return;
    }
    if (n.type === "hub.gap") {
      this.onGap(n);
      this.onControl(n);
      return;
    }
    if (n.type && n.type.startsWith("hub.")) {
      this.onControl(n);
      return;
    }
    if (n.id) this.lastId = n.id;
    this.onNotification(n);
  }

  scheduleReconnect(delay) {
    if (this.stopped) return;
    this.onState("connecting");
    const backoff = delay ?? Math.min(10000, 250 * 2 ** this.attempt) * (0.5 + Math.random() / 2);
    this.attempt += 1;
    setTimeout(() => {
      if (!this.stopped && !this.socket) this.open();
    }, backoff);
  }

  // Over WebSocket, replace the token before it expires so the connection stays open.
  scheduleRefresh(token, ws) {
    const exp = tokenExp(token);
    if (!exp) return;
    const ms = Math.max(1000, (exp * 1000 - Date.now()) * 0.8);
    this.refreshTimer = setTimeout(async () => {
      if (this.socket !== ws || ws.readyState !== WebSocket.OPEN) return;
      try {
        const fresh = await this.getToken();
        ws.send(JSON.stringify({ type: "refresh", token: fresh }));
        this.scheduleRefresh(fresh, ws);
      } catch (e) {
        /* the close at expiry will reconnect */
      }
    }, ms);
  }
}

function tokenExp(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(part)).exp;
  } catch (e) {
    return null;
  }
}
