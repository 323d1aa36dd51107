//! Small vectored writes sent as one buffer.
//!
//! hyper writes an answer's head and its (small) body as two buffers, which
//! a plain socket turns into `writev`. Copied into one buffer they go out
//! with a single `send`, which costs the kernel less. The copy is of at most
//! [`MAX`] bytes, into one buffer per thread; larger writes keep the vectored
//! path, and nothing is kept per connection. (hyper's own `writev(false)`
//! flattens too, but into a per-connection buffer that keeps the capacity of the
//! largest body it ever carried: fine for the bounded backend pool, not for
//! thousands of device connections.) Used under hyper on plain device
//! connections ([`crate::server::conn_io::ConnIo`]); TLS joins the
//! buffers into one record by itself.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::AsyncWrite;

/// Vectored writes of at most this many bytes in all are coalesced.
pub const MAX: usize = 4096;

/// Writes `bufs` to `io`: several small buffers as one, others as given.
pub fn poll_write<W: AsyncWrite + ?Sized>(
    mut io: Pin<&mut W>,
    cx: &mut Context<'_>,
    bufs: &[IoSlice<'_>],
) -> Poll<io::Result<usize>> {
    let total: usize = bufs.iter().map(|b| b.len()).sum();
    if bufs.len() < 2 || total > MAX {
        return io.poll_write_vectored(cx, bufs);
    }
    // A buffer kept per thread, not a fresh stack array: zeroing 4 KiB for
    // every answer cost more than the copy itself. (Were it ever in use on
    // this thread already, the buffers go as given.)
    let coalesced = ONE.try_with(|one| {
        let mut one = one.try_borrow_mut().ok()?;
        one.clear();
        for b in bufs {
            one.extend_from_slice(b);
        }
        Some(io.as_mut().poll_write(cx, &one))
    });
    match coalesced {
        Ok(Some(written)) => written,
        _ => io.poll_write_vectored(cx, bufs),
    }
}

thread_local! {
    static ONE: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(Vec::with_capacity(MAX));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records each write call it gets.
    #[derive(Default)]
    struct Calls(Vec<Vec<u8>>);

    impl AsyncWrite for Calls {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.0.push(buf.to_vec());
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            // The first buffer only, as a short vectored write may.
            let first = bufs.first().map_or(&[][..], |b| &b[..]);
            self.0.push(first.to_vec());
            Poll::Ready(Ok(first.len()))
        }
        fn is_write_vectored(&self) -> bool {
            true
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn write(io: &mut Calls, bufs: &[IoSlice<'_>]) -> usize {
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        match poll_write(Pin::new(io), &mut cx, bufs) {
            Poll::Ready(Ok(n)) => n,
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn small_buffers_go_as_one_write_large_ones_as_given() {
        let mut io = Calls::default();
        let n = write(
            &mut io,
            &[
                IoSlice::new(b"HTTP/1.1 200 OK\r\n\r\n"),
                IoSlice::new(b"{}"),
            ],
        );
        assert_eq!(n, 21);
        assert_eq!(io.0, vec![b"HTTP/1.1 200 OK\r\n\r\n{}".to_vec()]);

        let big = vec![7u8; MAX];
        let n = write(&mut io, &[IoSlice::new(b"head"), IoSlice::new(&big)]);
        // Passed through: the inner writer took the first buffer only.
        assert_eq!(n, 4);
        assert_eq!(io.0.len(), 2);
    }
}
