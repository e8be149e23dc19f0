//! The demo page in headless Chromium (Debian's `chromium`, driven by playwright-core from
//! npm): sign in, see an announcement published through the hub's API in the banner, place
//! orders and watch them reach DELIVERED over WebSocket and over SSE on the personal stream and
//! on each order's channel, press the disconnect button mid-flow and still see every status
//! (and the announcement made meanwhile) once, file a report and see its result. The script is `web-demo/tests/browser.mjs`; its screenshot lands in
//! `target/test-output/browser/`.

use std::process::Command;

use test_support::hex;

use crate::helpers::processes::Kind;
use crate::helpers::stack::Stack;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_page_shows_every_status_once_over_ws_and_sse_across_a_forced_disconnect() {
    let mut stack = Stack::prepare("browser").await;
    stack.start_dev_hub().await;
    // A slower pace than the other tests so the page can be disconnected mid-flow.
    stack
        .extra
        .insert("delivery", vec![("STEP_INTERVAL".into(), "700ms".into())]);
    for kind in [Kind::Order, Kind::Payment, Kind::Delivery, Kind::Moderation] {
        stack.start_service(kind);
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let script_dir = root.join("web-demo/tests");
    assert!(
        script_dir.join("node_modules/playwright-core").is_dir(),
        "playwright-core is not installed: run `npm ci` in web-demo/tests (make test does)"
    );
    let url = format!(
        "{}/?orders={}&moderation={}",
        stack.hub().base(),
        stack.service(Kind::Order).url(""),
        stack.service(Kind::Moderation).url(""),
    );
    let out = stack.out.clone();
    let api_key = stack.hub().api_key.clone();
    let user = format!("lena-{}", hex(3));
    let owner = format!("max-{}", hex(3));
    let status = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg("browser.mjs")
            .current_dir(&script_dir)
            .env("DEMO_URL", &url)
            .env("OUT_DIR", &out)
            .env("DEMO_USER", &user)
            .env("OWNER_USER", &owner)
            .env("HUB_API_KEY", &api_key)
            .status()
    })
    .await
    .expect("join")
    .expect("node runs (install Node.js 18+)");
    assert!(
        status.success(),
        "browser test failed; see {}",
        stack.out.display()
    );
    assert!(stack.out.join("demo.png").is_file(), "screenshot saved");
    stack.cleanup().await;
}
