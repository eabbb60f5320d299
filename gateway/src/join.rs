//! Two upgraded connections joined byte for byte, both ways, holding no
//! buffer while they are idle.
//!
//! `tokio::io::copy_bidirectional` keeps an 8 KiB buffer per direction for
//! as long as the connection lives: 16 KiB for every idle WebSocket, most
//! of what one costs the gateway. Here each read lands in a buffer on the
//! stack of that poll, is written on at once, and only what the writer
//! cannot take now is kept, in a buffer given back as soon as the reader
//! has nothing more to give.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The most one read takes.
const READ_SIZE: usize = 16 * 1024;

/// Copies both ways until both sides have ended (an end read on one side
/// shuts down writing to the other, so half-closes pass through), or until
/// either fails. What passes is counted by the streams themselves.
pub async fn join<A, B>(a: &mut A, b: &mut B) -> io::Result<()>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let mut a_to_b = Direction::default();
    let mut b_to_a = Direction::default();
    std::future::poll_fn(|cx| {
        let forward = a_to_b.poll(cx, &mut *a, &mut *b)?;
        let backward = b_to_a.poll(cx, &mut *b, &mut *a)?;
        if forward.is_ready() && backward.is_ready() { Poll::Ready(Ok(())) } else { Poll::Pending }
    })
    .await
}

#[derive(Default)]
struct Direction {
    /// Read but not yet written; empty, and without capacity, when idle.
    unwritten: Vec<u8>,
    /// How much of `unwritten` has been written.
    written: usize,
    /// Bytes were written since the last flush.
    needs_flush: bool,
    state: State,
}

#[derive(Default, PartialEq, Eq)]
enum State {
    #[default]
    Copying,
    /// The reader ended: shutting down the writer.
    ShuttingDown,
    Done,
}

impl Direction {
    fn poll<R, W>(&mut self, cx: &mut Context<'_>, reader: &mut R, writer: &mut W) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut writer = Pin::new(writer);
        loop {
            match self.state {
                State::Done => return Poll::Ready(Ok(())),
                State::ShuttingDown => {
                    ready!(writer.as_mut().poll_shutdown(cx))?;
                    self.state = State::Done;
                    continue;
                }
                State::Copying => {}
            }
            while self.written < self.unwritten.len() {
                let n = ready!(writer.as_mut().poll_write(cx, &self.unwritten[self.written..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.written += n;
                self.needs_flush = true;
            }
            self.unwritten.clear();
            self.written = 0;

            let mut space = [MaybeUninit::<u8>::uninit(); READ_SIZE];
            let mut read = ReadBuf::uninit(&mut space);
            match Pin::new(&mut *reader).poll_read(cx, &mut read) {
                Poll::Pending => {
                    // Idle (or waiting for the peer): hold nothing.
                    self.unwritten = Vec::new();
                    if self.needs_flush {
                        ready!(writer.as_mut().poll_flush(cx))?;
                        self.needs_flush = false;
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {}
            }
            let data = read.filled();
            if data.is_empty() {
                self.state = State::ShuttingDown;
                continue;
            }
            let mut offset = 0;
            while offset < data.len() {
                match writer.as_mut().poll_write(cx, &data[offset..]) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(n)) => {
                        offset += n;
                        self.needs_flush = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        // The writer is full: keep the rest until it has room.
                        self.unwritten.extend_from_slice(&data[offset..]);
                        return Poll::Pending;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    /// Writes `sent` into `stream` and closes its writing half, while
    /// reading everything `stream` gives until its end.
    async fn exchange(stream: tokio::io::DuplexStream, sent: Vec<u8>) -> Vec<u8> {
        let (mut read, mut write) = tokio::io::split(stream);
        let writer = tokio::spawn(async move {
            write.write_all(&sent).await.unwrap();
            write.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        read.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();
        got
    }

    #[tokio::test]
    async fn bytes_pass_both_ways_whole_and_in_order_through_a_slow_writer() {
        // 64-byte pipes: nearly every write is partial or has to wait.
        let (client, mut client_end) = duplex(64);
        let (mut pod_end, pod) = duplex(64);
        let joined = tokio::spawn(async move { join(&mut client_end, &mut pod_end).await });
        let up: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let down: Vec<u8> = (0..150_000u32).map(|i| (i % 241) as u8).collect();
        let (got_down, got_up) = tokio::join!(exchange(client, up.clone()), exchange(pod, down.clone()));
        assert_eq!(got_up, up);
        assert_eq!(got_down, down);
        joined.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_half_close_passes_through_and_the_other_way_stays_open() {
        let (mut client, mut client_end) = duplex(1024);
        let (mut pod_end, mut pod) = duplex(1024);
        let joined = tokio::spawn(async move { join(&mut client_end, &mut pod_end).await });
        client.write_all(b"request").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        pod.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"request");
        // The pod still answers after the client stopped writing.
        pod.write_all(b"answer").await.unwrap();
        pod.shutdown().await.unwrap();
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"answer");
        joined.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn bytes_the_writer_takes_at_once_are_never_kept() {
        let (mut client, client_end) = duplex(1024);
        let (pod_end, mut pod) = duplex(1024);
        let (mut a, mut b) = (client_end, pod_end);
        let mut there = Direction::default();
        client.write_all(b"ping").await.unwrap();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(there.poll(&mut cx, &mut a, &mut b).is_pending());
        assert_eq!(there.unwritten.capacity(), 0);
        let mut got = [0; 4];
        pod.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
    }

    #[tokio::test]
    async fn a_full_writer_keeps_only_what_it_could_not_take_and_gives_it_back_once_drained() {
        let (mut client, client_end) = duplex(64 * 1024);
        let (pod_end, mut pod) = duplex(100);
        let (mut a, mut b) = (client_end, pod_end);
        let mut there = Direction::default();
        client.write_all(&[7; 1000]).await.unwrap();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(there.poll(&mut cx, &mut a, &mut b).is_pending());
        assert_eq!(there.unwritten.len(), 900);
        let mut drained = vec![0; 1000];
        let mut at = 0;
        while at < 1000 {
            at += pod.read(&mut drained[at..]).await.unwrap();
            let _ = there.poll(&mut cx, &mut a, &mut b);
        }
        assert_eq!(drained, vec![7; 1000]);
        assert_eq!(there.unwritten.capacity(), 0);
    }

    #[tokio::test]
    async fn an_error_on_either_side_ends_the_join() {
        let (mut client, mut client_end) = duplex(1024);
        let (mut pod_end, pod) = duplex(1024);
        drop(pod);
        client.write_all(b"into nothing").await.unwrap();
        let joined = join(&mut client_end, &mut pod_end).await;
        assert!(joined.is_err(), "{joined:?}");
    }
}
