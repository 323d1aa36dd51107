//! Read-ahead of large backend answers (what nginx calls `proxy_buffering`).
//!
//! A backend answer is streamed to the device, and its pooled backend
//! connection is only free again once the answer's last byte was read. A
//! device that reads slowly (a phone on a poor network) would hold that
//! connection for as long as it takes. For answers that are not small, a
//! task of its own reads the backend body ahead of the device, up to
//! `limits.response_buffer` bytes for one answer and
//! `limits.response_buffer_total` for all of them together: an answer that
//! fits is read whole at the backend's pace, so its connection goes back to
//! the pool while the device is still reading. Past either bound the task
//! waits for the device, which is plain streaming again, never unbounded memory.

use crate::body::{Body, BoxError};
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

/// Answers whose length is known and at most this are not read ahead: they
/// arrive with their head, and a task would only cost time.
const SMALL: u64 = 64 << 10;

/// The read-ahead memory of one configuration: a byte budget shared by all
/// answers, and the most one answer may take of it.
#[derive(Debug)]
pub struct ReadAhead {
    total: Arc<Semaphore>,
    total_bytes: usize,
    per_response: usize,
}

impl ReadAhead {
    /// `None` when `per_response` is 0 (read-ahead off).
    pub fn new(per_response: u64, total: u64) -> Option<ReadAhead> {
        if per_response == 0 || total == 0 {
            return None;
        }
        // Semaphores count in u32 units at most per acquire and usize overall.
        let clamp = |n: u64| {
            usize::try_from(n)
                .unwrap_or(usize::MAX)
                .min(Semaphore::MAX_PERMITS)
        };
        let total_bytes = clamp(total);
        Some(ReadAhead {
            total: Arc::new(Semaphore::new(total_bytes)),
            total_bytes,
            per_response: clamp(per_response).min(total_bytes),
        })
    }

    /// Bytes currently read ahead and not yet taken by devices.
    pub fn buffered(&self) -> usize {
        self.total_bytes - self.total.available_permits()
    }

    /// `body` as the device should get it: read ahead by a task when it may
    /// be large, unchanged when it is small or already complete.
    pub fn wrap(&self, body: Body) -> Body {
        if body.is_end_stream() || body.size_hint().exact().is_some_and(|n| n <= SMALL) {
            return body;
        }
        let hint = body.size_hint();
        let (tx, rx) = mpsc::unbounded_channel();
        let own = Arc::new(Semaphore::new(self.per_response));
        tokio::spawn(pump(
            body,
            tx,
            own,
            Arc::clone(&self.total),
            self.per_response,
        ));
        Body::boxed(Buffered {
            rx,
            hint,
            done: false,
        })
    }
}

/// What the reading task hands the device side.
enum Item {
    /// A frame, with the budget it holds until the device takes it.
    Frame(Frame<Bytes>, [OwnedSemaphorePermit; 2]),
    /// The backend body failed.
    Failed(BoxError),
    /// The backend body ended.
    End,
}

/// Reads `body` into the channel as fast as the budgets allow, until its
/// end, an error, or the device side going away (then the backend body is
/// dropped, which closes its connection if unfinished).
async fn pump(
    mut body: Body,
    tx: mpsc::UnboundedSender<Item>,
    own: Arc<Semaphore>,
    total: Arc<Semaphore>,
    per_response: usize,
) {
    loop {
        let frame = tokio::select! {
            frame = body.frame() => frame,
            () = tx.closed() => return,
        };
        let frame = match frame {
            None => {
                let _ = tx.send(Item::End);
                return;
            }
            Some(Err(e)) => {
                let _ = tx.send(Item::Failed(e));
                return;
            }
            Some(Ok(frame)) => frame,
        };
        // At least one unit, so trailers and empty frames are counted too.
        let len = frame
            .data_ref()
            .map_or(0, Bytes::len)
            .clamp(1, per_response);
        let units = u32::try_from(len).unwrap_or(u32::MAX);
        let permits = tokio::select! {
            permits = acquire(&own, &total, units) => permits,
            () = tx.closed() => return,
        };
        let Some(permits) = permits else { return };
        if tx.send(Item::Frame(frame, permits)).is_err() {
            return;
        }
    }
}

/// `units` of this answer's budget, then of the shared one.
async fn acquire(
    own: &Arc<Semaphore>,
    total: &Arc<Semaphore>,
    units: u32,
) -> Option<[OwnedSemaphorePermit; 2]> {
    let mine = Arc::clone(own).acquire_many_owned(units).await.ok()?;
    let shared = Arc::clone(total).acquire_many_owned(units).await.ok()?;
    Some([mine, shared])
}

/// The device side of a read-ahead answer.
struct Buffered {
    rx: mpsc::UnboundedReceiver<Item>,
    hint: SizeHint,
    done: bool,
}

impl HttpBody for Buffered {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.done {
            return Poll::Ready(None);
        }
        let item = std::task::ready!(self.rx.poll_recv(cx));
        Poll::Ready(match item {
            // The budget is released as the frame goes to hyper's write buffer.
            Some(Item::Frame(frame, _permits)) => Some(Ok(frame)),
            Some(Item::End) => {
                self.done = true;
                None
            }
            Some(Item::Failed(e)) => {
                self.done = true;
                Some(Err(e))
            }
            // The task ended without saying so (runtime shutting down): the
            // answer is incomplete, never to be passed off as whole.
            None => {
                self.done = true;
                Some(Err("backend answer cut short".into()))
            }
        })
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        self.hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// `left` chunks of `size` bytes, counting how many were read.
    struct Chunks {
        left: usize,
        size: usize,
        read: Arc<AtomicUsize>,
    }

    impl HttpBody for Chunks {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            if self.left == 0 {
                return Poll::Ready(None);
            }
            self.left -= 1;
            self.read.fetch_add(1, Ordering::SeqCst);
            Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![7u8; self.size])))))
        }
    }

    fn chunks(left: usize, size: usize) -> (Body, Arc<AtomicUsize>) {
        let read = Arc::new(AtomicUsize::new(0));
        let body = Chunks {
            left,
            size,
            read: Arc::clone(&read),
        };
        (Body::boxed(body), read)
    }

    async fn settle() {
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn an_answer_within_the_budget_is_read_whole_ahead_of_the_device() {
        let ra = ReadAhead::new(1 << 20, 4 << 20).unwrap();
        let (body, read) = chunks(16, 32 << 10);
        let body = ra.wrap(body);
        settle().await;
        // Nothing consumed by the device yet, everything read from the backend.
        assert_eq!(read.load(Ordering::SeqCst), 16);
        assert_eq!(ra.buffered(), 16 * (32 << 10));
        let got = body.collect().await.unwrap().to_bytes();
        assert_eq!(got.len(), 16 * (32 << 10));
        assert_eq!(ra.buffered(), 0, "the budget is given back");
    }

    #[tokio::test]
    async fn past_its_own_bound_an_answer_waits_for_the_device() {
        let ra = ReadAhead::new(128 << 10, 4 << 20).unwrap();
        let (body, read) = chunks(64, 32 << 10);
        let mut body = ra.wrap(body);
        settle().await;
        // Four chunks fit in 128 KiB; the fifth waits for room.
        assert_eq!(read.load(Ordering::SeqCst), 5);
        assert_eq!(ra.buffered(), 128 << 10);
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.data_ref().map(Bytes::len), Some(32 << 10));
        settle().await;
        assert_eq!(read.load(Ordering::SeqCst), 6);
        let rest = body.collect().await.unwrap().to_bytes();
        assert_eq!(rest.len(), 63 * (32 << 10));
    }

    #[tokio::test]
    async fn answers_share_the_total_budget() {
        let ra = ReadAhead::new(128 << 10, 192 << 10).unwrap();
        let (a, read_a) = chunks(64, 32 << 10);
        let (b, read_b) = chunks(64, 32 << 10);
        let (_a, _b) = (ra.wrap(a), ra.wrap(b));
        settle().await;
        // 6 chunks fit the shared 192 KiB, each answer at most 4 of them.
        assert_eq!(ra.buffered(), 192 << 10);
        let (ra_n, rb_n) = (read_a.load(Ordering::SeqCst), read_b.load(Ordering::SeqCst));
        assert!(ra_n <= 5 && rb_n <= 5, "{ra_n} {rb_n}");
    }

    #[tokio::test]
    async fn a_device_that_goes_away_stops_the_reading() {
        let ra = ReadAhead::new(64 << 10, 1 << 20).unwrap();
        let (body, read) = chunks(1000, 32 << 10);
        let body = ra.wrap(body);
        settle().await;
        let before = read.load(Ordering::SeqCst);
        drop(body);
        settle().await;
        assert_eq!(read.load(Ordering::SeqCst), before);
        assert_eq!(ra.buffered(), 0);
    }

    #[tokio::test]
    async fn small_or_finished_answers_are_left_alone() {
        let ra = ReadAhead::new(1 << 20, 4 << 20).unwrap();
        assert!(matches!(ra.wrap(Body::full("small")), Body::Full(_)));
        assert!(matches!(ra.wrap(Body::Empty), Body::Empty));
        assert!(ReadAhead::new(0, 1 << 20).is_none());
    }
}
