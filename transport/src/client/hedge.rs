//! Hedging: on a lossy path (or one not yet known to be clean) an
//! on-demand request is sent two or three times on separate streams, and
//! the first complete answer wins.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::{Duration, Instant};

use super::Inner;
use crate::error::TransportError;
use crate::path;
use crate::wire::Priority;

/// Time between two copies of a hedged request: enough for quinn to send
/// the first in a datagram of its own, so one lost datagram does not lose
/// every copy (a lost request is found only by quinn's probe timeout,
/// about 1.5 RTT later).
const HEDGE_SPACING: Duration = Duration::from_millis(1);

/// One of the racing copies of a hedged request.
type Racer<'a, T> = Pin<Box<dyn Future<Output = Result<T, TransportError>> + Send + 'a>>;

impl Inner {
    /// How many copies of a request for `bytes` at `priority` to send:
    /// on-demand requests as many as the source's last `Path` report calls
    /// for (see [`crate::path::copies`]), others one.
    pub(super) fn copies(&self, priority: Priority, bytes: u64) -> u32 {
        let (lost_ppm, sent_packets) = self.path.load();
        match priority {
            Priority::OnDemand => path::copies(lost_ppm, sent_packets, bytes),
            _ => 1,
        }
    }

    /// Sends `copies` copies of the request `once` makes (at the priority
    /// given to it) and returns the first complete answer. The copies go
    /// on separate streams, [`HEDGE_SPACING`] apart (so they leave in
    /// separate datagrams), the later ones at [`Priority::Hedge`], just
    /// below the first (so a lossless first answer is not slowed by them);
    /// dropping the others stops their streams. `start`: the request's
    /// first chunk, for the log.
    pub(super) async fn hedged<'a, T, F, Fut>(
        &self,
        start: u64,
        copies: u32,
        priority: Priority,
        once: &'a F,
    ) -> Result<T, TransportError>
    where
        F: Fn(Priority) -> Fut + Sync,
        Fut: Future<Output = Result<T, TransportError>> + Send + 'a,
        T: 'a,
    {
        self.hedged.fetch_add(1, Ordering::Relaxed);
        let t0 = Instant::now();
        let mut racing: Vec<Racer<'a, T>> = vec![Box::pin(once(priority))];
        for k in 1..copies {
            racing.push(Box::pin(async move {
                tokio::time::sleep(HEDGE_SPACING * k).await;
                once(Priority::Hedge).await
            }));
        }
        let got = first_ok(racing).await;
        tracing::debug!(
            start,
            copies,
            won = got.as_ref().map(|(i, _)| *i).ok(),
            ms = t0.elapsed().as_secs_f64() * 1e3,
            "hedged read"
        );
        got.map(|(_, v)| v)
    }
}

/// The first `Ok` of `racing` (polled together) with its index, or the last
/// error when every one fails. The others are dropped on return.
async fn first_ok<T>(mut racing: Vec<Racer<'_, T>>) -> Result<(usize, T), TransportError> {
    let mut index: Vec<usize> = (0..racing.len()).collect();
    std::future::poll_fn(move |cx| {
        let mut i = 0;
        while i < racing.len() {
            match racing[i].as_mut().poll(cx) {
                Poll::Ready(Ok(v)) => return Poll::Ready(Ok((index[i], v))),
                Poll::Ready(Err(e)) => {
                    drop(racing.remove(i));
                    index.remove(i);
                    if racing.is_empty() {
                        return Poll::Ready(Err(e));
                    }
                }
                Poll::Pending => i += 1,
            }
        }
        Poll::Pending
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fail(what: &str) -> TransportError {
        TransportError::Protocol {
            op: "read",
            reason: what.into(),
        }
    }

    fn after(ms: u64, r: Result<u32, TransportError>) -> Racer<'static, u32> {
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            r
        })
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_answer_wins_and_failures_wait_for_the_others() {
        // The quickest Ok wins, whatever its place.
        let got = first_ok(vec![after(30, Ok(1)), after(10, Ok(2)), after(20, Ok(3))]).await;
        assert_eq!(got.unwrap(), (1, 2));
        // A quick failure does not end the race.
        let got = first_ok(vec![after(1, Err(fail("a"))), after(5, Ok(7))]).await;
        assert_eq!(got.unwrap(), (1, 7));
        // All fail: the last error.
        let got = first_ok(vec![
            after(2, Err(fail("late one"))),
            after(1, Err(fail("early one"))),
        ])
        .await;
        assert!(got.unwrap_err().to_string().contains("late one"));
    }
}
