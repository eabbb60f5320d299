//! The README's "bring it up" command works and says what to type next.

#[test]
fn tidepool_dev_brings_up_the_cluster_and_says_what_next() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tidepool-dev")).arg("--check").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "tidepool-dev failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("warmpool.tidepool.dev/edge created"), "{stdout}");
    assert!(stdout.contains("kwok-gpu-0"), "{stdout}");
    assert!(stdout.contains("export KUBECONFIG="), "{stdout}");
    // The operator answered a session request with a bound pod and its credentials.
    assert!(stdout.contains("\"endpoint\":\"http://127."), "{stdout}");
    assert!(stdout.contains("\"token\":"), "{stdout}");
    // An agent per node reported: Backends exist and the router answers.
    assert!(stdout.contains("backend.tidepool.dev/kwok-gpu-0 condition met"), "{stdout}");
    assert!(stdout.contains("\"backend\":\"kwok-"), "{stdout}");
}
