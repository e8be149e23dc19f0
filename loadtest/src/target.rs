//! Hub node addresses: parsed from `--hub` URLs and resolved once by the parent, so
//! workers connect to fixed socket addresses without doing DNS per connection.

use std::net::SocketAddr;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// One hub node as the load generator talks to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HubAddr {
    /// The URL as given on the command line, for the report.
    pub url: String,
    /// `host[:port]` as it goes into the Host header.
    pub authority: String,
    /// Path prefix without a trailing slash, empty for none.
    pub prefix: String,
    /// Resolved address to connect to.
    pub addr: SocketAddr,
}

impl HubAddr {
    /// Resolves a URL such as `http://127.0.0.1:8080` given with `flag` (e.g. `--hub`,
    /// named in errors).
    pub async fn resolve(flag: &str, url: &str) -> Result<Self> {
        let parsed = parse_url(flag, url)?;
        let addr = tokio::net::lookup_host((parsed.host.as_str(), parsed.port))
            .await
            .with_context(|| format!("resolving {}", parsed.host))?
            .next()
            .with_context(|| format!("{} resolved to no address", parsed.host))?;
        Ok(Self {
            url: url.to_owned(),
            authority: parsed.authority,
            prefix: parsed.prefix,
            addr,
        })
    }

    /// Request path for an endpoint such as `/ws`, including the URL's path prefix.
    pub fn path(&self, endpoint: &str) -> String {
        format!("{}{endpoint}", self.prefix)
    }
}

/// The parts of a hub URL that matter for connecting.
#[derive(Debug, PartialEq, Eq)]
struct ParsedUrl {
    authority: String,
    host: String,
    port: u16,
    prefix: String,
}

fn parse_url(flag: &str, url: &str) -> Result<ParsedUrl> {
    let uri: http::Uri = url
        .parse()
        .with_context(|| format!("{flag} {url:?} is not a valid URL"))?;
    match uri.scheme_str() {
        Some("http" | "ws") => {}
        Some(other) => bail!("{flag} {url}: scheme {other:?} is not supported, only plain http"),
        None => bail!("{flag} {url}: needs a scheme, e.g. http://127.0.0.1:8080"),
    }
    let authority = uri
        .authority()
        .with_context(|| format!("{flag} {url}: no host"))?;
    if authority.as_str().contains('@') {
        bail!("{flag} {url}: credentials in the URL are not supported");
    }
    if uri.query().is_some() {
        bail!("{flag} {url}: must not have a query string");
    }
    // `Authority::host` keeps the brackets of an IPv6 literal; lookup wants them off.
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    Ok(ParsedUrl {
        authority: authority.as_str().to_owned(),
        host,
        port: authority.port_u16().unwrap_or(80),
        prefix: uri.path().trim_end_matches('/').to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_prefixed_urls() -> Result<()> {
        assert_eq!(
            parse_url("--hub", "http://127.0.0.1:8080")?,
            ParsedUrl {
                authority: "127.0.0.1:8080".into(),
                host: "127.0.0.1".into(),
                port: 8080,
                prefix: String::new(),
            }
        );
        let p = parse_url("--hub", "http://hub.local/notify/")?;
        assert_eq!((p.port, p.prefix.as_str()), (80, "/notify"));
        let p = parse_url("--hub", "ws://[::1]:9000")?;
        assert_eq!(
            (p.host.as_str(), p.authority.as_str()),
            ("::1", "[::1]:9000")
        );
        Ok(())
    }

    #[test]
    fn rejects_unsupported_urls() {
        for bad in [
            "127.0.0.1:8080",
            "https://h:1",
            "http://u:p@h:1",
            "http://h:1/?a=b",
            "::",
        ] {
            assert!(parse_url("--hub", bad).is_err(), "{bad} should be rejected");
        }
    }

    #[tokio::test]
    async fn resolves_loopback() -> Result<()> {
        let hub = HubAddr::resolve("--hub", "http://127.0.0.1:8080/x").await?;
        assert_eq!(hub.addr, "127.0.0.1:8080".parse()?);
        assert_eq!(hub.path("/ws"), "/x/ws");
        Ok(())
    }
}
