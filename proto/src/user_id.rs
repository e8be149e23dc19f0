//! The one rule for a user id, wherever one enters the system: a token's `sub` (hub and
//! services), the publish API's `user_id`, a Kafka record's recipient, a reported user.

/// Longest user id, in bytes.
pub const MAX_LEN: usize = 256;

/// Checks a user id: 1–256 bytes, no control characters, and no `{` or `}` (the hub's Redis
/// keys wrap the user in a `{...}` hash tag; a brace inside would move the tag and let two
/// users' keys meet).
pub fn check(user: &str) -> Result<(), &'static str> {
    if user.is_empty() {
        return Err("user id must not be empty");
    }
    if user.len() > MAX_LEN {
        return Err("user id longer than 256 bytes");
    }
    if user.chars().any(|c| c.is_control() || c == '{' || c == '}') {
        return Err("user id must not contain '{', '}' or control characters");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule_holds_at_its_edges() {
        assert!(check("alice").is_ok());
        assert!(check("two words").is_ok());
        assert!(check(&"x".repeat(MAX_LEN)).is_ok());
        assert_eq!(check(""), Err("user id must not be empty"));
        assert_eq!(
            check(&"x".repeat(MAX_LEN + 1)),
            Err("user id longer than 256 bytes")
        );
        assert!(check("a{b}").is_err());
        assert!(check("a\nb").is_err());
    }
}
