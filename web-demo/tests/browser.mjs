// Browser test of the web demo: a real Chromium drives the page served by a hub node, against the
// real order and moderation services, and checks the whole flow a person would follow.
//
//   cd web-demo/tests && npm ci
//   DEMO_URL='http://127.0.0.1:8080/?orders=http://127.0.0.1:8081&moderation=http://127.0.0.1:8083' \
//     node browser.mjs
//
// Environment:
//   DEMO_URL    the page, with ?orders= / ?moderation= when the services are not on this host's
//               ports 8081 / 8083 (default http://127.0.0.1:8080/); the hub must run with --dev,
//               and its dev login must mint tokens for the services' audiences (`audience`)
//   CHROMIUM    the browser binary (default /usr/bin/chromium, Debian's package)
//   OUT_DIR     where demo.png goes, and on failure failure.png (+ one per extra page),
//               failure.json and console.txt (default <repo>/test-output/web-demo)
//   DEMO_USER   the user signed in for this run (default a random one, so runs never share state)
//   OWNER_USER  posts the reported ad on a second page and is told of its removal there
//               (default DEMO_USER-owner)
//   TIMEOUT_MS  deadline of every single wait (default 30000)
//   HUB_API_KEY the hub's API key, to publish announcements through its API (POST /api/publish
//               with "channel": "announcements"); without it the banner steps are skipped
// Exit 0 with one summary line on stdout; exit 1 with the reason. Progress goes to stderr.
//
// Steps: (1) sign in, WebSocket, connected; an announcement published through the hub's API
// shows in the banner; (2) an order reaches DELIVERED with exactly CREATED, PAID, IN_TRANSIT,
// OUT_FOR_DELIVERY, DELIVERED, each once, and its card follows the order's channel
// (`order:<id>`, subscribed with a token from the order service): every status after the
// subscription arrives on the channel too, once; (3) over SSE, Disconnect once PAID shows, an
// announcement published while away, Connect again (resume): same checks, the missed statuses
// replayed on both streams and the missed announcement in the banner, once; then over WebSocket
// "Simulate network drop" mid-flow (the client resumes and subscribes again by itself), same
// checks; and over WebSocket Disconnect / Connect again, so the statuses missed on the channel
// come back after the client's new `subscribe`, from the same cursor; (4) user `broke`: CREATED, PAYMENT_FAILED;
// (5) the owner posts an ad on their page; a report on it (naming only the ad) whose reason says
// "scam": REMOVED for the reporter and, on the owner's page, for the owner; a harmless reason:
// DISMISSED; (6) no status was ever received twice, no page error.
//
// DOM hooks of web-demo/index.html that this script relies on:
//   #user                      text field: the user to sign in as (.pick[data-user] quick picks)
//   #login                     sign in (dev login on the hub) and connect with the chosen transport
//   #transport-ws, #transport-sse   radios; changing them while connected reconnects (resuming)
//   #state                     text and data-state: connected | connecting | disconnected;
//                              data-transport (ws|sse, while connected), data-connects (count of
//                              hub.connected received), data-resumed (true|false, the last one)
//   #connect, #disconnect      connect / close (the resume point is kept for the next connect)
//   #drop                      drop the connection as a network failure would; resumes by itself
//   #place-order               POST /orders with the default cart (#qty-p1.., #address)
//   #order-note                outcome of the last order request (.error on failure)
//   #orders[data-last-order-id]   id of the order the last #place-order created
//   #orders .order[data-order-id=ID]   one card per order (data-current: the last status;
//                                      data-channel: order:ID; data-channel-state: pending |
//                                      subscribed | refused)
//     ol.timeline li[data-status=S]    one row per status in arrival order; data-count counts
//                                      every order.status received for (ID, S) on the personal
//                                      stream, duplicates too; data-channel-count the same on the
//                                      order's channel; data-replayed="true" when it was missed
//                                      while disconnected
//   #announcement              the banner (hidden until the first announcement): .text the last
//                              one's data.text; data-count announcements received; data-id
//   #report-form: #report-target-type (ad|user), #report-target-id (the ad's or the user's id;
//                 the owner is never sent: the moderation service looks it up),
//                 #report-reason, #submit-report; #report-note (.error on failure)
//   #ads li[data-ad-id][data-owner]   the moderation service's catalogue of ads
//   #ad-title, #post-ad        post an ad owned by the signed-in user; #ad-note (.error on failure);
//                              #ads[data-last-ad-id]: the id of the ad the last #post-ad created
//   #moderation-results[data-last-report-id]   id of the last accepted report
//   #moderation-results li[data-report-id=R][data-role=reporter|owner]   data-decision:
//                 PENDING (accepted, no result yet) | REMOVED | DISMISSED; data-count
//   #log                       event log (newest first)

import { chromium } from "playwright-core";
import { mkdirSync, writeFileSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { randomBytes } from "node:crypto";

const here = path.dirname(fileURLToPath(import.meta.url));
const DEMO_URL = process.env.DEMO_URL || "http://127.0.0.1:8080/";
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const OUT_DIR = path.resolve(process.env.OUT_DIR || path.join(here, "../../test-output/web-demo"));
const DEMO_USER = process.env.DEMO_USER || `demo-${randomBytes(4).toString("hex")}`;
const OWNER_USER = process.env.OWNER_USER || `${DEMO_USER}-owner`;
const TIMEOUT = Number(process.env.TIMEOUT_MS || 30000);
const HUB_API_KEY = process.env.HUB_API_KEY || "";
const FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync"];

const HAPPY = ["CREATED", "PAID", "IN_TRANSIT", "OUT_FOR_DELIVERY", "DELIVERED"];
const FAILED = ["CREATED", "PAYMENT_FAILED"];
const FINAL = ["DELIVERED", "PAYMENT_FAILED", "CANCELLED"];

const started = Date.now();
const pages = [];   // {name, page, context, console: [], errors: []}
let current = null; // the page the current step acts on (its screenshot is failure.png)
let step = "launch";
const facts = [];

const since = () => `${((Date.now() - started) / 1000).toFixed(1)}s`;
const progress = (msg) => process.stderr.write(`[${since()}] ${msg}\n`);
const fail = (msg) => { throw new Error(msg); };
const sq = (s) => JSON.stringify(String(s)); // a quoted CSS attribute value

// Waits until `fn(arg)`, evaluated in the page, returns something truthy; returns it.
async function until(p, what, fn, arg) {
  try {
    const handle = await p.page.waitForFunction(fn, arg, { timeout: TIMEOUT, polling: 50 });
    return await handle.jsonValue();
  } catch (e) {
    if (!/Timeout/i.test(e.message)) throw e;
    fail(`timed out after ${TIMEOUT} ms on page "${p.name}" waiting for ${what}; page: ${await describe(p)}`);
  }
}

// Waits for a condition checked from node (e.g. an HTTP call), polling every 100 ms.
async function untilNode(what, fn) {
  const deadline = Date.now() + TIMEOUT;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > deadline) fail(`timed out after ${TIMEOUT} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

async function describe(p) {
  try {
    return await p.page.evaluate(() => {
      const st = document.querySelector("#state");
      const orders = [...document.querySelectorAll("#orders .order")].map((o) =>
        `${o.dataset.orderId}: ${[...o.querySelectorAll("li[data-status]")].map((l) => `${l.dataset.status}×${l.dataset.count}`).join(" ") || "(none)"}`);
      const notes = ["#who", "#order-note", "#report-note"].map((s) => document.querySelector(s)?.textContent.trim()).filter(Boolean);
      return `state=${st.dataset.state}/${st.dataset.transport || "-"} connects=${st.dataset.connects}; ` +
        `orders [${orders.join("; ")}]; notes [${notes.join(" | ")}]`;
    });
  } catch (e) {
    return `(cannot read the page: ${e.message})`;
  }
}

async function openPage(browser, name, user, transport) {
  const context = await browser.newContext({ viewport: { width: 1200, height: 900 } });
  const page = await context.newPage();
  const p = { name, page, context, console: [], errors: [] };
  pages.push(p);
  current = p;
  page.setDefaultTimeout(TIMEOUT);
  const note = (line) => p.console.push(`${new Date().toISOString()} ${line}`);
  page.on("console", (m) => note(`console.${m.type()}: ${m.text()}`));
  page.on("pageerror", (e) => { note(`pageerror: ${e.message}`); p.errors.push(e.message); });
  page.on("requestfailed", (r) => note(`requestfailed: ${r.method()} ${redact(r.url())}: ${r.failure()?.errorText}`));
  page.on("response", (r) => r.status() >= 400 && note(`http ${r.status()}: ${r.request().method()} ${redact(r.url())}`));
  const resp = await page.goto(DEMO_URL, { waitUntil: "load" }).catch((e) => fail(`cannot open ${DEMO_URL}: ${e.message.split("\n")[0]}`));
  if (!resp || !resp.ok()) fail(`GET ${DEMO_URL} answered ${resp?.status()}`);
  await page.fill("#user", user);
  await page.check(`#transport-${transport}`);
  await page.click("#login");
  await waitConnected(p, transport);
  return p;
}

const redact = (url) => url.replace(/([?&]token=)[^&]+/, "$1…");

async function waitConnected(p, transport, minConnects = 1) {
  return until(p, `state "connected" over ${transport} (connection #${minConnects})`, ([t, n]) => {
    const st = document.querySelector("#state");
    const err = document.querySelector("#who.error");
    if (err) return { error: err.textContent };
    return st.textContent.trim() === "connected" && st.dataset.state === "connected" &&
      st.dataset.transport === t && Number(st.dataset.connects) >= n && { ...st.dataset };
  }, [transport, minConnects]).then((r) => (r.error ? fail(`sign-in failed: ${r.error}`) : r));
}

async function waitState(p, state) {
  await until(p, `state "${state}"`, (s) => {
    const st = document.querySelector("#state");
    return st.textContent.trim() === s && st.dataset.state === s;
  }, state);
}

async function placeOrder(p) {
  const before = await p.page.getAttribute("#orders", "data-last-order-id");
  await p.page.click("#place-order");
  const r = await until(p, "the order service to accept the order", (prev) => {
    const id = document.querySelector("#orders").dataset.lastOrderId;
    if (id && id !== prev) return { id };
    const note = document.querySelector("#order-note");
    return note.classList.contains("error") && { error: note.textContent };
  }, before);
  if (r.error) fail(`placing an order failed: ${r.error}`);
  return r.id;
}

async function timeline(p, orderId) {
  return p.page.$$eval(`#orders .order[data-order-id=${sq(orderId)}] li[data-status]`, (rows) =>
    rows.map((r) => ({ status: r.dataset.status, count: Number(r.dataset.count),
      channel: Number(r.dataset.channelCount || 0), replayed: r.dataset.replayed === "true" })));
}

// Waits until the order's card follows its channel; returns the statuses shown by then.
async function waitFollowing(p, orderId) {
  const r = await until(p, `order ${orderId} to follow its channel`, (id) => {
    const card = [...document.querySelectorAll("#orders .order")].find((o) => o.dataset.orderId === id);
    const state = card?.dataset.channelState;
    if (state === "refused") return { error: `the hub refused ${card.dataset.channel}` };
    return state === "subscribed" && card.dataset.channel === `order:${id}` &&
      { shown: [...card.querySelectorAll("li[data-status]")].map((l) => l.dataset.status) };
  }, orderId);
  if (r.error) fail(r.error);
  return r.shown;
}

// Checks the order's channel: no status twice, and each of `expected` (those published after
// the page subscribed) exactly once; waits for the last of them first.
async function expectChannel(p, orderId, expected, label) {
  if (!expected.length) return;
  await until(p, `${expected.at(-1)} of order ${orderId} on its channel`, ([id, s]) => {
    const card = [...document.querySelectorAll("#orders .order")].find((o) => o.dataset.orderId === id);
    const row = card && [...card.querySelectorAll("li[data-status]")].find((l) => l.dataset.status === s);
    return row && Number(row.dataset.channelCount) > 0;
  }, [orderId, expected.at(-1)]);
  const rows = await timeline(p, orderId);
  const twice = rows.filter((r) => r.channel > 1);
  if (twice.length) fail(`${label}: order ${orderId} on its channel: ${twice.map((r) => `${r.status} ${r.channel} times`).join(", ")}`);
  const missing = expected.filter((s) => !rows.some((r) => r.status === s && r.channel === 1));
  if (missing.length) fail(`${label}: order ${orderId} on its channel lacks ${missing.join(", ")} (rows ${JSON.stringify(rows)})`);
}

// The statuses of HAPPY after `last` (all of them for null).
const after = (last) => HAPPY.slice(last ? HAPPY.indexOf(last) + 1 : 0);

// Publishes an announcement through the hub's API; returns its text.
async function announce(text) {
  const r = await fetch(new URL("/api/publish", DEMO_URL), {
    method: "POST",
    headers: { "content-type": "application/json", authorization: `Bearer ${HUB_API_KEY}` },
    body: JSON.stringify({ channel: "announcements", type: "announcement", data: { text } }),
  });
  if (!r.ok) fail(`POST /api/publish to announcements answered ${r.status}: ${await r.text()}`);
  return text;
}

async function bannerCount(p) {
  return Number(await p.page.getAttribute("#announcement", "data-count"));
}

// Waits until the banner shows `text` as announcement number `count`.
async function expectBanner(p, text, count) {
  const got = await until(p, `the banner to show "${text}"`, (t) => {
    const b = document.querySelector("#announcement");
    return !b.hidden && b.querySelector(".text").textContent === t && { count: Number(b.dataset.count) };
  }, text);
  if (got.count !== count) fail(`the banner counted ${got.count} announcements, expected ${count} (one missed, none twice)`);
}

async function waitStatus(p, orderId, statuses, what) {
  return until(p, `order ${orderId} to show ${what}`, ([id, wanted]) => {
    const card = [...document.querySelectorAll("#orders .order")].find((o) => o.dataset.orderId === id);
    if (!card) return false;
    // Arrivals on the personal stream (a row may have been made by the order channel's copy).
    const shown = [...card.querySelectorAll("li[data-status]")].filter((l) => Number(l.dataset.count) > 0)
      .map((l) => l.dataset.status);
    return wanted.some((s) => shown.includes(s)) && shown;
  }, [orderId, statuses]);
}

// Waits for a final status, then checks the timeline is exactly `expected`, each received once.
async function expectFlow(p, orderId, expected, label) {
  await waitStatus(p, orderId, FINAL, `a final status (expecting ${expected.at(-1)})`);
  const rows = await timeline(p, orderId);
  const shown = rows.map((r) => r.status);
  if (shown.join() !== expected.join()) {
    fail(`${label}: order ${orderId} shows ${shown.join(" → ")}, expected ${expected.join(" → ")}`);
  }
  const repeated = rows.filter((r) => r.count !== 1);
  if (repeated.length) {
    fail(`${label}: order ${orderId} received ${repeated.map((r) => `${r.status} ${r.count} times`).join(", ")}`);
  }
  return rows;
}

// The order service's view of an order, with a token from the hub's dev login (null if unavailable).
let apiToken = null;
async function serverStatus(orderId) {
  const q = new URL(DEMO_URL).searchParams;
  const orders = (q.get("orders") || `${new URL(DEMO_URL).protocol}//${new URL(DEMO_URL).hostname}:8081`).replace(/\/+$/, "");
  try {
    if (!apiToken) {
      const r = await fetch(new URL("/api/dev/token", DEMO_URL), { method: "POST",
        headers: { "content-type": "application/json" }, body: JSON.stringify({ user_id: DEMO_USER, audience: "orders" }) });
      apiToken = (await r.json()).token;
    }
    const r = await fetch(`${orders}/orders/${encodeURIComponent(orderId)}`, { headers: { authorization: `Bearer ${apiToken}` } });
    return r.ok ? (await r.json()).status : null;
  } catch (e) {
    return null;
  }
}

async function midFlowDisconnect(p, transport, how) {
  const label = `${transport.toUpperCase()} + ${how}`;
  const orderId = await placeOrder(p);
  progress(`${label}: order ${orderId} placed; waiting for PAID`);
  await waitStatus(p, orderId, ["PAID", "IN_TRANSIT"], "PAID or IN_TRANSIT");
  // Cut as soon as the channel is joined, maybe before any of its notifications came: the
  // cursor of hub.subscribed (WS) or hub.connected (SSE) holds its position.
  const subscribedAt = (await waitFollowing(p, orderId)).at(-1) || null;
  const connects = Number(await p.page.getAttribute("#state", "data-connects"));
  let shownAtCut;
  let announced = null;
  const banner = await bannerCount(p);
  const checkMidFlow = () => {
    if (shownAtCut.includes("DELIVERED")) {
      fail(`${label}: the order was already DELIVERED when the connection was cut, so resume was not exercised ` +
        "mid-flow (the order statuses must be paced, a few hundred ms apart at least)");
    }
  };
  if (how === "disconnect") {
    await p.page.click("#disconnect");
    await waitState(p, "disconnected");
    shownAtCut = (await timeline(p, orderId)).map((r) => r.status);
    checkMidFlow();
    // While the page is offline, let the order move on server-side, so statuses are really missed.
    const last = HAPPY.indexOf(shownAtCut.at(-1));
    const ahead = await untilNode(`order ${orderId} to move past ${shownAtCut.at(-1)} on the order service`, async () => {
      const s = await serverStatus(orderId);
      return s === null ? "unknown" : HAPPY.indexOf(s) > last && s;
    });
    if (HUB_API_KEY) announced = await announce(`Announced while ${DEMO_USER} was away (${label})`);
    progress(`${label}: disconnected at ${shownAtCut.at(-1)}; the order service says ${ahead}; reconnecting`);
    await p.page.click("#connect");
  } else {
    await p.page.click("#drop");
    shownAtCut = (await timeline(p, orderId)).map((r) => r.status);
    checkMidFlow();
    progress(`${label}: dropped at ${shownAtCut.at(-1)}; waiting for the client to resume`);
  }
  const st = await waitConnected(p, transport, connects + 1);
  if (st.resumed !== "true") fail(`${label}: the reconnect was not a resume (hub.connected resumed=${st.resumed})`);
  const rows = await expectFlow(p, orderId, HAPPY, label);
  // The statuses missed on the channel come back from the same cursor as the personal ones.
  await expectChannel(p, orderId, after(subscribedAt), `${label}, order channel`);
  if (announced) await expectBanner(p, announced, banner + 1);
  const missed = rows.filter((r) => r.replayed).length;
  facts.push(`${label} at ${shownAtCut.at(-1)}: ${missed} missed status${missed === 1 ? "" : "es"} replayed, ` +
    `on the order channel too${announced ? ", and the missed announcement" : ""}`);
  progress(`${label}: DELIVERED, each status once on both streams (${missed} replayed after the reconnect)`);
}

async function postAd(p, title) {
  const before = await p.page.getAttribute("#ads", "data-last-ad-id");
  await p.page.fill("#ad-title", title);
  await p.page.click("#post-ad");
  const r = await until(p, "the moderation service to accept the ad", (prev) => {
    const id = document.querySelector("#ads").dataset.lastAdId;
    if (id && id !== prev) return { id };
    const note = document.querySelector("#ad-note");
    return note.classList.contains("error") && { error: note.textContent };
  }, before);
  if (r.error) fail(`posting an ad failed: ${r.error}`);
  // The catalogue lists it with its owner.
  await until(p, `ad ${r.id} in the catalogue`, (id) =>
    [...document.querySelectorAll("#ads li[data-ad-id]")].some((l) => l.dataset.adId === id), r.id);
  return r.id;
}

async function fileReport(p, { target, reason }) {
  await p.page.selectOption("#report-target-type", "ad");
  await p.page.fill("#report-target-id", target);
  await p.page.fill("#report-reason", reason);
  const before = await p.page.getAttribute("#moderation-results", "data-last-report-id");
  await p.page.click("#submit-report");
  const r = await until(p, "the moderation service to accept the report", (prev) => {
    const id = document.querySelector("#moderation-results").dataset.lastReportId;
    if (id && id !== prev) return { id };
    const note = document.querySelector("#report-note");
    return note.classList.contains("error") && { error: note.textContent };
  }, before);
  if (r.error) fail(`filing a report failed: ${r.error}`);
  return { reportId: r.id, target };
}

async function waitDecision(p, reportId, role, decision) {
  const got = await until(p, `the moderation result of report ${reportId} for the ${role}`, ([id, rl]) => {
    const row = [...document.querySelectorAll("#moderation-results li[data-report-id]")]
      .find((l) => l.dataset.reportId === id && l.dataset.role === rl);
    return row && row.dataset.decision !== "PENDING" && { decision: row.dataset.decision, count: row.dataset.count };
  }, [reportId, role]);
  if (got.decision !== decision) fail(`report ${reportId}: the ${role} got ${got.decision}, expected ${decision}`);
  if (got.count !== "1") fail(`report ${reportId}: the ${role} received the result ${got.count} times`);
}

async function main() {
  mkdirSync(OUT_DIR, { recursive: true });
  const browser = await chromium.launch({ executablePath: CHROMIUM, args: FLAGS, headless: true, timeout: TIMEOUT })
    .catch((e) => fail(`cannot start ${CHROMIUM}: ${e.message.split("\n")[0]}`));
  try {
    step = "1 sign in over WebSocket";
    progress(`${step} as ${DEMO_USER} at ${DEMO_URL}`);
    const main = await openPage(browser, "main", DEMO_USER, "ws");
    if (HUB_API_KEY) {
      const text = await announce(`Welcome, ${DEMO_USER}: maintenance tonight at 23:00`);
      await expectBanner(main, text, 1);
      facts.push("announcements shown in the banner");
    } else {
      progress("HUB_API_KEY is not set: the announcement banner is not checked");
    }

    step = "2 order delivered over WebSocket, on the personal stream and the order's channel";
    progress(step);
    const first = await placeOrder(main);
    const subscribedAt = (await waitFollowing(main, first)).at(-1) || null;
    await expectFlow(main, first, HAPPY, "WebSocket");
    await expectChannel(main, first, after(subscribedAt), "WebSocket, order channel");

    step = "3a SSE, disconnect and reconnect mid-flow";
    progress(step);
    await main.page.check("#transport-sse");
    await waitConnected(main, "sse");
    await midFlowDisconnect(main, "sse", "disconnect");

    step = "3b WebSocket, network drop mid-flow";
    progress(step);
    await main.page.check("#transport-ws");
    await waitConnected(main, "ws");
    await midFlowDisconnect(main, "ws", "drop");

    step = "3c WebSocket, disconnect and reconnect mid-flow (the order channel resubscribed)";
    progress(step);
    await midFlowDisconnect(main, "ws", "disconnect");

    step = "4 user broke: payment fails";
    progress(step);
    const broke = await openPage(browser, "broke", "broke", "ws");
    const failedOrder = await placeOrder(broke);
    await expectFlow(broke, failedOrder, FAILED, "user broke");
    await broke.context.close();
    pages.splice(pages.indexOf(broke), 1);

    step = "5 report: removed for reporter and owner, dismissed otherwise";
    progress(`${step} (owner ${OWNER_USER})`);
    const owner = await openPage(browser, "owner", OWNER_USER, "sse");
    const ad = await postAd(owner, "Designer handbag, 90% off");
    progress(`${step}: ${OWNER_USER} posted ${ad}`);
    current = main;
    const removed = await fileReport(main, { target: ad, reason: "This ad is a scam: asks to pay by gift card" });
    await waitDecision(main, removed.reportId, "reporter", "REMOVED");
    current = owner;
    await waitDecision(owner, removed.reportId, "owner", "REMOVED");
    current = main;
    const dismissed = await fileReport(main, { target: ad, reason: "Wrong category, otherwise fine" });
    await waitDecision(main, dismissed.reportId, "reporter", "DISMISSED");

    step = "6 final checks";
    for (const p of pages) {
      const counts = await p.page.$$eval("#orders li[data-status], #moderation-results li[data-report-id]", (rows) =>
        rows.filter((r) => (r.dataset.count !== "1" && r.dataset.decision !== "PENDING") || Number(r.dataset.channelCount || 0) > 1)
          .map((r) => `${r.closest("[data-order-id]")?.dataset.orderId || r.dataset.reportId} ${r.dataset.status || r.dataset.role} ×${r.dataset.count}`));
      if (counts.length) fail(`page "${p.name}": received more than once: ${counts.join(", ")}`);
      if (p.errors.length) fail(`page "${p.name}" threw: ${p.errors.join(" | ")}`);
    }

    await main.page.screenshot({ path: path.join(OUT_DIR, "demo.png"), fullPage: true });
    console.log(`web-demo browser test: OK in ${since()} as ${DEMO_USER}: 4 orders delivered with each status once ` +
      `on the personal stream and the order channel (WebSocket; ${facts.join("; ")}), broke → PAYMENT_FAILED, ` +
      `report REMOVED for reporter and owner, ` +
      `DISMISSED otherwise; screenshot ${path.join(OUT_DIR, "demo.png")}`);
  } catch (e) {
    await report(e);
    process.exitCode = 1;
  } finally {
    await Promise.race([browser.close(), new Promise((r) => setTimeout(r, 5000).unref())]);
    progress("browser closed");
  }
}

async function report(e) {
  console.log(`web-demo browser test: FAILED at step "${step}" after ${since()}: ${e.message}`);
  const out = { step, error: e.message, stack: e.stack, demo_url: DEMO_URL, user: DEMO_USER, owner: OWNER_USER, pages: [] };
  for (const p of pages) {
    const file = p === current ? "failure.png" : `failure-${p.name}.png`;
    await p.page.screenshot({ path: path.join(OUT_DIR, file), fullPage: true }).catch(() => {});
    const log = await p.page.$$eval("#log li", (ls) => ls.map((l) => l.textContent).reverse()).catch(() => []);
    out.pages.push({ name: p.name, screenshot: file, state: await describe(p), console: p.console, event_log: log });
  }
  writeFileSync(path.join(OUT_DIR, "failure.json"), JSON.stringify(out, null, 2));
  writeFileSync(path.join(OUT_DIR, "console.txt"),
    out.pages.map((p) => `== page ${p.name}\n${p.console.join("\n")}\n-- event log\n${p.event_log.join("\n")}\n`).join("\n"));
  console.log(`  details: ${path.join(OUT_DIR, "failure.json")}, console.txt and failure.png there`);
}

// A last resort: every wait has its own deadline, but never hang a CI run.
setTimeout(() => {
  console.log(`web-demo browser test: FAILED: still running after ${since()} (step "${step}")`);
  process.exit(1);
}, TIMEOUT * 20 + 60000).unref();

await main();
