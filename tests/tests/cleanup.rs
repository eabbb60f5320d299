//! The harness leaves nothing behind when a test panics or times out.

use std::path::PathBuf;
use std::time::Duration;

use tidepool_tests::{ControlPlane, Options};

fn bare() -> Options {
    Options::api_server_only()
}

fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn a_panicking_test_stops_every_process_and_removes_its_directory() {
    let (tx, rx) = std::sync::mpsc::channel::<(PathBuf, Vec<u32>)>();
    let outcome = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let plane = ControlPlane::start_with(bare()).await.unwrap();
            tx.send((plane.dir().to_path_buf(), plane.pids().into_iter().map(|(_, pid)| pid).collect())).unwrap();
            panic!("the test under the harness fails");
        })
    })
    .join();
    assert!(outcome.is_err(), "the inner test should have panicked");
    let (dir, pids) = rx.recv().unwrap();
    assert_eq!(pids.len(), 2, "etcd and kube-apiserver were running");
    assert!(!dir.exists(), "{} was left behind", dir.display());
    for pid in pids {
        assert!(!alive(pid), "process {pid} outlived the test");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_test_stops_every_process_and_removes_its_directory() {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut stuck = Box::pin(async move {
        let plane = ControlPlane::start_with(bare()).await.unwrap();
        tx.send((plane.dir().to_path_buf(), plane.pids())).unwrap();
        std::future::pending::<()>().await;
    });
    // Let the control plane come up inside the test, then time the test out.
    let (dir, pids) = tokio::select! {
        _ = &mut stuck => unreachable!("the stuck test finished"),
        started = rx.recv() => started.unwrap(),
    };
    // The timeout fires and drops the test's future, and with it the control plane.
    let _ = tokio::time::timeout(Duration::from_millis(200), stuck).await;
    assert!(!dir.exists(), "{} was left behind", dir.display());
    for (name, pid) in pids {
        assert!(!alive(pid), "{name} ({pid}) outlived the test");
    }
}
