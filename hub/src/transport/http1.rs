//! The little HTTP/1.1 the front door needs: read and parse one request head (httparse),
//! write a complete small response, and hand already-read bytes on to hyper.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// Largest request head accepted (the token may sit in the query or a header).
pub const MAX_HEAD: usize = 16 * 1024;
const MAX_HEADERS: usize = 64;

/// A parsed request head.
#[derive(Debug)]
pub struct Head {
    /// Method.
    pub method: Method,
    /// Path without the query.
    pub path: String,
    /// Raw query string.
    pub query: Option<String>,
    /// Headers.
    pub headers: HeaderMap,
}

/// Why no head could be read.
#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    /// The peer closed or the socket failed before a full head.
    #[error("connection closed before a request head")]
    Closed,
    /// Longer than [`MAX_HEAD`] or more than 64 headers.
    #[error("request head too large")]
    TooLarge,
    /// Not HTTP/1.x.
    #[error("malformed request head")]
    Malformed,
}

/// Reads until one complete request head is in `buf`; returns it and its length in bytes
/// (anything after that length is the start of the body or of the next protocol).
pub async fn read_head<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut Vec<u8>,
) -> Result<(Head, usize), HeadError> {
    loop {
        if let Some(parsed) = parse(buf)? {
            return Ok(parsed);
        }
        if buf.len() >= MAX_HEAD {
            return Err(HeadError::TooLarge);
        }
        buf.reserve(1024.min(MAX_HEAD - buf.len()));
        match io.read_buf(buf).await {
            Ok(0) | Err(_) => return Err(HeadError::Closed),
            Ok(_) => {}
        }
    }
}

fn parse(buf: &[u8]) -> Result<Option<(Head, usize)>, HeadError> {
    if buf.is_empty() {
        return Ok(None);
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(_) => return Err(HeadError::Malformed),
    };
    let method = req
        .method
        .and_then(|m| Method::from_bytes(m.as_bytes()).ok())
        .ok_or(HeadError::Malformed)?;
    let target = req.path.ok_or(HeadError::Malformed)?;
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_owned(), Some(q.to_owned())),
        None => (target.to_owned(), None),
    };
    let mut map = HeaderMap::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| HeadError::Malformed)?;
        let value = HeaderValue::from_bytes(h.value).map_err(|_| HeadError::Malformed)?;
        map.append(name, value);
    }
    Ok(Some((
        Head {
            method,
            path,
            query,
            headers: map,
        },
        len,
    )))
}

/// A complete response that closes the connection (for refusals and small answers): `headers`
/// and a JSON `body` (none when empty).
pub fn response(status: StatusCode, headers: &[(HeaderName, String)], body: &str) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {} {}\r\ncontent-length: {}\r\nconnection: close\r\ncache-control: no-store\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len(),
    );
    if !body.is_empty() {
        out.push_str("content-type: application/json\r\n");
    }
    for (name, value) in headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str("\r\n");
    out.push_str(body);
    out.into_bytes()
}

/// A JSON error response that closes the connection.
pub fn json_error(status: StatusCode, body: &str) -> Vec<u8> {
    response(status, &[], body)
}

/// An IO that first yields bytes already read from the socket, then reads the socket; lets
/// hyper parse a request head the front door has looked at.
pub struct Prefixed<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Prefixed<S> {
    /// Wraps `inner`, replaying `prefix` first.
    pub fn new(prefix: Bytes, inner: S) -> Self {
        Prefixed { prefix, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.prefix.has_remaining() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_a_head_split_over_reads_and_keeps_the_rest() {
        let (mut client, mut server) = tokio::io::duplex(64);
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for part in [
                "GET /sse?token=a%2Eb&x=1 HTTP/1.1\r\nHost: h\r\n",
                "Last-Event-ID: 1-2\r\n\r\nEXTRA",
            ] {
                client.write_all(part.as_bytes()).await.unwrap();
            }
            // Keep the pipe open until the reader is done.
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        });
        let mut buf = Vec::new();
        let (head, len) = read_head(&mut server, &mut buf).await.unwrap();
        assert_eq!(head.method, Method::GET);
        assert_eq!(head.path, "/sse");
        assert_eq!(head.query.as_deref(), Some("token=a%2Eb&x=1"));
        assert_eq!(head.headers["last-event-id"], "1-2");
        assert_eq!(&buf[len..], b"EXTRA");
    }

    #[tokio::test]
    async fn oversized_heads_are_refused() {
        let (mut client, mut server) = tokio::io::duplex(1 << 16);
        let big = format!("GET /ws HTTP/1.1\r\nX: {}\r\n", "a".repeat(MAX_HEAD));
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let _ = client.write_all(big.as_bytes()).await;
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        });
        let mut buf = Vec::new();
        assert!(matches!(
            read_head(&mut server, &mut buf).await,
            Err(HeadError::TooLarge)
        ));
    }

    #[tokio::test]
    async fn prefixed_replays_then_reads_inner() {
        let inner: &[u8] = b" world";
        let mut p = Prefixed::new(Bytes::from_static(b"hello"), inner);
        let mut out = String::new();
        p.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "hello world");
    }

    mod fuzz {
        //! The request-head parser takes any bytes without panicking.

        use proptest::prelude::*;

        use super::super::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn any_bytes_parse_or_are_refused(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
                let _ = parse(&bytes);
            }

            #[test]
            fn head_shaped_input_parses_or_is_refused(
                method in "[A-Z]{0,8}",
                target in "[ -~]{0,64}",
                name in "[!-~]{0,16}",
                value in proptest::collection::vec(any::<u8>(), 0..64),
            ) {
                let mut head = format!("{method} {target} HTTP/1.1\r\n{name}: ").into_bytes();
                head.extend_from_slice(&value);
                head.extend_from_slice(b"\r\n\r\n");
                if let Ok(Some((h, len))) = parse(&head) {
                    prop_assert!(len <= head.len());
                    prop_assert!(!h.path.contains('?'));
                }
            }
        }
    }
}
