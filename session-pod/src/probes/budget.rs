//! What a session's probes may move in all: a byte budget shared by every
//! probe of every run, and a TCP stream that counts against it.
//!
//! Bytes are what the probes' sockets send and receive (TCP payload,
//! datagram payloads), headers of the layers below not included.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The budget is spent: no probe may send or receive more.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the session's probe traffic cap of {limit} bytes is spent")]
pub struct BudgetSpent {
    pub limit: u64,
}

impl From<BudgetSpent> for io::Error {
    fn from(spent: BudgetSpent) -> Self {
        io::Error::other(spent)
    }
}

/// Bytes the probes may still move. Shared (`Arc`) by every probe of a session.
#[derive(Debug)]
pub struct TrafficBudget {
    limit: u64,
    used: AtomicU64,
}

impl TrafficBudget {
    pub fn new(limit: u64) -> Self {
        Self { limit, used: AtomicU64::new(0) }
    }

    /// No cap: for probes run outside a session (tests, tools).
    pub fn unlimited() -> Self {
        Self::new(u64::MAX)
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes moved so far.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Bytes still allowed.
    pub fn remaining(&self) -> u64 {
        self.limit.saturating_sub(self.used())
    }

    /// Whether anything may still be sent or received.
    pub fn check(&self) -> Result<(), BudgetSpent> {
        if self.used() >= self.limit { Err(BudgetSpent { limit: self.limit }) } else { Ok(()) }
    }

    /// Counts `bytes` that moved; an error once the total is past the limit
    /// (they are counted all the same: they moved).
    pub fn charge(&self, bytes: u64) -> Result<(), BudgetSpent> {
        let before = self.used.fetch_add(bytes, Ordering::Relaxed);
        if before.saturating_add(bytes) > self.limit { Err(BudgetSpent { limit: self.limit }) } else { Ok(()) }
    }
}

impl Default for TrafficBudget {
    fn default() -> Self {
        Self::unlimited()
    }
}

/// A stream whose every byte each way counts against a budget; once it is
/// spent, reads and writes fail with [`BudgetSpent`].
#[derive(Debug)]
pub(crate) struct Metered<S> {
    inner: S,
    budget: std::sync::Arc<TrafficBudget>,
}

impl<S> Metered<S> {
    pub fn new(inner: S, budget: std::sync::Arc<TrafficBudget>) -> Self {
        Self { inner, budget }
    }
}

/// The largest read near the end of a budget, which goes through a buffer of its own.
const LAST_READ_BYTES: usize = 64 * 1024;

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        self.budget.check()?;
        let remaining = usize::try_from(self.budget.remaining()).unwrap_or(usize::MAX);
        if remaining >= buf.remaining() {
            let before = buf.filled().len();
            let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
            if let Poll::Ready(Ok(())) = polled {
                let _ = self.budget.charge((buf.filled().len() - before) as u64);
            }
            return polled;
        }
        // Near the cap: read no more than it leaves, so the cap holds to the byte.
        let mut last = vec![0u8; remaining.min(LAST_READ_BYTES)];
        let mut limited = ReadBuf::new(&mut last);
        let polled = Pin::new(&mut self.inner).poll_read(cx, &mut limited);
        if let Poll::Ready(Ok(())) = polled {
            let read = limited.filled();
            let _ = self.budget.charge(read.len() as u64);
            buf.put_slice(read);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        self.budget.check()?;
        let allowed = usize::try_from(self.budget.remaining()).unwrap_or(usize::MAX).min(data.len());
        let polled = Pin::new(&mut self.inner).poll_write(cx, &data[..allowed]);
        if let Poll::Ready(Ok(written)) = polled {
            let _ = self.budget.charge(written as u64);
        }
        polled
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
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn the_budget_refuses_once_spent() {
        let budget = TrafficBudget::new(100);
        assert_eq!(budget.charge(60), Ok(()));
        assert_eq!(budget.charge(40), Ok(()), "up to the limit is within it");
        assert_eq!(budget.check(), Err(BudgetSpent { limit: 100 }));
        assert_eq!(budget.charge(1), Err(BudgetSpent { limit: 100 }));
        assert_eq!(budget.used(), 101);
        assert!(TrafficBudget::unlimited().charge(u64::MAX / 2).is_ok());
    }

    #[tokio::test]
    async fn a_metered_stream_counts_both_ways_and_stops_at_the_cap() {
        let budget = Arc::new(TrafficBudget::new(1_000));
        let (client, mut server) = tokio::io::duplex(64 * 1024);
        let mut metered = Metered::new(client, budget.clone());
        metered.write_all(&[1u8; 300]).await.unwrap();
        server.write_all(&[2u8; 500]).await.unwrap();
        let mut buf = [0u8; 500];
        metered.read_exact(&mut buf).await.unwrap();
        assert_eq!(budget.used(), 800);
        // 200 bytes are left: a write of 300 stops there, to the byte.
        let error = metered.write_all(&[3u8; 300]).await.unwrap_err();
        assert_eq!(error.to_string(), "the session's probe traffic cap of 1000 bytes is spent");
        assert_eq!(budget.used(), 1_000);
        assert!(metered.read(&mut buf).await.is_err());

        // Reads stop at the cap too.
        let budget = Arc::new(TrafficBudget::new(100));
        let (client, mut server) = tokio::io::duplex(64 * 1024);
        let mut metered = Metered::new(client, budget.clone());
        server.write_all(&[5u8; 500]).await.unwrap();
        let mut all = Vec::new();
        assert!(metered.read_to_end(&mut all).await.is_err());
        assert_eq!((all.len(), budget.used()), (100, 100));
    }
}
