//! Accept stock gRPC clients that send the socket path as `:authority`.
//!
//! grpcio (Python, since 1.57), grpc-java and grpc-swift dialling `unix:/run/x.sock` send the
//! percent-encoded path (`%2Frun%2Fx.sock`) as the HTTP/2 `:authority` pseudo-header. That is
//! not a valid authority, and the `h2` crate under tonic resets every such stream (RECIPE.md
//! pitfall 1; grpc/grpc#38142, hyperium/h2#487). Our users' programs must work unchanged, so
//! [`FixAuthority`] sits between each accepted connection and h2 and rewrites an invalid
//! `:authority` in incoming header blocks to `localhost` before h2 parses them.
//!
//! HPACK (RFC 7541) is stateful: both ends keep a dynamic table that each header block
//! updates. Changing one value in a block would desynchronise the client's table from h2's.
//! So once a connection needs rewriting, every header block of it (HEADERS plus its
//! CONTINUATION frames, RFC 9113 §6.2, §6.10) is decoded with a decoder mirroring the client's
//! encoder and re-encoded with our own encoder, whose table h2's decoder mirrors. Other frames
//! pass through untouched, streamed as they arrive (frames split across reads are handled).
//!
//! Every header block the adaptor decodes is bounded by its decoded size (RFC 7541 §4.1: name,
//! value and 32 bytes per field) as it is decoded: a field past
//! [`crate::limits::MAX_HEADER_LIST`] is not kept and the connection is refused, so a small
//! block naming one large dynamic-table entry thousands of times costs nothing proportional to
//! what it would expand to. The encoded block is bounded by the same number.
//!
//! The decision is taken on the connection's first header block: a client whose first
//! `:authority` is valid (tonic, grpc-go, curl) gets a plain pass-through for the whole
//! connection, with no per-request cost. A client's authority is fixed per channel, so a later
//! block cannot need the rewrite when the first did not.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// What an invalid `:authority` becomes.
pub const REPLACEMENT: &[u8] = b"localhost";
/// Largest frame payload we emit: the HTTP/2 default SETTINGS_MAX_FRAME_SIZE, which the
/// server (h2 under tonic) keeps.
pub const MAX_FRAME: usize = 16_384;
/// Largest header block accepted, encoded (as received) and decoded (RFC 7541 §4.1): far
/// above any gRPC request's headers.
pub const MAX_BLOCK: usize = crate::limits::MAX_HEADER_LIST;
/// The HPACK dynamic table size h2 advertises (the default; RFC 7541 §4.2).
pub const TABLE_SIZE: usize = 4096;

const FRAME_HEADERS: u8 = 0x1;
const FRAME_SETTINGS: u8 = 0x4;
const FRAME_CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;

/// Why a connection's incoming bytes could not be rewritten; the connection is closed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RewriteError {
    /// A HEADERS or CONTINUATION frame longer than [`MAX_FRAME`], padding longer than the
    /// frame, or a header block over [`MAX_BLOCK`].
    #[error("HTTP/2 header frame too large or malformed")]
    FrameSize,
    /// A header block whose decoded size is over [`MAX_BLOCK`].
    #[error("HTTP/2 header list over {MAX_BLOCK} bytes decoded")]
    HeaderListTooLarge,
    /// A frame other than CONTINUATION (of the same stream) inside a header block.
    #[error("HTTP/2 header block interrupted by another frame")]
    Interrupted,
    /// The block is not valid HPACK.
    #[error("HPACK decoding failed: {0}")]
    Hpack(String),
}

impl From<RewriteError> for io::Error {
    fn from(e: RewriteError) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

/// Whether h2 accepts `value` as an `:authority` (the check it makes with the `http` crate).
pub fn valid_authority(value: &[u8]) -> bool {
    !value.is_empty() && http::uri::Authority::try_from(value).is_ok()
}

/// What the rewriter does with the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Before the first header block is complete.
    Undecided,
    /// Every header block is decoded and re-encoded.
    Rewrite,
    /// Bytes go through untouched (a valid first `:authority`, or not HTTP/2 at all: h2 will
    /// answer it).
    PassThrough,
}

/// A header block being gathered across HEADERS and CONTINUATION frames.
struct Block {
    stream_id: u32,
    /// END_STREAM of the HEADERS frame.
    end_stream: bool,
    /// The HEADERS frame's priority fields (5 bytes), if it had them.
    priority: Option<[u8; 5]>,
    /// The block's HEADERS frame as received, replayed in pass-through.
    fragment: Vec<u8>,
    /// The frames as received, replayed as they were when the connection is not rewritten.
    original: Vec<u8>,
}

/// The incoming half of one HTTP/2 connection, as a pure state machine: bytes in, bytes for
/// h2 out.
pub struct Rewriter {
    mode: Mode,
    /// Preface bytes still to pass.
    preface_left: usize,
    /// Where the client is in its handshake: the preface, then a SETTINGS frame.
    handshake: Handshake,
    /// Bytes of the current non-header frame still to pass through.
    passing: usize,
    block: Option<Block>,
    decoder: loona_hpack::Decoder<'static>,
    encoder: loona_hpack::Encoder<'static>,
    /// Header blocks whose `:authority` was rewritten (for tests and logs).
    pub rewritten: u64,
}

/// How far the client's handshake (RFC 9113 §3.4: the preface, then SETTINGS) has come.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Handshake {
    /// Before the first frame after the preface.
    Preface,
    /// Inside the first SETTINGS frame: this many payload bytes still to come.
    Settings(usize),
    /// The preface and a whole SETTINGS frame are in (or the bytes are not HTTP/2: h2 refuses
    /// them itself).
    Done,
}

impl Default for Rewriter {
    fn default() -> Self {
        Self::new()
    }
}

impl Rewriter {
    /// A rewriter for a fresh connection (expecting the client preface).
    pub fn new() -> Rewriter {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(TABLE_SIZE);
        Rewriter {
            mode: Mode::Undecided,
            preface_left: PREFACE.len(),
            handshake: Handshake::Preface,
            passing: 0,
            block: None,
            decoder,
            encoder: loona_hpack::Encoder::new(),
            rewritten: 0,
        }
    }

    /// Whether every further byte passes through untouched.
    pub fn is_pass_through(&self) -> bool {
        self.mode == Mode::PassThrough && self.block.is_none() && self.preface_left == 0
    }

    /// Whether the client has sent the preface and a whole SETTINGS frame.
    pub fn handshake_done(&self) -> bool {
        self.handshake == Handshake::Done
    }

    /// Consumes what it can of `input` (leaving an incomplete header frame there) and appends
    /// the bytes for h2 to `out`.
    pub fn feed(&mut self, input: &mut BytesMut, out: &mut BytesMut) -> Result<(), RewriteError> {
        loop {
            if self.mode == Mode::PassThrough && self.block.is_none() {
                out.put(input.split());
                self.preface_left = 0;
                return Ok(());
            }
            if self.preface_left > 0 {
                let n = self.preface_left.min(input.len());
                let at = PREFACE.len() - self.preface_left;
                if input[..n] != PREFACE[at..at + n] {
                    // Not HTTP/2 with prior knowledge: let h2 say so.
                    self.mode = Mode::PassThrough;
                    continue;
                }
                out.put(input.split_to(n));
                self.preface_left -= n;
                if self.preface_left > 0 {
                    return Ok(());
                }
            }
            if self.passing > 0 {
                let n = self.passing.min(input.len());
                out.put(input.split_to(n));
                self.passing -= n;
                if let Handshake::Settings(left) = self.handshake {
                    self.handshake = match left.saturating_sub(n) {
                        0 => Handshake::Done,
                        left => Handshake::Settings(left),
                    };
                }
                if self.passing > 0 {
                    return Ok(());
                }
            }
            if input.len() < 9 {
                return Ok(());
            }
            let len = (usize::from(input[0]) << 16)
                | (usize::from(input[1]) << 8)
                | usize::from(input[2]);
            let kind = input[3];
            let flags = input[4];
            let stream_id =
                u32::from_be_bytes([input[5], input[6], input[7], input[8]]) & 0x7fff_ffff;
            let is_header = kind == FRAME_HEADERS || kind == FRAME_CONTINUATION;
            if self.handshake == Handshake::Preface {
                // The first frame must be SETTINGS; anything else h2 refuses.
                self.handshake = match (kind, len) {
                    (FRAME_SETTINGS, 0) => Handshake::Done,
                    (FRAME_SETTINGS, len) => Handshake::Settings(len),
                    _ => Handshake::Done,
                };
            }
            if self.block.is_some()
                && (kind != FRAME_CONTINUATION
                    || self
                        .block
                        .as_ref()
                        .is_some_and(|b| b.stream_id != stream_id))
            {
                return Err(RewriteError::Interrupted);
            }
            if !is_header || (kind == FRAME_CONTINUATION && self.block.is_none()) {
                // Not ours to touch (a stray CONTINUATION is h2's to reject).
                out.put(input.split_to(9));
                self.passing = len;
                continue;
            }
            if len > MAX_FRAME {
                return Err(RewriteError::FrameSize);
            }
            if input.len() < 9 + len {
                return Ok(());
            }
            let frame = input.split_to(9 + len);
            let payload = &frame[9..];
            if kind == FRAME_HEADERS {
                let (priority, fragment) = headers_payload(flags, payload)?;
                self.block = Some(Block {
                    stream_id,
                    end_stream: flags & FLAG_END_STREAM != 0,
                    priority,
                    fragment: fragment.to_vec(),
                    original: frame.to_vec(),
                });
            } else if let Some(b) = self.block.as_mut() {
                b.fragment.extend_from_slice(payload);
                b.original.extend_from_slice(&frame);
            }
            if self
                .block
                .as_ref()
                .is_some_and(|b| b.fragment.len() > MAX_BLOCK)
            {
                return Err(RewriteError::FrameSize);
            }
            if flags & FLAG_END_HEADERS != 0
                && let Some(block) = self.block.take()
            {
                self.finish(block, out)?;
            }
        }
    }

    /// A whole header block: decode, decide, rewrite, re-encode.
    fn finish(&mut self, block: Block, out: &mut BytesMut) -> Result<(), RewriteError> {
        if self.mode == Mode::PassThrough {
            out.put_slice(&block.original);
            return Ok(());
        }
        // Counted field by field as it is decoded; past the bound nothing more is kept (a
        // field named from the dynamic table is only borrowed until then).
        let mut size = 0usize;
        let mut headers: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        self.decoder
            .decode_with_cb(&block.fragment, |name, value| {
                size = size.saturating_add(name.len() + value.len() + 32);
                if size <= MAX_BLOCK {
                    headers.push((name.into_owned(), value.into_owned()));
                }
            })
            .map_err(|e| RewriteError::Hpack(format!("{e:?}")))?;
        if size > MAX_BLOCK {
            return Err(RewriteError::HeaderListTooLarge);
        }
        let mut fixed = false;
        for (name, value) in headers.iter_mut() {
            if name.as_slice() == b":authority" && !valid_authority(value) {
                *value = REPLACEMENT.to_vec();
                fixed = true;
            }
        }
        if self.mode == Mode::Undecided {
            if !fixed {
                self.mode = Mode::PassThrough;
                out.put_slice(&block.original);
                return Ok(());
            }
            self.mode = Mode::Rewrite;
            tracing::debug!(
                "gRPC connection sends an invalid :authority; rewriting it to localhost"
            );
        }
        if fixed {
            self.rewritten += 1;
        }
        let encoded = self
            .encoder
            .encode(headers.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
        write_block(
            out,
            block.stream_id,
            block.end_stream,
            block.priority,
            &encoded,
        );
        Ok(())
    }
}

/// The priority fields and the header block fragment of a HEADERS payload (RFC 9113 §6.2).
fn headers_payload(flags: u8, payload: &[u8]) -> Result<(Option<[u8; 5]>, &[u8]), RewriteError> {
    let mut p = payload;
    let mut pad = 0usize;
    if flags & FLAG_PADDED != 0 {
        let (&n, rest) = p.split_first().ok_or(RewriteError::FrameSize)?;
        pad = usize::from(n);
        p = rest;
    }
    let mut priority = None;
    if flags & FLAG_PRIORITY != 0 {
        if p.len() < 5 {
            return Err(RewriteError::FrameSize);
        }
        let mut prio = [0u8; 5];
        prio.copy_from_slice(&p[..5]);
        priority = Some(prio);
        p = &p[5..];
    }
    if pad > p.len() {
        return Err(RewriteError::FrameSize);
    }
    Ok((priority, &p[..p.len() - pad]))
}

/// Writes a header block as one HEADERS frame and as many CONTINUATION frames as
/// [`MAX_FRAME`] needs.
fn write_block(
    out: &mut BytesMut,
    stream_id: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
    block: &[u8],
) {
    let first_room = MAX_FRAME - if priority.is_some() { 5 } else { 0 };
    let (first, mut rest) = block.split_at(block.len().min(first_room));
    let mut flags = 0;
    if end_stream {
        flags |= FLAG_END_STREAM;
    }
    if priority.is_some() {
        flags |= FLAG_PRIORITY;
    }
    if rest.is_empty() {
        flags |= FLAG_END_HEADERS;
    }
    let prio_len = priority.map_or(0, |_| 5);
    frame_header(out, first.len() + prio_len, FRAME_HEADERS, flags, stream_id);
    if let Some(p) = priority {
        out.put_slice(&p);
    }
    out.put_slice(first);
    while !rest.is_empty() {
        let (chunk, more) = rest.split_at(rest.len().min(MAX_FRAME));
        let flags = if more.is_empty() { FLAG_END_HEADERS } else { 0 };
        frame_header(out, chunk.len(), FRAME_CONTINUATION, flags, stream_id);
        out.put_slice(chunk);
        rest = more;
    }
}

fn frame_header(out: &mut BytesMut, len: usize, kind: u8, flags: u8, stream_id: u32) {
    out.put_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
    out.put_u32(stream_id & 0x7fff_ffff);
}

/// A connection whose incoming header blocks go through a [`Rewriter`]. Writes pass straight
/// through.
pub struct FixAuthority<S> {
    inner: S,
    rewriter: Rewriter,
    /// Read from the connection, not yet consumed by the rewriter.
    raw: BytesMut,
    /// Rewritten, not yet handed to h2.
    ready: BytesMut,
    eof: bool,
    /// Set once the client's preface and first SETTINGS frame are in.
    handshaken: Arc<AtomicBool>,
}

impl<S> FixAuthority<S> {
    /// Wraps an accepted connection.
    pub fn new(inner: S) -> FixAuthority<S> {
        FixAuthority {
            inner,
            rewriter: Rewriter::new(),
            raw: BytesMut::new(),
            ready: BytesMut::new(),
            eof: false,
            handshaken: Arc::new(AtomicBool::new(false)),
        }
    }

    /// A flag set once the client has sent the HTTP/2 preface and a whole SETTINGS frame
    /// (for the handshake deadline, read while h2 owns the connection).
    pub fn handshaken(&self) -> Arc<AtomicBool> {
        self.handshaken.clone()
    }

    /// The wrapped connection.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FixAuthority<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.ready.is_empty() {
                let n = this.ready.len().min(buf.remaining());
                buf.put_slice(&this.ready[..n]);
                this.ready.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            if this.rewriter.is_pass_through() && this.raw.is_empty() {
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            let mut chunk = [0u8; 8192];
            let mut rb = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
            if rb.filled().is_empty() {
                // A partial frame left at EOF goes to h2 as it is: it reports the truncation.
                this.eof = true;
                let rest = this.raw.split();
                this.ready.put(rest);
                continue;
            }
            this.raw.extend_from_slice(rb.filled());
            this.rewriter.feed(&mut this.raw, &mut this.ready)?;
            if this.rewriter.handshake_done() {
                this.handshaken.store(true, Ordering::Release);
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FixAuthority<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for FixAuthority<tokio::net::UnixStream> {
    type ConnectInfo = tonic::transport::server::UdsConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Headers = Vec<(Vec<u8>, Vec<u8>)>;
    /// A frame: (type, flags, stream, payload).
    type Frame = (u8, u8, u32, Vec<u8>);

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        frame_header(&mut out, payload.len(), kind, flags, stream);
        out.put_slice(payload);
        out.to_vec()
    }

    /// The request headers grpcio (Python) sends for a `unix:` target, in its order.
    fn grpcio_request(path: &str) -> Headers {
        [
            (":scheme", "http"),
            (":method", "POST"),
            (":authority", "%2Ftmp%2Ftokenwarden%2Ftokenwarden.sock"),
            (":path", path),
            ("te", "trailers"),
            ("content-type", "application/grpc"),
            (
                "user-agent",
                "grpc-python/1.68.0 grpc-c/44.0.0 (linux; chttp2)",
            ),
            ("grpc-accept-encoding", "identity, deflate, gzip"),
            ("grpc-timeout", "29999m"),
        ]
        .iter()
        .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect()
    }

    fn encode(enc: &mut loona_hpack::Encoder<'static>, h: &Headers) -> Vec<u8> {
        enc.encode(h.iter().map(|(n, v)| (n.as_slice(), v.as_slice())))
    }

    /// Splits a byte stream into frames.
    fn frames(b: &[u8]) -> Vec<Frame> {
        let (v, rest) = frames_prefix(b);
        assert!(rest.is_empty(), "trailing bytes");
        v
    }

    /// Feeds `input` in pieces of `step` bytes, as reads would deliver it.
    fn run(input: &[u8], step: usize) -> (Vec<u8>, Rewriter) {
        let mut r = Rewriter::new();
        let mut raw = BytesMut::new();
        let mut out = BytesMut::new();
        for chunk in input.chunks(step) {
            raw.extend_from_slice(chunk);
            r.feed(&mut raw, &mut out).unwrap();
        }
        assert!(raw.is_empty(), "{} bytes left unconsumed", raw.len());
        (out.to_vec(), r)
    }

    fn with_authority(h: &Headers, value: &str) -> Headers {
        h.iter()
            .map(|(n, v)| {
                if n == b":authority" {
                    (n.clone(), value.as_bytes().to_vec())
                } else {
                    (n.clone(), v.clone())
                }
            })
            .collect()
    }

    #[test]
    fn authority_validity() {
        assert!(valid_authority(b"localhost"));
        assert!(valid_authority(b"127.0.0.1:50051"));
        assert!(valid_authority(b"tonic"));
        assert!(!valid_authority(b"%2Ftmp%2Fx.sock"));
        assert!(!valid_authority(b"/tmp/x.sock"));
        assert!(!valid_authority(b""));
    }

    #[test]
    fn grpcio_blocks_are_rewritten_consistently_across_split_reads() {
        let mut client = loona_hpack::Encoder::new();
        let req1 = grpcio_request("/tokenwarden.v1.TokenService/GetToken");
        let req2 = grpcio_request("/tokenwarden.v1.TokenService/WatchToken");
        let b1 = encode(&mut client, &req1);
        // The second block leans on the dynamic table the first one filled.
        let b2 = encode(&mut client, &req2);
        assert!(b2.len() < b1.len(), "the second block should use indexes");
        let settings = frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100]);
        let data = frame(
            0x0,
            FLAG_END_STREAM,
            1,
            &[
                0, 0, 0, 0, 11, 10, 9, b't', b'r', b'a', b'n', b's', b'a', b't', b'e', b'l',
            ],
        );
        let mut input = PREFACE.to_vec();
        input.extend(&settings);
        input.extend(frame(FRAME_HEADERS, FLAG_END_HEADERS, 1, &b1));
        input.extend(&data);
        input.extend(frame(
            FRAME_HEADERS,
            FLAG_END_HEADERS | FLAG_END_STREAM,
            3,
            &b2,
        ));
        for step in [1, 2, 7, 9, 10, 64, input.len()] {
            let (out, r) = run(&input, step);
            assert_eq!(r.rewritten, 2, "step {step}");
            assert_eq!(&out[..PREFACE.len()], PREFACE);
            let f = frames(&out[PREFACE.len()..]);
            assert_eq!(f.len(), 4, "step {step}");
            assert_eq!((f[0].0, f[0].3.as_slice()), (0x4, &settings[9..]));
            assert_eq!(
                (f[2].0, f[2].1, f[2].3.as_slice()),
                (0x0, FLAG_END_STREAM, &data[9..])
            );
            // What h2 decodes, with its own decoder.
            let mut h2 = loona_hpack::Decoder::new();
            assert_eq!(
                (f[1].0, f[1].1, f[1].2),
                (FRAME_HEADERS, FLAG_END_HEADERS, 1)
            );
            assert_eq!(
                h2.decode(&f[1].3).unwrap(),
                with_authority(&req1, "localhost")
            );
            assert_eq!(
                (f[3].0, f[3].1, f[3].2),
                (FRAME_HEADERS, FLAG_END_HEADERS | FLAG_END_STREAM, 3)
            );
            assert_eq!(
                h2.decode(&f[3].3).unwrap(),
                with_authority(&req2, "localhost")
            );
        }
    }

    #[test]
    fn padding_priority_and_continuation_frames() {
        let mut client = loona_hpack::Encoder::new();
        let req = grpcio_request("/tokenwarden.v1.TokenService/ListClients");
        let block = encode(&mut client, &req);
        let (a, b) = block.split_at(block.len() / 2);
        let mut payload = vec![3u8]; // pad length
        let prio = [0x80, 0, 0, 0, 15];
        payload.extend(prio);
        payload.extend(a);
        payload.extend([0, 0, 0]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(
            FRAME_HEADERS,
            FLAG_PADDED | FLAG_PRIORITY | FLAG_END_STREAM,
            5,
            &payload,
        ));
        input.extend(frame(FRAME_CONTINUATION, FLAG_END_HEADERS, 5, b));
        let (out, r) = run(&input, 5);
        assert_eq!(r.rewritten, 1);
        let f = frames(&out[PREFACE.len()..]);
        assert_eq!(f.len(), 1);
        let (kind, flags, stream, p) = &f[0];
        assert_eq!((*kind, *stream), (FRAME_HEADERS, 5));
        assert_eq!(*flags, FLAG_PRIORITY | FLAG_END_STREAM | FLAG_END_HEADERS);
        assert_eq!(&p[..5], &prio);
        let mut h2 = loona_hpack::Decoder::new();
        assert_eq!(
            h2.decode(&p[5..]).unwrap(),
            with_authority(&req, "localhost")
        );
    }

    #[test]
    fn large_blocks_are_gathered_and_long_ones_split_into_continuations() {
        let mut client = loona_hpack::Encoder::new();
        let mut req = grpcio_request("/tokenwarden.v1.TokenService/GetToken");
        req.push((b"x-big".to_vec(), vec![b'a'; 15_000]));
        let block = encode(&mut client, &req);
        let mut input = PREFACE.to_vec();
        let (a, rest) = block.split_at(8000);
        input.extend(frame(FRAME_HEADERS, 0, 1, a));
        input.extend(frame(FRAME_CONTINUATION, FLAG_END_HEADERS, 1, rest));
        let (out, _) = run(&input, 4096);
        let f = frames(&out[PREFACE.len()..]);
        assert_eq!(f.len(), 1);
        assert_eq!((f[0].0, f[0].1), (FRAME_HEADERS, FLAG_END_HEADERS));
        let mut h2 = loona_hpack::Decoder::new();
        assert_eq!(
            h2.decode(&f[0].3).unwrap(),
            with_authority(&req, "localhost")
        );
        // A re-encoded block over one frame goes out as HEADERS and CONTINUATIONs.
        let long: Vec<u8> = (0..40_000u32).map(|i| i as u8).collect();
        let mut out = BytesMut::new();
        write_block(&mut out, 3, true, Some([0, 0, 0, 1, 15]), &long);
        let f = frames(&out);
        assert_eq!(f.len(), 3);
        assert_eq!(
            (f[0].0, f[0].1),
            (FRAME_HEADERS, FLAG_END_STREAM | FLAG_PRIORITY)
        );
        assert_eq!((f[1].0, f[1].1), (FRAME_CONTINUATION, 0));
        assert_eq!((f[2].0, f[2].1), (FRAME_CONTINUATION, FLAG_END_HEADERS));
        assert!(f.iter().all(|x| x.3.len() <= MAX_FRAME));
        let joined: Vec<u8> = f.iter().flat_map(|x| x.3.clone()).skip(5).collect();
        assert_eq!(joined, long);
    }

    #[test]
    fn a_valid_authority_passes_through_untouched() {
        // RFC 7541 C.4.1 (Huffman-coded :authority www.example.com), then C.4.2.
        let c41 = [
            0x82, 0x86, 0x84, 0x41, 0x8c, 0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab,
            0x90, 0xf4, 0xff,
        ];
        let c42 = [
            0x82, 0x86, 0x84, 0xbe, 0x58, 0x86, 0xa8, 0xeb, 0x10, 0x64, 0x9c, 0xbf,
        ];
        let mut input = PREFACE.to_vec();
        input.extend(frame(
            FRAME_HEADERS,
            FLAG_END_HEADERS | FLAG_END_STREAM,
            1,
            &c41,
        ));
        input.extend(frame(
            FRAME_HEADERS,
            FLAG_END_HEADERS | FLAG_END_STREAM,
            3,
            &c42,
        ));
        input.extend(frame(0x0, 0, 3, b"abc"));
        for step in [1, 3, input.len()] {
            let (out, r) = run(&input, step);
            assert_eq!(out, input);
            assert_eq!(r.rewritten, 0);
            assert!(r.is_pass_through());
        }
        // Not HTTP/2 at all: untouched, for h2 to refuse.
        let junk = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(run(junk, 4).0, junk.to_vec());
    }

    #[test]
    fn malformed_input_is_refused() {
        // What a new rewriter makes of the preface and `frames`.
        let fed = |frames: &[Vec<u8>]| {
            let mut input = BytesMut::from(PREFACE);
            frames.iter().for_each(|f| input.extend(f));
            Rewriter::new().feed(&mut input, &mut BytesMut::new())
        };
        // A HEADERS block interrupted by a DATA frame.
        let interrupted = [frame(FRAME_HEADERS, 0, 1, &[0x82]), frame(0x0, 0, 1, b"x")];
        assert_eq!(fed(&interrupted), Err(RewriteError::Interrupted));
        // Invalid HPACK (an index past both tables).
        let past = frame(FRAME_HEADERS, FLAG_END_HEADERS, 1, &[0xff, 0x7f]);
        assert!(matches!(fed(&[past]), Err(RewriteError::Hpack(_))));
        // A header frame over the frame size.
        let over = frame(FRAME_HEADERS, 0, 1, &vec![0; MAX_FRAME + 1]);
        assert_eq!(fed(&[over]), Err(RewriteError::FrameSize));
        // Padding longer than the frame.
        let padded = frame(FRAME_HEADERS, FLAG_PADDED | FLAG_END_HEADERS, 1, &[9, 0x82]);
        assert_eq!(fed(&[padded]), Err(RewriteError::FrameSize));
    }

    /// A header block naming one 4 KB dynamic-table entry a thousand times: 5 KB on the wire,
    /// 4 MB decoded. Refused at the bound, whatever the first `:authority` was.
    pub(crate) fn table_bomb(refs: usize, authority: &str) -> Vec<u8> {
        let mut block = Vec::new();
        // :authority as a literal without indexing, its name from the static table (index 1).
        block.push(0x01);
        block.push(authority.len() as u8);
        block.extend(authority.as_bytes());
        // x-bomb: 4000 x 'a', a literal with incremental indexing (new name): dynamic index 62.
        block.push(0x40);
        block.push(6);
        block.extend(b"x-bomb");
        block.extend([0x7f, 0xa1, 0x1e]); // 4000 = 127 + 3873
        block.extend(std::iter::repeat_n(b'a', 4000));
        block.extend(std::iter::repeat_n(0xbe, refs));
        let mut input = PREFACE.to_vec();
        input.extend(frame(FRAME_SETTINGS, 0, 0, &[]));
        let mut chunks = block.chunks(1024).peekable();
        let mut first = true;
        while let Some(c) = chunks.next() {
            let flags = if chunks.peek().is_none() {
                FLAG_END_HEADERS
            } else {
                0
            };
            let kind = if first {
                FRAME_HEADERS
            } else {
                FRAME_CONTINUATION
            };
            input.extend(frame(kind, flags, 1, c));
            first = false;
        }
        input
    }

    #[test]
    fn a_block_over_the_decoded_bound_is_refused() {
        for authority in ["%2Ftmp%2Fx.sock", "localhost"] {
            let mut r = Rewriter::new();
            let mut out = BytesMut::new();
            let mut input = BytesMut::from(&table_bomb(1000, authority)[..]);
            assert_eq!(
                r.feed(&mut input, &mut out),
                Err(RewriteError::HeaderListTooLarge),
                "{authority}"
            );
        }
        // Just under the bound: accepted and rewritten.
        let mut r = Rewriter::new();
        let mut out = BytesMut::new();
        let mut input = BytesMut::from(&table_bomb(2, "%2Ftmp%2Fx.sock")[..]);
        r.feed(&mut input, &mut out).unwrap();
        assert_eq!(r.rewritten, 1);
    }

    #[test]
    fn the_handshake_is_done_after_preface_and_a_whole_settings_frame() {
        let mut input = PREFACE.to_vec();
        input.extend(frame(FRAME_SETTINGS, 0, 0, &[0, 3, 0, 0, 0, 100]));
        for step in [1, 5, input.len()] {
            let mut r = Rewriter::new();
            let mut raw = BytesMut::new();
            let mut out = BytesMut::new();
            let mut fed = 0;
            for chunk in input.chunks(step) {
                assert!(
                    !r.handshake_done(),
                    "done after {fed} of {} bytes",
                    input.len()
                );
                raw.extend_from_slice(chunk);
                r.feed(&mut raw, &mut out).unwrap();
                fed += chunk.len();
            }
            assert!(r.handshake_done(), "step {step}");
        }
        // The preface alone, or the preface and half a SETTINGS frame: not done.
        let mut r = Rewriter::new();
        let mut raw = BytesMut::from(&input[..input.len() - 3]);
        r.feed(&mut raw, &mut BytesMut::new()).unwrap();
        assert!(!r.handshake_done());
    }

    /// Serves one h2 connection over `io`, returning the authority and path of each request.
    async fn h2_server<T>(io: T, requests: usize) -> Vec<(String, String)>
    where
        T: AsyncRead + AsyncWrite + Unpin,
    {
        let mut conn = h2::server::handshake(io).await.unwrap();
        let mut seen = Vec::new();
        while seen.len() < requests {
            let Some(r) = conn.accept().await else { break };
            let (req, mut respond) = r.unwrap();
            seen.push((
                req.uri()
                    .authority()
                    .map(|a| a.to_string())
                    .unwrap_or_default(),
                req.uri().path().to_string(),
            ));
            let resp = http::Response::builder().status(200).body(()).unwrap();
            respond.send_response(resp, true).unwrap();
        }
        seen
    }

    fn grpcio_connection() -> Vec<u8> {
        let mut client = loona_hpack::Encoder::new();
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[]));
        for (stream, method) in [(1, "GetToken"), (3, "RefreshToken")] {
            let req = grpcio_request(&format!("/tokenwarden.v1.TokenService/{method}"));
            let block = encode(&mut client, &req);
            input.extend(frame(
                FRAME_HEADERS,
                FLAG_END_HEADERS | FLAG_END_STREAM,
                stream,
                &block,
            ));
        }
        input
    }

    #[tokio::test]
    async fn h2_accepts_a_grpcio_connection_through_the_adaptor() {
        use tokio::io::AsyncWriteExt;
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let serve = tokio::spawn(h2_server(FixAuthority::new(server), 2));
        client.write_all(&grpcio_connection()).await.unwrap();
        let seen = tokio::time::timeout(std::time::Duration::from_secs(5), serve)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            seen,
            vec![
                (
                    "localhost".into(),
                    "/tokenwarden.v1.TokenService/GetToken".into()
                ),
                (
                    "localhost".into(),
                    "/tokenwarden.v1.TokenService/RefreshToken".into()
                ),
            ]
        );
    }

    #[tokio::test]
    async fn without_the_adaptor_h2_refuses_the_same_bytes() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let serve = tokio::spawn(h2_server(server, 1));
        client.write_all(&grpcio_connection()).await.unwrap();
        // The server answers with RST_STREAM (type 3) on stream 1 and never sees a request.
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut buf = [0u8; 4096];
        loop {
            let (f, _) = frames_prefix(&got);
            if f.iter()
                .any(|(kind, _, stream, _)| *kind == 3 && *stream == 1)
            {
                break;
            }
            let n = tokio::time::timeout_at(deadline, client.read(&mut buf))
                .await
                .expect("no RST_STREAM from h2")
                .unwrap();
            assert!(n > 0, "connection closed without RST_STREAM");
            got.extend_from_slice(&buf[..n]);
        }
        serve.abort();
    }

    /// The complete frames at the start of `b`, and the bytes after them.
    fn frames_prefix(mut b: &[u8]) -> (Vec<Frame>, &[u8]) {
        let mut v = Vec::new();
        while b.len() >= 9 {
            let len = (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]);
            if b.len() < 9 + len {
                break;
            }
            let stream = u32::from_be_bytes([b[5], b[6], b[7], b[8]]);
            v.push((b[3], b[4], stream, b[9..9 + len].to_vec()));
            b = &b[9 + len..];
        }
        (v, b)
    }
}
