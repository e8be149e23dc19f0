//! What a client may say to its session (over WebSocket): `refresh` with a new token of the
//! same user, `subscribe` to a channel with a token granting it, `unsubscribe`; anything else
//! is answered with `hub.error`.

use serde::Deserialize;

use super::Context;
use super::handshake::Session;
use crate::envelope::Control;

#[derive(Deserialize)]
struct ClientMessage {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    channel: Option<String>,
}

/// The session's answer to one client message.
pub enum Inbound {
    /// The token was replaced; its expiry (seconds since the Unix epoch).
    Refreshed(u64),
    /// A refresh was refused: the session ends.
    Refused,
    /// A reply to send (`hub.error`).
    Reply(Control),
    /// Join `channel`, which `token` must grant (checked by the session).
    Subscribe {
        /// The channel (a valid name).
        channel: String,
        /// The channel token.
        token: String,
    },
    /// Leave `channel`.
    Unsubscribe(String),
}

/// Reads one client message; the error is the reason sent back in `hub.error`.
fn parse_client_message(text: &str) -> Result<ClientMessage, &'static str> {
    serde_json::from_str::<ClientMessage>(text).map_err(|_| "expected JSON with a \"type\"")
}

/// Answers one client message of `session`.
pub async fn answer(ctx: &Context, session: &Session, text: &str) -> Inbound {
    let msg = match parse_client_message(text) {
        Ok(m) => m,
        Err(reason) => return Inbound::Reply(Control::error(reason)),
    };
    match (msg.kind.as_str(), msg.token) {
        // Boxed: verification may fetch keys; its state stays out of the caller's.
        ("refresh", Some(token)) => match Box::pin(ctx.verifier.verify(&token)).await {
            Ok(identity) if ctx.backplane.revokes(&session.user, identity.iat) => {
                tracing::debug!("refresh with a revoked token refused");
                Inbound::Refused
            }
            Ok(identity) if *identity.user == *session.user => Inbound::Refreshed(identity.exp),
            Ok(_) => {
                tracing::debug!("refresh for another user refused");
                Inbound::Refused
            }
            Err(e) => {
                tracing::debug!(reason = %e, "refresh refused");
                Inbound::Refused
            }
        },
        ("refresh", None) => Inbound::Reply(Control::error("refresh needs a token")),
        ("subscribe" | "unsubscribe", _) if msg.channel.is_none() => {
            Inbound::Reply(Control::error("subscribe and unsubscribe need a channel"))
        }
        ("subscribe" | "unsubscribe", _)
            if msg
                .channel
                .as_deref()
                .is_some_and(|c| crate::envelope::check_channel(c).is_err()) =>
        {
            Inbound::Reply(Control::error(
                "channel name must be 1-128 characters of A-Z a-z 0-9 _ . : @ / -",
            ))
        }
        ("subscribe", None) => Inbound::Reply(Control::error(
            "subscribe needs a token granting the channel",
        )),
        ("subscribe", Some(token)) => Inbound::Subscribe {
            channel: msg.channel.unwrap_or_default(),
            token,
        },
        ("unsubscribe", _) => Inbound::Unsubscribe(msg.channel.unwrap_or_default()),
        _ => Inbound::Reply(Control::error("unknown message type")),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn any_client_text_is_a_message_or_a_reason(text in "\\PC{0,200}") {
            let _ = parse_client_message(&text);
        }

        #[test]
        fn message_shaped_text_with_any_values_never_panics(
            kind in "\\PC{0,20}",
            token in proptest::option::of("\\PC{0,100}"),
            extra in "[a-z]{0,5}",
        ) {
            let mut v = serde_json::json!({ "type": kind, extra.clone(): [1, {"x": null}] });
            if let Some(t) = token {
                v["token"] = serde_json::Value::from(t);
            }
            let parsed = parse_client_message(&v.to_string());
            prop_assert!(parsed.is_ok() || extra == "type");
        }
    }
}
