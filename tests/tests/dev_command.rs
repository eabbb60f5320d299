//! The README's "bring it up" command works and says what to type next.

#[test]
fn tidepool_dev_brings_up_the_cluster_and_says_what_next() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tidepool-dev")).arg("--check").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "tidepool-dev failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    // The chart went in with the real helm.
    assert!(stdout.contains("STATUS: deployed"), "{stdout}");
    // A tube carried a request to the operator's /healthz, and showed Connected.
    assert!(stdout.lines().any(|l| l.starts_with("listening on 127.0.0.1:")), "{stdout}");
    assert!(stdout.lines().any(|l| l.starts_with("tube-") && l.contains("Connected")), "{stdout}");
    assert!(stdout.contains("kwok-gpu-0"), "{stdout}");
    assert!(stdout.contains("export KUBECONFIG="), "{stdout}");
    // The CLI ran a bufferbloat test on a real session pod through the
    // operator, and the pod's report completed the session.
    assert!(stdout.lines().any(|l| l.starts_with("results ") && l.ends_with(" reported to the operator")), "{stdout}");
    assert!(stdout.contains("bufferbloat grade"), "{stdout}");
    assert!(stdout.lines().any(|l| l.starts_with("session-") && l.contains("Completed")), "{stdout}");
    // Its results went to the results store (SeaweedFS) and read back from there.
    assert!(
        stdout.lines().any(|l| l.starts_with("testsession.tidepool.dev/") && l.ends_with("condition met")),
        "{stdout}"
    );
    assert!(
        stdout.lines().any(|l| l.starts_with("20") && l.contains(" edge ") && l.contains("Completed")),
        "no stored result in:\n{stdout}"
    );
    // The gateway, run with the chart's arguments and rights, gave an
    // anonymous session on the example pool and reached its pod.
    assert!(stdout.lines().any(|l| l.contains("\"endpoint\":\"http://127.0.0.1:") && l.contains("/s\"")), "{stdout}");
    assert!(
        stdout.lines().any(|l| l.starts_with('{') && l.contains("\"pool\":\"edge\"") && l.contains("\"udpPort\"")),
        "{stdout}"
    );
    assert!(stdout.contains("The web UI: http://127.0.0.1:"), "{stdout}");
    // The web UI, driven in Chromium, graded a test and healed its live graph.
    // Real letters, not the "?" it prints when the report lacks one.
    let letter = |l: &str| ["A+", "A", "B", "C", "D", "F"].iter().any(|g| l.starts_with(&format!("{g},")));
    assert!(
        stdout.lines().any(|l| l
            .strip_prefix("The web UI in Chromium: bufferbloat grade ")
            .and_then(|rest| rest.split_once("household grade "))
            .is_some_and(|(bufferbloat, household)| letter(bufferbloat) && letter(household))),
        "{stdout}"
    );
    assert!(
        stdout.lines().any(|l| l.starts_with("The live latency graph: pod ")
            && l.contains("healed onto pod")
            && !l.contains('?')),
        "{stdout}"
    );
    assert!(stdout.lines().any(|l| l.starts_with("The cluster view: ") && !l.contains(" 0 sessions")), "{stdout}");
    // An agent per node reported: Backends exist and the router answers.
    assert!(stdout.contains("backend.tidepool.dev/kwok-gpu-0 condition met"), "{stdout}");
    assert!(stdout.contains("\"backend\":\"kwok-"), "{stdout}");
}
