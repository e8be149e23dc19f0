//! Server-Sent Events client on a raw TCP stream.
//!
//! Hand-written rather than built on an HTTP client so that an idle connection costs
//! only a socket, a 4 KiB buffer and a small parser: this tool holds tens of thousands
//! of them. The byte-level pieces ([`parse_head`], [`ChunkedDecoder`], [`SseParser`])
//! are pure and unit-tested; [`SseConn`] glues them to the socket.

use std::collections::VecDeque;
use std::mem;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::conn::{Failure, tcp_connect};
use crate::target::HubAddr;

/// Initial read buffer per connection; it grows only if the server sends a burst.
const READ_BUF: usize = 4096;
/// Largest response head accepted.
const MAX_HEAD: usize = 16 * 1024;
/// Longest SSE line or chunk-size line accepted, so a broken server cannot exhaust memory.
const MAX_LINE: usize = 1 << 20;
/// How much of an error response body is kept for the report.
const MAX_ERROR_BODY: usize = 2048;
/// How long to wait for the rest of an error response body.
const ERROR_BODY_WAIT: Duration = Duration::from_secs(2);

/// How the response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// `Content-Length: n`.
    Length(u64),
    /// Neither: the body runs until the server closes the connection.
    Close,
}

/// The parts of an HTTP response head this client needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// Status code.
    pub status: u16,
    /// Body framing derived from the headers.
    pub framing: Framing,
    /// `Content-Type`, if present.
    pub content_type: Option<String>,
    /// Length of the head in bytes, i.e. where the body starts in the buffer.
    pub len: usize,
}

/// Parses a response head from the start of `buf`; `Ok(None)` means more bytes are needed.
pub fn parse_head(buf: &[u8]) -> Result<Option<Head>> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    let len = match response
        .parse(buf)
        .context("malformed HTTP response head")?
    {
        httparse::Status::Complete(len) => len,
        httparse::Status::Partial => return Ok(None),
    };
    let status = response.code.context("response head without status code")?;
    let mut chunked = false;
    let mut length = None;
    let mut content_type = None;
    for header in response.headers.iter() {
        let value = String::from_utf8_lossy(header.value);
        if header.name.eq_ignore_ascii_case("transfer-encoding") {
            // The last coding decides the framing; "chunked" must be last if present.
            chunked = value
                .rsplit(',')
                .next()
                .is_some_and(|c| c.trim().eq_ignore_ascii_case("chunked"));
        } else if header.name.eq_ignore_ascii_case("content-length") {
            length = Some(
                value
                    .trim()
                    .parse::<u64>()
                    .with_context(|| format!("bad Content-Length {value:?}"))?,
            );
        } else if header.name.eq_ignore_ascii_case("content-type") {
            content_type = Some(value.trim().to_owned());
        }
    }
    // Chunked wins over Content-Length (RFC 9112 §6.3).
    let framing = match (chunked, length) {
        (true, _) => Framing::Chunked,
        (false, Some(n)) => Framing::Length(n),
        (false, None) => Framing::Close,
    };
    Ok(Some(Head {
        status,
        framing,
        content_type,
        len,
    }))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Reading the hex size line.
    Size,
    /// Inside chunk data with this many bytes left.
    Data(u64),
    /// Expecting the CRLF that ends a chunk's data.
    DataEnd,
    /// After the zero-size chunk, reading trailer lines up to the empty one.
    Trailer,
    /// The body is complete.
    Done,
}

/// Incremental decoder for `Transfer-Encoding: chunked` bodies.
#[derive(Debug)]
pub struct ChunkedDecoder {
    state: ChunkState,
    line: Vec<u8>,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        Self {
            state: ChunkState::Size,
            line: Vec::new(),
        }
    }
}

impl ChunkedDecoder {
    /// Decodes `input`, passing body bytes to `sink`; returns whether the body has ended.
    ///
    /// Input may be split anywhere, even inside a size line or the CRLF after data.
    pub fn feed(
        &mut self,
        mut input: &[u8],
        sink: &mut dyn FnMut(&[u8]) -> Result<()>,
    ) -> Result<bool> {
        while !input.is_empty() {
            match self.state {
                ChunkState::Done => break,
                ChunkState::Data(left) => {
                    let take = usize::try_from(left).map_or(input.len(), |l| l.min(input.len()));
                    sink(&input[..take])?;
                    input = &input[take..];
                    let left = left - take as u64;
                    self.state = if left == 0 {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left)
                    };
                }
                ChunkState::Size | ChunkState::DataEnd | ChunkState::Trailer => {
                    let Some(newline) = input.iter().position(|&b| b == b'\n') else {
                        self.push_line(input)?;
                        break;
                    };
                    self.push_line(&input[..newline])?;
                    input = &input[newline + 1..];
                    self.end_line()?;
                }
            }
        }
        Ok(self.state == ChunkState::Done)
    }

    fn push_line(&mut self, bytes: &[u8]) -> Result<()> {
        if self.line.len() + bytes.len() > MAX_LINE {
            bail!("chunked encoding line too long");
        }
        self.line.extend_from_slice(bytes);
        Ok(())
    }

    fn end_line(&mut self) -> Result<()> {
        let line = self.line.strip_suffix(b"\r").unwrap_or(&self.line);
        self.state = match self.state {
            ChunkState::Size => {
                // Chunk extensions (";name=value") are allowed and ignored.
                let digits = line.split(|&b| b == b';').next().unwrap_or_default();
                let digits = std::str::from_utf8(digits)
                    .context("chunk size is not ASCII")?
                    .trim();
                let size = u64::from_str_radix(digits, 16)
                    .with_context(|| format!("bad chunk size {digits:?}"))?;
                if size == 0 {
                    ChunkState::Trailer
                } else {
                    ChunkState::Data(size)
                }
            }
            ChunkState::DataEnd if line.is_empty() => ChunkState::Size,
            ChunkState::DataEnd => bail!("chunk data not followed by CRLF"),
            ChunkState::Trailer if line.is_empty() => ChunkState::Done,
            other => other,
        };
        self.line.clear();
        Ok(())
    }
}

/// Body decoder for any of the three framings.
#[derive(Debug)]
pub enum BodyDecoder {
    /// Chunked transfer coding.
    Chunked(ChunkedDecoder),
    /// Fixed length with this many bytes left.
    Length(u64),
    /// Runs until the connection closes.
    Close,
}

impl BodyDecoder {
    /// Creates the decoder for a response's framing.
    pub fn new(framing: Framing) -> Self {
        match framing {
            Framing::Chunked => Self::Chunked(ChunkedDecoder::default()),
            Framing::Length(n) => Self::Length(n),
            Framing::Close => Self::Close,
        }
    }

    /// Decodes `input` into `sink`; returns whether the body has ended.
    pub fn feed(
        &mut self,
        input: &[u8],
        sink: &mut dyn FnMut(&[u8]) -> Result<()>,
    ) -> Result<bool> {
        match self {
            Self::Chunked(decoder) => decoder.feed(input, sink),
            Self::Length(left) => {
                let take = usize::try_from(*left).map_or(input.len(), |l| l.min(input.len()));
                sink(&input[..take])?;
                *left -= take as u64;
                Ok(*left == 0)
            }
            Self::Close => {
                sink(input)?;
                Ok(false)
            }
        }
    }
}

/// One dispatched server-sent event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SseEvent {
    /// The last event id seen on the stream, if any.
    pub id: Option<String>,
    /// The `event:` type, if the event had one.
    pub event: Option<String>,
    /// The `data:` lines joined by `\n`.
    pub data: Vec<u8>,
}

/// Incremental `text/event-stream` parser following the WHATWG rules.
#[derive(Debug, Default)]
pub struct SseParser {
    line: Vec<u8>,
    /// The previous input ended with CR, so a leading LF belongs to that line ending.
    after_cr: bool,
    data: Vec<u8>,
    has_data: bool,
    event: Option<String>,
    /// Last `id:` value seen.
    pub last_event_id: Option<String>,
    /// Last `retry:` value seen, in milliseconds.
    pub retry_ms: Option<u64>,
    /// Comment lines seen (the hub's heartbeats are `: ping`).
    pub comments: u64,
}

impl SseParser {
    /// Parses `input`, calling `on_event` for each complete event with data.
    ///
    /// Lines may end in LF, CRLF or CR, and input may be split anywhere.
    pub fn feed(&mut self, mut input: &[u8], on_event: &mut dyn FnMut(SseEvent)) -> Result<()> {
        while let Some((&first, tail)) = input.split_first() {
            if mem::take(&mut self.after_cr) && first == b'\n' {
                input = tail;
                continue;
            }
            let Some(end) = input.iter().position(|&b| b == b'\n' || b == b'\r') else {
                self.push_line(input)?;
                break;
            };
            self.push_line(&input[..end])?;
            self.after_cr = input[end] == b'\r';
            input = &input[end + 1..];
            let line = mem::take(&mut self.line);
            self.process_line(&line, on_event);
            // Keep the allocation for the next line.
            self.line = line;
            self.line.clear();
        }
        Ok(())
    }

    fn push_line(&mut self, bytes: &[u8]) -> Result<()> {
        if self.line.len() + bytes.len() > MAX_LINE {
            bail!("event-stream line longer than {MAX_LINE} bytes");
        }
        self.line.extend_from_slice(bytes);
        Ok(())
    }

    fn process_line(&mut self, line: &[u8], on_event: &mut dyn FnMut(SseEvent)) {
        if line.is_empty() {
            self.dispatch(on_event);
            return;
        }
        if line.first() == Some(&b':') {
            self.comments += 1;
            return;
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &b""[..]),
        };
        match field {
            b"data" => {
                if self.has_data {
                    self.data.push(b'\n');
                }
                self.data.extend_from_slice(value);
                self.has_data = true;
            }
            b"id" if !value.contains(&0) => {
                self.last_event_id = Some(String::from_utf8_lossy(value).into_owned());
            }
            b"event" => self.event = Some(String::from_utf8_lossy(value).into_owned()),
            b"retry" => {
                if let Ok(ms) = std::str::from_utf8(value).unwrap_or_default().parse() {
                    self.retry_ms = Some(ms);
                }
            }
            _ => {}
        }
    }

    fn dispatch(&mut self, on_event: &mut dyn FnMut(SseEvent)) {
        let event = self.event.take();
        if !mem::take(&mut self.has_data) {
            return;
        }
        on_event(SseEvent {
            id: self.last_event_id.clone(),
            event,
            data: mem::take(&mut self.data),
        });
    }
}

/// The request head of `GET /sse`; an id that cannot be a header value is refused.
fn request_head(
    hub: &HubAddr,
    token: &str,
    last_event_id: Option<&str>,
) -> Result<String, Failure> {
    let resume = match last_event_id {
        // The hub's ids are printable; anything that could end the header line is a bug.
        Some(id) if id.bytes().any(|b| b.is_ascii_control()) => {
            return Err(Failure::new(
                "sse resume",
                "the last event id holds control characters",
            ));
        }
        Some(id) => format!("Last-Event-ID: {id}\r\n"),
        None => String::new(),
    };
    Ok(format!(
        "GET {path}?token={token} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\
         Cache-Control: no-cache\r\nUser-Agent: hub-loadgen\r\n{resume}\r\n",
        path = hub.path("/sse"),
        host = hub.authority,
    ))
}

/// An established SSE connection yielding each event's data.
pub struct SseConn {
    stream: TcpStream,
    buf: BytesMut,
    body: BodyDecoder,
    parser: SseParser,
    pending: VecDeque<Bytes>,
    ended: bool,
}

impl SseConn {
    /// Connects, sends `GET /sse?token=…` (with `Last-Event-ID: <last_event_id>` when
    /// resuming) and checks for a 200 response.
    pub async fn connect(
        hub: &HubAddr,
        token: &str,
        last_event_id: Option<&str>,
        source: Option<std::net::SocketAddr>,
    ) -> Result<Self, Failure> {
        let request = request_head(hub, token, last_event_id)?;
        let mut stream = tcp_connect(hub.addr, source).await?;
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| Failure::new("sse write", e.to_string()))?;

        let mut buf = BytesMut::with_capacity(READ_BUF);
        let head = loop {
            let n = stream
                .read_buf(&mut buf)
                .await
                .map_err(|e| Failure::new("sse read", e.to_string()))?;
            match parse_head(&buf)
                .map_err(|e| Failure::new("sse bad response", format!("{e:#}")))?
            {
                Some(head) => break head,
                None if n == 0 => {
                    return Err(Failure::new(
                        "sse closed",
                        "connection closed before response head",
                    ));
                }
                None if buf.len() > MAX_HEAD => {
                    return Err(Failure::new("sse bad response", "response head too large"));
                }
                None => {}
            }
        };
        buf.advance(head.len);
        let body = BodyDecoder::new(head.framing);
        if head.status != 200 {
            let detail = read_error_body(&mut stream, buf, body).await;
            return Err(Failure::new(format!("http {}", head.status), detail));
        }
        if let Some(ct) = head.content_type.as_deref()
            && !ct.to_ascii_lowercase().starts_with("text/event-stream")
        {
            return Err(Failure::new("sse bad content-type", ct));
        }
        Ok(Self {
            stream,
            buf,
            body,
            parser: SseParser::default(),
            pending: VecDeque::new(),
            ended: false,
        })
    }

    /// Waits for the next event's data; any end of the stream is an error.
    pub async fn next_payload(&mut self) -> Result<Bytes> {
        loop {
            if let Some(payload) = self.pending.pop_front() {
                return Ok(payload);
            }
            if !self.buf.is_empty() {
                self.decode_buffered()?;
                continue;
            }
            if self.ended {
                bail!("server ended the event stream");
            }
            let n = self
                .stream
                .read_buf(&mut self.buf)
                .await
                .context("reading event stream")?;
            if n == 0 {
                bail!("connection closed by server");
            }
        }
    }

    /// Comment lines (heartbeats) received so far.
    pub fn comments(&self) -> u64 {
        self.parser.comments
    }

    fn decode_buffered(&mut self) -> Result<()> {
        let Self {
            buf,
            body,
            parser,
            pending,
            ended,
            ..
        } = self;
        let mut on_event = |event: SseEvent| pending.push_back(Bytes::from(event.data));
        *ended |= body.feed(buf, &mut |bytes| parser.feed(bytes, &mut on_event))?;
        buf.clear();
        Ok(())
    }
}

/// Reads what arrives of an error response body within a short time, for the report.
async fn read_error_body(
    stream: &mut TcpStream,
    mut buf: BytesMut,
    mut body: BodyDecoder,
) -> String {
    let mut text = Vec::new();
    let collect = async {
        loop {
            let mut sink = |bytes: &[u8]| {
                let room = MAX_ERROR_BODY.saturating_sub(text.len());
                text.extend_from_slice(&bytes[..bytes.len().min(room)]);
                Ok(())
            };
            let done = body.feed(&buf, &mut sink).unwrap_or(true);
            buf.clear();
            if done || text.len() >= MAX_ERROR_BODY {
                break;
            }
            match stream.read_buf(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    };
    // A slow or silent error body is not worth holding the connect slot for.
    let _ = tokio::time::timeout(ERROR_BODY_WAIT, collect).await;
    String::from_utf8_lossy(&text).trim().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resume_sends_the_last_event_id_header() -> Result<()> {
        let hub = HubAddr {
            url: String::new(),
            authority: "h:1".into(),
            prefix: "/p".into(),
            addr: "127.0.0.1:1".parse()?,
        };
        let fresh = request_head(&hub, "T", None)?;
        assert!(fresh.starts_with("GET /p/sse?token=T HTTP/1.1\r\nHost: h:1\r\n"));
        assert!(!fresh.contains("Last-Event-ID") && fresh.ends_with("\r\n\r\n"));
        let resumed = request_head(&hub, "T", Some("c.9-1"))?;
        assert!(
            resumed.ends_with("\r\nLast-Event-ID: c.9-1\r\n\r\n"),
            "{resumed}"
        );
        assert!(request_head(&hub, "T", Some("a\r\nX: y")).is_err());
        Ok(())
    }

    fn decode_all(
        decoder: &mut ChunkedDecoder,
        input: &[u8],
        step: usize,
    ) -> Result<(Vec<u8>, bool)> {
        let mut out = Vec::new();
        let mut done = false;
        for piece in input.chunks(step) {
            done = decoder.feed(piece, &mut |b| {
                out.extend_from_slice(b);
                Ok(())
            })?;
        }
        Ok((out, done))
    }

    #[test]
    fn chunked_decodes_across_any_split() -> Result<()> {
        let body = b"6\r\nhello \r\n1a;ext=1\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nX-Trailer: t\r\n\r\nGARBAGE";
        for step in 1..body.len() {
            let (out, done) = decode_all(&mut ChunkedDecoder::default(), body, step)?;
            assert_eq!(out, b"hello abcdefghijklmnopqrstuvwxyz", "step {step}");
            assert!(done, "step {step}");
        }
        Ok(())
    }

    #[test]
    fn chunked_is_not_done_mid_stream() -> Result<()> {
        let (out, done) = decode_all(&mut ChunkedDecoder::default(), b"3\r\nabc\r\n5\r\nde", 4)?;
        assert_eq!(out, b"abcde");
        assert!(!done);
        Ok(())
    }

    #[test]
    fn chunked_rejects_malformed_input() {
        let mut sink = |_: &[u8]| Ok(());
        assert!(
            ChunkedDecoder::default()
                .feed(b"zz\r\n", &mut sink)
                .is_err()
        );
        assert!(
            ChunkedDecoder::default()
                .feed(b"3\r\nabcX\r\n", &mut sink)
                .is_err()
        );
        assert!(
            ChunkedDecoder::default()
                .feed(b"fffffffffffffffffffff\r\n", &mut sink)
                .is_err()
        );
    }

    #[test]
    fn length_and_close_framings() -> Result<()> {
        let mut out = Vec::new();
        let mut body = BodyDecoder::new(Framing::Length(5));
        let mut sink = |b: &[u8]| {
            out.extend_from_slice(b);
            Ok(())
        };
        assert!(!body.feed(b"abc", &mut sink)?);
        assert!(body.feed(b"defgh", &mut sink)?);
        let mut body = BodyDecoder::new(Framing::Close);
        assert!(!body.feed(b"xyz", &mut sink)?);
        assert_eq!(out, b"abcdexyz");
        Ok(())
    }

    #[test]
    fn parses_response_heads() -> Result<()> {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n";
        let head = parse_head(raw)?.context("complete head")?;
        assert_eq!(head.status, 200);
        assert_eq!(head.framing, Framing::Chunked);
        assert_eq!(head.content_type.as_deref(), Some("text/event-stream"));
        assert_eq!(&raw[head.len..], b"5\r\n");

        let head = parse_head(b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 17\r\n\r\n")?
            .context("complete head")?;
        assert_eq!((head.status, head.framing), (401, Framing::Length(17)));

        let head = parse_head(b"HTTP/1.0 200 OK\r\nContent-Type: text/event-stream\r\n\r\n")?
            .context("complete head")?;
        assert_eq!(head.framing, Framing::Close);

        assert_eq!(parse_head(b"HTTP/1.1 200 OK\r\nContent-")?, None);
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n").is_err());
        assert!(parse_head(b"NOT HTTP\r\n\r\n").is_err());
        Ok(())
    }

    fn parse_events(input: &[u8], step: usize) -> Result<(Vec<SseEvent>, SseParser)> {
        let mut parser = SseParser::default();
        let mut events = Vec::new();
        for piece in input.chunks(step) {
            parser.feed(piece, &mut |e| events.push(e))?;
        }
        Ok((events, parser))
    }

    #[test]
    fn sse_events_comments_and_fields() -> Result<()> {
        let stream = b": ping\n\nretry: 2500\nid: 7\ndata: {\"type\":\"load\"}\n\n\
                       event: custom\r\ndata:first\r\ndata: second\r\n\r\n\
                       : ping\rid: 8\rdata: x\r\rdata: incomplete";
        for step in 1..stream.len() {
            let (events, parser) = parse_events(stream, step)?;
            assert_eq!(
                events,
                vec![
                    SseEvent {
                        id: Some("7".into()),
                        event: None,
                        data: br#"{"type":"load"}"#.to_vec(),
                    },
                    SseEvent {
                        id: Some("7".into()),
                        event: Some("custom".into()),
                        data: b"first\nsecond".to_vec(),
                    },
                    SseEvent {
                        id: Some("8".into()),
                        event: None,
                        data: b"x".to_vec(),
                    },
                ],
                "step {step}"
            );
            assert_eq!(parser.comments, 2, "step {step}");
            assert_eq!(parser.retry_ms, Some(2500));
            assert_eq!(parser.last_event_id.as_deref(), Some("8"));
        }
        Ok(())
    }

    #[test]
    fn sse_blank_lines_without_data_dispatch_nothing() -> Result<()> {
        let (events, _) = parse_events(b"\n\nevent: x\n\nid: 1\n\n:c\n\n", 3)?;
        assert!(events.is_empty());
        let (events, _) = parse_events(b"data\n\ndata:\n\n", 1)?;
        assert_eq!(events.len(), 2);
        assert!(events.iter().all(|e| e.data.is_empty()));
        Ok(())
    }

    #[test]
    fn sse_over_chunked_body() -> Result<()> {
        let wire = b"e\r\ndata: {\"a\":1}\n\r\n1\r\n\n\r\n8\r\n: ping\n\n\r\n";
        let mut body = BodyDecoder::new(Framing::Chunked);
        let mut parser = SseParser::default();
        let mut events = Vec::new();
        for piece in wire.chunks(5) {
            body.feed(piece, &mut |b| parser.feed(b, &mut |e| events.push(e.data)))?;
        }
        assert_eq!(events, vec![br#"{"a":1}"#.to_vec()]);
        assert_eq!(parser.comments, 1);
        Ok(())
    }

    #[test]
    fn sse_rejects_endless_line() {
        let mut parser = SseParser::default();
        let big = vec![b'a'; MAX_LINE / 2 + 1];
        let mut sink = |_: SseEvent| {};
        assert!(parser.feed(&big, &mut sink).is_ok());
        assert!(parser.feed(&big, &mut sink).is_err());
    }
}
