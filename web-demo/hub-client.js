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
//     getToken: async ({ transport, channels }) => "<jwt>",  // before every (re)connect
//     onNotification: (n) => render(n),     // {id, type, data, ts, channel?}
//     onGap: (g) => refetchState(g.data.channel),  // a channel's, or (no channel) the personal stream's
//     onState: (s) => show(s),              // "connecting" | "connected" | "disconnected"
//   });
//   client.connect();
//
// Channels (contract §8). A channel in the connection token's `channels` claim comes with the
// connection; its notifications carry `channel`. Others are joined with
//   client.subscribe("order:o-1", async () => "<jwt of the same user with claim channel=order:o-1>")
// and left with client.unsubscribe("order:o-1"). Over WebSocket the client sends `subscribe` with
// a fresh token from that function now and again after every reconnect (the hub resumes the
// channel from the same cursor as the rest). Over SSE, which cannot send, subscribing reconnects
// at once (resuming) with a token from getToken({transport: "sse", channels}) that must grant
// those channels in its `channels` claim. One id resumes every stream: whatever the channels,
// the client keeps only the last position it was given: the id of the last notification, or the
// `cursor` of a later `hub.connected` / `hub.subscribed` (which holds a channel joined before
// any of its notifications came), so a cut right after joining still resumes the channel.
//
// Also: client.disconnect() (stays down until connect(); the resume point is kept),
// client.setTransport("sse") (reconnects at once over the other transport, resuming),
// client.dropConnection() (drops the connection as a network failure would; resumes by itself).
// Options: baseUrl (the hub; default this page's origin), lastId (resume point for the first
// connect, e.g. one the app stored), onControl (every `hub.*` message, hub.connected included),
// onSubscription(channel, state, reason) (state "subscribed" | "refused" | "unsubscribed").
// Properties: state, transport, lastId, channels() (the subscribed channels and their states).

export class HubClient {
  constructor({ baseUrl, transport = "ws", getToken, lastId = null,
                onNotification, onGap, onState, onControl, onSubscription } = {}) {
    if (typeof getToken !== "function") throw new TypeError("HubClient: getToken is required");
    this.baseUrl = (baseUrl || location.origin).replace(/\/+$/, "");
    this.transport = checkTransport(transport);
    this.getToken = getToken;
    this.lastId = lastId;
    this.onNotification = onNotification || noop;
    this.onGap = onGap || noop;
    this.onState = onState || noop;
    this.onControl = onControl || noop;
    this.onSubscription = onSubscription || noop;
    // channel → {getToken, state: "pending" | "subscribed" | "refused"}, in subscription order.
    this.subscriptions = new Map();
    this.sendQueue = [];   // WebSocket frames waiting for the client's own pace
    this.sendTimer = null;
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

  // Joins `channel` (see the header); getChannelToken returns a token of this user whose
  // `channel` claim is the channel. Subscribing again replaces the token function.
  subscribe(channel, getChannelToken) {
    if (typeof getChannelToken !== "function") throw new TypeError("HubClient.subscribe: a token function is required");
    const known = this.subscriptions.get(channel);
    this.subscriptions.set(channel, { getToken: getChannelToken, state: known ? known.state : "pending" });
    if (known || !this.running) return;
    if (this.transport === "ws") {
      if (this.state === "connected") this.sendSubscribe(channel, this.generation);
    } else {
      // EventSource cannot send: reconnect now with a token that grants the new set.
      this.teardown();
      this.open();
    }
  }

  unsubscribe(channel) {
    if (!this.subscriptions.delete(channel)) return;
    this.onSubscription(channel, "unsubscribed");
    if (!this.running) return;
    if (this.transport === "ws") {
      if (this.state === "connected") this.send({ type: "unsubscribe", channel });
    } else {
      this.teardown();
      this.open();
    }
  }

  channels() {
    return [...this.subscriptions].map(([channel, s]) => ({ channel, state: s.state }));
  }

  async sendSubscribe(channel, gen) {
    const sub = this.subscriptions.get(channel);
    if (!sub) return;
    let token;
    try {
      token = await sub.getToken();
    } catch (e) {
      if (this.subscriptions.get(channel) === sub) {
        sub.state = "refused";
        this.onSubscription(channel, "refused", `no token: ${e.message || e}`);
      }
      return;
    }
    if (gen !== this.generation || this.subscriptions.get(channel) !== sub) return;
    this.send({ type: "subscribe", channel, token });
  }

  // The hub allows a WebSocket client a few messages a second (bursts of twice that): after a
  // reconnect with many channels, the subscribes go out at that pace instead of all at once.
  send(message) {
    this.sendQueue.push(JSON.stringify(message));
    this.flush();
  }

  flush() {
    if (this.sendTimer) return;
    const ws = this.socket;
    if (!(ws instanceof WebSocket) || ws.readyState !== WebSocket.OPEN) {
      this.sendQueue = [];
      return;
    }
    const now = Date.now();
    this.sent = (this.sent || []).filter((t) => now - t < 1000);
    while (this.sendQueue.length && this.sent.length < 8) {
      ws.send(this.sendQueue.shift());
      this.sent.push(now);
    }
    if (this.sendQueue.length) {
      this.sendTimer = setTimeout(() => {
        this.sendTimer = null;
        this.flush();
      }, 1000 - (now - this.sent[0]) + 10);
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
    clearTimeout(this.sendTimer);
    this.sendTimer = null;
    this.sendQueue = [];
    for (const sub of this.subscriptions.values()) sub.state = "pending";
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
      // Over SSE the connection token must carry the subscribed channels.
      const channels = this.transport === "sse" ? [...this.subscriptions.keys()] : [];
      token = await this.getToken({ transport: this.transport, channels });
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
      // The connection's position in every stream, the channels just joined included.
      if ((n.type === "hub.connected" || n.type === "hub.subscribed") && n.data?.cursor) {
        this.lastId = n.data.cursor;
      }
      if (n.type === "hub.connected") {
        this.attempt = 0;
        this.setState("connected");
        if (this.transport === "ws") {
          for (const channel of this.subscriptions.keys()) this.sendSubscribe(channel, this.generation);
        } else {
          // The token granted them all: nothing to confirm.
          for (const [channel, sub] of this.subscriptions) {
            sub.state = "subscribed";
            this.onSubscription(channel, "subscribed");
          }
        }
      } else if (n.type === "hub.gap") {
        this.onGap(n);
      } else if (n.type === "hub.subscribed" || n.type === "hub.unsubscribed") {
        const sub = this.subscriptions.get(n.data?.channel);
        if (sub && n.type === "hub.subscribed") {
          sub.state = "subscribed";
          this.onSubscription(n.data.channel, "subscribed");
        }
      } else if (n.type === "hub.error") {
        // A refused subscribe names its channel in data.channel or in the reason.
        const reason = String(n.data?.reason || "");
        for (const [channel, sub] of this.subscriptions) {
          if (sub.state === "pending" && (n.data?.channel === channel || reason.includes(channel))) {
            sub.state = "refused";
            this.onSubscription(channel, "refused", reason);
          }
        }
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
        const fresh = await this.getToken({ transport: "ws", channels: [] });
        if (gen !== this.generation || ws.readyState !== WebSocket.OPEN) return;
        this.send({ type: "refresh", token: fresh });
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
