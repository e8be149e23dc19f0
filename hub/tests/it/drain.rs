//! Drain on SIGTERM, with the real binary: readiness turns 503 while the listener stays open,
//! new clients are refused with 503, open ones are told to reconnect elsewhere (WS 1012, SSE
//! end of stream) within the drain window, and the process exits cleanly within its grace.

use std::time::Duration;

use test_support::STEP;
use test_support::clients::{SseClient, WsClient};
use test_support::process::Signal;
use tokio::time::Instant;

use crate::helpers::clients::refused_on_both;
use crate::helpers::processes::HubProcess;

/// `HUB_DRAIN_WINDOW` of the node under test.
const DRAIN_WINDOW: Duration = Duration::from_secs(2);
/// `HUB_SHUTDOWN_GRACE` of the node under test.
const GRACE: Duration = Duration::from_secs(10);
/// Allowance on top of the drain window for scheduling and the close handshake.
const SLACK: Duration = Duration::from_millis(1500);

#[tokio::test]
async fn sigterm_turns_unready_refuses_new_clients_closes_open_ones_and_exits() {
    let mut hub =
        HubProcess::start(&[("HUB_DRAIN_WINDOW", "2s"), ("HUB_SHUTDOWN_GRACE", "10s")]).await;
    let app = hub.as_app();
    let token = app.token("drain-u");
    let mut ws = WsClient::connect(&app, &token, "")
        .await
        .expect("WS connects before the drain");
    assert_eq!(ws.envelope().await["type"], "hub.connected");
    let mut sse = SseClient::connect(&app, &token, "")
        .await
        .expect("SSE connects before the drain");
    assert_eq!(sse.event().await.data["type"], "hub.connected");
    assert_eq!(app.get("/readyz").await.0, 200, "ready before the signal");

    hub.signal(Signal::SIGTERM);
    let signalled = Instant::now();

    // Readiness flips while the listener stays open, so a load balancer sees 503, not a reset.
    let deadline = signalled + STEP;
    loop {
        let (status, _) = app.get("/readyz").await;
        if status == 503 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz still answers {status} after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        app.get("/healthz").await.0,
        200,
        "liveness stays 200 while draining"
    );

    // New clients are sent elsewhere before any upgrade or stream starts.
    let newcomer = app.token("drain-new");
    refused_on_both(
        &app,
        &newcomer,
        503,
        "draining",
        2.0,
        "new client during drain",
    )
    .await;

    // Open clients are told to reconnect, within the drain window.
    assert_eq!(
        ws.closing("draining").await,
        Some(1012),
        "WS close code on drain"
    );
    let ws_closed = signalled.elapsed();
    sse.closing("draining").await;
    let sse_ended = signalled.elapsed();
    for (what, at) in [("WS close", ws_closed), ("SSE end", sse_ended)] {
        assert!(
            at <= DRAIN_WINDOW + SLACK,
            "{what} came {at:?} after SIGTERM, drain window is {DRAIN_WINDOW:?}"
        );
    }

    // Clients that got their goodbye go away; the node then has nothing left to wait for.
    drop((ws, sse));
    let status = hub
        .wait_exit(GRACE.saturating_sub(signalled.elapsed()))
        .await
        .expect("the hub exits within the shutdown grace period");
    let exited = signalled.elapsed();
    assert!(status.success(), "the hub exited with {status}");
    println!(
        "drain: WS 1012 after {ws_closed:?}, SSE end after {sse_ended:?}, exit after {exited:?}"
    );
}
