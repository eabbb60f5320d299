//! One tube after another, each echoing 1 MiB through one connection, for
//! a while: counts the echoes that stalled and the errors the WebRTC stack
//! logged (a GSO send the kernel refused among them). This is how the GSO
//! wedge was found and its fix checked (docs/tubes.md).
//!
//! `cargo bench -p tidepool-tube --bench soak`; `SOAK_SECONDS` (default
//! 120) bounds it. The wedge wanted a busy machine: run two or three at
//! once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[path = "../tests/common/mod.rs"]
mod common;

use common::{connect, echo_target, pattern, tube};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ECHO_BYTES: usize = 1 << 20;
/// No byte back for this long: the echo stalled.
const STALLED: Duration = Duration::from_secs(4);

/// Counts the WebRTC stack's errors, and prints the first few.
struct ErrorCounter(AtomicU64);

impl log::Log for ErrorCounter {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::Level::Error
    }

    fn log(&self, record: &log::Record) {
        if self.enabled(record.metadata()) && self.0.fetch_add(1, Ordering::Relaxed) < 5 {
            eprintln!("logged: {} {}", record.target(), record.args());
        }
    }

    fn flush(&self) {}
}

static ERRORS: ErrorCounter = ErrorCounter(AtomicU64::new(0));

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let seconds = std::env::var("SOAK_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(120);
    log::set_logger(&ERRORS).expect("no other logger");
    log::set_max_level(log::LevelFilter::Error);
    let port = echo_target().await;
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let (mut tubes, mut stalled) = (0u64, 0u64);
    while Instant::now() < deadline {
        let tube = tube().await;
        let app = connect(&tube.client, port).await.expect("the pod's end dials the echo target");
        let (mut reader, mut writer) = app.into_split();
        let sent = pattern(u32::try_from(tubes % 1_000).unwrap_or(0), ECHO_BYTES);
        let to_send = sent.clone();
        let writing = tokio::spawn(async move {
            let _ = writer.write_all(&to_send).await;
            writer
        });
        let mut echoed = vec![0u8; ECHO_BYTES];
        let (mut got, mut last) = (0, Instant::now());
        while got < ECHO_BYTES && last.elapsed() < STALLED {
            match tokio::time::timeout(Duration::from_millis(200), reader.read(&mut echoed[got..])).await {
                Ok(Ok(read)) if read > 0 => {
                    got += read;
                    last = Instant::now();
                }
                Ok(_) => break,
                Err(_) => {}
            }
        }
        tubes += 1;
        if got < ECHO_BYTES {
            stalled += 1;
            let (client, pod) = (tube.client.stats(), tube.server.stats());
            eprintln!(
                "tube {tubes}: the echo stopped at {got} bytes; client sent {} received {}, pod sent {} received {}",
                client.sent.load(Ordering::Relaxed),
                client.received.load(Ordering::Relaxed),
                pod.sent.load(Ordering::Relaxed),
                pod.received.load(Ordering::Relaxed),
            );
        } else {
            assert!(echoed == sent, "tube {tubes}: the echo differs from what was sent");
        }
        writing.abort();
        tube.client.close();
        if let Ok(Ok((_, opened))) = tokio::time::timeout(Duration::from_secs(5), tube.client_bridge).await {
            opened.close().await;
        }
        tube.server_runtime.shutdown_background();
    }
    println!(
        "soak: {tubes} tubes in {seconds} s, each echoing 1 MiB; echoes stalled: {stalled}; errors the WebRTC stack logged: {}",
        ERRORS.0.load(Ordering::Relaxed)
    );
}
