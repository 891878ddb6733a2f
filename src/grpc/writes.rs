//! One write per flush: what `h2` writes between two flushes leaves in one system call.
//!
//! `h2` encodes frames into its own write buffer, except a DATA payload at or above its chain
//! threshold, which it keeps aside and writes after the buffer; it must then write both out
//! before it can encode the next frame. The threshold is 256 bytes when the connection takes
//! vectored writes and 1 KiB when it does not (h2 0.4's `framed_write.rs`). A `GetToken`
//! answer is HEADERS, a DATA frame holding the token (about 1 KiB) and the trailers: over a
//! Unix socket, which takes vectored writes, that was two `writev` calls per answer, the
//! trailers alone in the second, each waking the caller.
//!
//! [`WriteBatch`] tells h2 the connection takes no vectored writes, so h2 copies payloads
//! under 1 KiB into its buffer (the fast path hands it the answer in pieces below that,
//! [`super::fast::DATA_PIECE`]), and gathers the writes h2 makes until it flushes — a payload
//! h2 keeps aside comes as a second write without vectored writes — so that they leave in one
//! call. Only where the bytes go changes: every byte is h2's, in h2's order, written before
//! the flush that h2 asked for returns.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Most bytes gathered before they are written without waiting for the flush; a write this
/// large goes straight through. Above h2's write buffer plus one largest DATA payload (16 KiB
/// each by default), so h2's writes between two flushes fit.
pub const CAPACITY: usize = 64 * 1024;
/// Gathering space kept between flushes; more is released after a flush.
const KEEP: usize = 16 * 1024;

/// A connection whose writes are gathered until `poll_flush`; reads pass through.
pub struct WriteBatch<S> {
    inner: S,
    buf: Vec<u8>,
    /// Bytes of `buf` already written (a partial write during a flush).
    written: usize,
}

impl<S> WriteBatch<S> {
    /// Wraps a connection.
    pub fn new(inner: S) -> WriteBatch<S> {
        WriteBatch {
            inner,
            buf: Vec::new(),
            written: 0,
        }
    }

    /// The wrapped connection.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncWrite + Unpin> WriteBatch<S> {
    /// Writes out everything gathered.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.buf.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.buf[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.buf.clear();
        self.written = 0;
        if self.buf.capacity() > KEEP {
            self.buf.shrink_to(KEEP);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteBatch<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteBatch<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.buf.len() + data.len() > CAPACITY {
            ready!(this.poll_drain(cx))?;
        }
        if this.buf.is_empty() && data.len() >= CAPACITY {
            return Pin::new(&mut this.inner).poll_write(cx, data);
        }
        this.buf.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::sync::{Arc, Mutex};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    /// A stream that records the size of every write call.
    struct Counting {
        inner: DuplexStream,
        writes: Arc<Mutex<Vec<usize>>>,
    }

    impl AsyncRead for Counting {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Counting {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            let n = ready!(Pin::new(&mut this.inner).poll_write(cx, data))?;
            this.writes.lock().unwrap().push(n);
            Poll::Ready(Ok(n))
        }

        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().inner).poll_flush(cx)
        }

        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
        }
    }

    #[tokio::test]
    async fn writes_wait_for_the_flush_and_large_ones_go_through() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let writes = Arc::new(Mutex::new(Vec::new()));
        let mut w = WriteBatch::new(Counting {
            inner: a,
            writes: writes.clone(),
        });
        w.write_all(b"head").await.unwrap();
        w.write_all(&[7u8; 900]).await.unwrap();
        w.write_all(b"tail").await.unwrap();
        assert!(
            writes.lock().unwrap().is_empty(),
            "written before the flush"
        );
        w.flush().await.unwrap();
        assert_eq!(*writes.lock().unwrap(), vec![908]);
        w.write_all(&vec![1u8; CAPACITY]).await.unwrap();
        assert_eq!(*writes.lock().unwrap(), vec![908, CAPACITY]);
        w.write_all(b"x").await.unwrap();
        w.shutdown().await.unwrap();
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), 908 + CAPACITY + 1);
        assert_eq!(&got[..4], b"head");
        assert_eq!(got[got.len() - 1], b'x');
    }

    /// Serves `answers` unary answers of `answer` bytes, as the fast path sends them, over
    /// h2 on a [`WriteBatch`]; returns the size of each write after the handshake.
    async fn answer_writes(answer: usize, answers: usize) -> Vec<usize> {
        let (server_io, client_io) = tokio::io::duplex(1 << 20);
        let writes = Arc::new(Mutex::new(Vec::new()));
        let io = WriteBatch::new(Counting {
            inner: server_io,
            writes: writes.clone(),
        });
        let server = tokio::spawn(async move {
            let mut conn = h2::server::handshake(io).await.unwrap();
            while let Some(Ok((_req, mut respond))) = conn.accept().await {
                let (head, trailers) = crate::grpc::fast::answered_parts();
                let mut send = respond.send_response(head, false).unwrap();
                crate::grpc::fast::send_answer(&mut send, Bytes::from(vec![7u8; answer])).unwrap();
                send.send_trailers(trailers).unwrap();
            }
        });
        let (mut client, conn) = h2::client::handshake(client_io).await.unwrap();
        tokio::spawn(conn);
        let mut after_handshake = 0;
        for i in 0..answers {
            let req = http::Request::post("http://localhost/x").body(()).unwrap();
            let (resp, _) = client.send_request(req, true).unwrap();
            let mut body = resp.await.unwrap().into_body();
            let mut got = 0;
            while let Some(d) = body.data().await {
                let d = d.unwrap();
                got += d.len();
                body.flow_control().release_capacity(d.len()).unwrap();
            }
            assert_eq!(got, answer);
            assert!(body.trailers().await.unwrap().is_some());
            if i == 0 {
                after_handshake = writes.lock().unwrap().len();
            }
        }
        drop(client);
        server.abort();
        let w = writes.lock().unwrap();
        w[after_handshake..].to_vec()
    }

    #[tokio::test]
    async fn an_answer_leaves_in_one_write() {
        // A short token, the bench's, long ones (h2's write buffer holds 16 KiB).
        for size in [300, 880, 2500, 12_000] {
            let writes = answer_writes(size, 4).await;
            // Each answer in one write; some may also carry a WINDOW_UPDATE or SETTINGS ACK.
            assert!(writes.len() <= 3, "{size} B answers: writes {writes:?}");
            assert!(
                writes.iter().all(|&w| w > size),
                "{size} B answers: writes {writes:?}"
            );
        }
    }
}
