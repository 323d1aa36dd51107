//! Request and response bodies for tests: a deterministic byte pattern of
//! any length (streamed, never held whole), a body that stalls, and a chunked
//! body.

use super::hex;
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use sha2::{Digest, Sha256};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

const PATTERN_CHUNK: usize = 251 * 261; // a multiple of 251, about 64 KiB

fn pattern_chunk() -> Bytes {
    static CHUNK: std::sync::OnceLock<Bytes> = std::sync::OnceLock::new();
    CHUNK
        .get_or_init(|| {
            Bytes::from(
                (0..PATTERN_CHUNK)
                    .map(|i| (i % 251) as u8)
                    .collect::<Vec<u8>>(),
            )
        })
        .clone()
}

/// The byte at offset `i` of a pattern body.
pub fn pattern_byte(i: u64) -> u8 {
    (i % 251) as u8
}

/// A body of `len` pattern bytes with an exact size (so it goes out with a
/// Content-Length), produced chunk by chunk without holding it in memory.
pub struct PatternBody {
    remaining: u64,
}

impl PatternBody {
    pub fn new(len: u64) -> PatternBody {
        PatternBody { remaining: len }
    }
}

impl HttpBody for PatternBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let n = (PATTERN_CHUNK as u64).min(self.remaining) as usize;
        self.remaining -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(pattern_chunk().slice(..n)))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

/// Yields `first`, then stays pending forever.
pub struct StallingBody {
    pub first: Option<Bytes>,
}

impl HttpBody for StallingBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.first.take() {
            Some(b) => Poll::Ready(Some(Ok(Frame::data(b)))),
            None => Poll::Pending,
        }
    }
}

/// Length and SHA-256 of a pattern body of `len` bytes.
pub fn pattern_digest(len: u64) -> (u64, String) {
    let mut h = Sha256::new();
    let chunk = pattern_chunk();
    let mut left = len;
    while left > 0 {
        let n = (chunk.len() as u64).min(left) as usize;
        h.update(&chunk[..n]);
        left -= n as u64;
    }
    (len, hex(&h.finalize()))
}

/// A body sent chunked (no known length), one frame per chunk.
pub struct ChunkedBody {
    chunks: VecDeque<Bytes>,
}

impl ChunkedBody {
    pub fn new(chunks: Vec<Bytes>) -> ChunkedBody {
        ChunkedBody {
            chunks: chunks.into(),
        }
    }

    /// `total` bytes of `fill` in chunks of `chunk` bytes.
    pub fn sized(total: usize, chunk: usize) -> (ChunkedBody, Vec<u8>) {
        let all: Vec<u8> = (0..total).map(|i| (i * 7 % 256) as u8).collect();
        let chunks = all
            .chunks(chunk.max(1))
            .map(Bytes::copy_from_slice)
            .collect();
        (ChunkedBody::new(chunks), all)
    }
}

impl HttpBody for ChunkedBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.chunks.pop_front().map(|c| Ok(Frame::data(c))))
    }

    fn is_end_stream(&self) -> bool {
        false
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}
