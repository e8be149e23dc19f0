//! The Origin allow-list, and the cookie only from an allowed Origin.

use test_support::clients::{SseClient, WsClient};

use crate::helpers::app::{spawn_app, spawn_app_with};

#[tokio::test]
async fn foreign_origin_is_refused_when_a_list_is_set() {
    let app = spawn_app_with(&[(
        "HUB_ALLOWED_ORIGINS",
        "https://app.test,http://localhost:3000",
    )])
    .await;
    let token = app.token("o1");
    let url = app.ws_url(&format!("token={token}"));
    let refused = WsClient::connect_with(&url, &[("origin", "https://evil.test")])
        .await
        .err()
        .expect("foreign origin refused");
    assert_eq!(refused.status, 403);
    assert!(refused.body.contains("origin"));
    let sse = SseClient::connect_with(
        &app,
        &format!("/sse?token={token}"),
        &[("Origin", "https://evil.test")],
    )
    .await
    .err()
    .expect("foreign origin refused on SSE");
    assert_eq!(sse.status, 403);

    let mut ok = WsClient::connect_with(&url, &[("origin", "http://localhost:3000")])
        .await
        .expect("listed origin accepted");
    assert_eq!(ok.envelope().await["type"], "hub.connected");
    // No Origin at all (not a browser): accepted.
    let mut plain = WsClient::connect_with(&url, &[])
        .await
        .expect("no origin accepted");
    assert_eq!(plain.envelope().await["type"], "hub.connected");
    app.wait_metric("hub_handshake_rejections_total{reason=\"origin\"}", 2.0)
        .await;
    app.stop().await;
}

#[tokio::test]
async fn cookie_is_ignored_from_a_foreign_or_absent_origin() {
    let app = spawn_app_with(&[("HUB_ALLOWED_ORIGINS", "https://app.test")]).await;
    let cookie = format!("hub_token={}", app.token("c1"));
    // With no list at all, any origin may connect, but the cookie is never trusted.
    let open = spawn_app().await;
    let open_cookie = format!("hub_token={}", open.token("c1"));
    let r = SseClient::connect_with(
        &open,
        "/sse",
        &[("Cookie", &open_cookie), ("Origin", "https://any.test")],
    )
    .await
    .err()
    .expect("cookie not used from an unlisted origin");
    assert_eq!(r.status, 401);
    assert!(r.body.contains("missing token"));
    // No Origin header: the cookie is not used either.
    let r = SseClient::connect_with(&app, "/sse", &[("Cookie", &cookie)])
        .await
        .err()
        .expect("cookie not used without an origin");
    assert_eq!(r.status, 401);
    // Listed origin: the cookie works, and CORS headers allow the credentialed stream.
    let ok = SseClient::connect_with(
        &app,
        "/sse",
        &[("Cookie", &cookie), ("Origin", "https://app.test")],
    )
    .await
    .expect("cookie from the listed origin");
    assert!(
        ok.headers
            .iter()
            .any(|(k, v)| k == "access-control-allow-origin" && v == "https://app.test")
    );
    assert!(
        ok.headers
            .iter()
            .any(|(k, v)| k == "access-control-allow-credentials" && v == "true")
    );
    app.stop().await;
    open.stop().await;
}
