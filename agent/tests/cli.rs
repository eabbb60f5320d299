//! Flags that cannot work stop the agent at once, with a clear message.

use std::process::Command;

fn run(args: &[&str]) -> (Option<i32>, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_tidepool-agent"))
        .args(args)
        .env_remove("NODE_NAME")
        .env_remove("TIDEPOOL_OPERATOR_URL")
        .output()
        .expect("run the agent");
    (output.status.code(), String::from_utf8_lossy(&output.stderr).into_owned())
}

#[test]
fn bad_flags_stop_the_agent_clearly() {
    let url = ["--operator-url", "http://127.0.0.1:1"];
    let cases: &[(&[&str], &str)] = &[
        (&[], "give exactly one of --node-name (or NODE_NAME) and --external"),
        (&["--node-name", "a", "--external", "b"], "give exactly one of"),
        (&["--node-name", "a", "--windows", "10s,fortnight"], "--windows: \"fortnight\""),
        (&["--node-name", "a", "--latitude", "10"], "give both --latitude and --longitude"),
        (&["--node-name", "Bad_Name"], "must be a lowercase RFC 1123 name"),
    ];
    for (extra, message) in cases {
        let mut args = url.to_vec();
        args.extend_from_slice(extra);
        let (code, stderr) = run(&args);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(message), "{args:?}: expected {message:?} in {stderr:?}");
    }
    let (code, stderr) = run(&["--node-name", "a"]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("--operator-url"), "{stderr}");
}

#[test]
fn a_taken_listen_address_is_an_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = taken.local_addr().unwrap().to_string();
    let (code, stderr) =
        run(&["--operator-url", "http://127.0.0.1:1", "--node-name", "a", "--no-gpu", "--listen", &listen]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("cannot listen on"), "{stderr}");
}
