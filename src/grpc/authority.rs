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
//! The decision is taken on the connection's first header block: a client whose first
//! `:authority` is valid (tonic, grpc-go, curl) gets a plain pass-through for the whole
//! connection, with no per-request cost. A client's authority is fixed per channel, so a later
//! block cannot need the rewrite when the first did not.

use std::io;
use std::pin::Pin;
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
/// Largest header block accepted: far above any gRPC request's headers.
pub const MAX_BLOCK: usize = 64 * 1024;
/// The HPACK dynamic table size h2 advertises (the default; RFC 7541 §4.2).
pub const TABLE_SIZE: usize = 4096;

const FRAME_HEADERS: u8 = 0x1;
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
    /// Bytes of the current non-header frame still to pass through.
    passing: usize,
    block: Option<Block>,
    decoder: loona_hpack::Decoder<'static>,
    encoder: loona_hpack::Encoder<'static>,
    /// Header blocks whose `:authority` was rewritten (for tests and logs).
    pub rewritten: u64,
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
        let mut headers = self
            .decoder
            .decode(&block.fragment)
            .map_err(|e| RewriteError::Hpack(format!("{e:?}")))?;
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
        }
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
