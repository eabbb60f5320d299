//! Probes that need network namespaces: a traceroute through a router,
//! which ICMP socket `net.ipv4.ping_group_range` and `CAP_NET_RAW` allow,
//! and an http probe of a name that resolves to a private address (a mount
//! namespace of the test thread gives it an /etc/hosts of its own).
//!
//! Each test makes its own namespaces and deletes them when it ends, passed
//! or failed. A test that cannot make them fails, unless
//! `TIDEPOOL_SKIP_NETNS=1`, in which case it prints that it skipped.
#![cfg(target_os = "linux")]

use std::fs::File;
use std::io::{self, Write as _};
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::Duration;

use std::sync::Arc;

use tidepool_crds::test_session::{ProbeKind, ProbeTarget};
use tidepool_protocol::egress::EgressPolicy;
use tidepool_session::probes::{IcmpSocket, ProbeOutcome, ProbeSettings, probe};

/// The namespaces' addresses (benchmarking and loopback), allowed as a pool's
/// rules would allow them: the default policy refuses both.
const ALLOW_TEST_NETWORKS: &str = r#"[{"cidr":"198.18.0.0/15"},{"cidr":"127.0.0.0/8"}]"#;

/// Network namespaces, deleted on drop.
struct Namespaces {
    names: Vec<String>,
}

impl Namespaces {
    fn create(test: &str, roles: &[&str]) -> Result<Self, String> {
        let mut made = Self { names: Vec::new() };
        for role in roles {
            let name = format!("tp{}-{test}-{role}", std::process::id());
            ip(&["netns", "add", &name])?;
            made.names.push(name);
        }
        Ok(made)
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for name in &self.names {
            if let Err(error) = ip(&["netns", "del", name]) {
                let _ = writeln!(io::stderr(), "could not delete network namespace {name}: {error}");
            }
        }
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let command = format!("ip {}", args.join(" "));
    let output = Command::new("ip").args(args).output().map_err(|error| format!("{command}: {error}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!("{command}: {}", String::from_utf8_lossy(&output.stderr).trim()))
    }
}

/// Makes the namespaces and sets them up, or fails the test, or with
/// `TIDEPOOL_SKIP_NETNS=1` says it skips (on stderr, which tests do not capture).
fn namespaces(test: &str, roles: &[&str], setup: impl FnOnce(&[String]) -> Result<(), String>) -> Option<Namespaces> {
    let made = Namespaces::create(test, roles).and_then(|made| setup(&made.names).map(|()| made));
    match made {
        Ok(made) => Some(made),
        Err(error) if std::env::var("TIDEPOOL_SKIP_NETNS").as_deref() == Ok("1") => {
            let _ = writeln!(
                io::stderr(),
                "SKIPPED {test}: cannot set up network namespaces: {error} (TIDEPOOL_SKIP_NETNS=1)"
            );
            None
        }
        Err(error) => panic!(
            "{test} needs network namespaces (root, iproute2's `ip netns` and veth): {error}; \
             set TIDEPOOL_SKIP_NETNS=1 to skip it"
        ),
    }
}

/// Runs `work` on a thread of its own that has entered namespace `name`; sockets it opens live there.
fn in_namespace<T: Send + 'static>(name: &str, work: impl FnOnce() -> T + Send + 'static) -> Result<T, String> {
    let path = format!("/var/run/netns/{name}");
    std::thread::spawn(move || {
        let file = File::open(&path).map_err(|error| format!("{path}: {error}"))?;
        // SAFETY: entering a network namespace from an open namespace file
        // changes only this thread, which ends with `work`.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(format!("setns {path}: {}", io::Error::last_os_error()));
        }
        Ok(work())
    })
    .join()
    .map_err(|_| "the thread in the namespace panicked".to_owned())?
}

/// Writes a sysctl of namespace `name`.
fn sysctl(name: &str, key: &str, value: &str) -> Result<(), String> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    let value = value.to_owned();
    in_namespace(name, move || std::fs::write(&path, value).map_err(|error| format!("{path}: {error}")))?
}

/// Short bounds, and the test networks allowed.
fn settings() -> ProbeSettings {
    ProbeSettings {
        timeout: Duration::from_secs(4),
        reply_wait: Duration::from_millis(500),
        ping_interval: Duration::from_millis(20),
        egress: Arc::new(EgressPolicy::parse(ALLOW_TEST_NETWORKS, "").unwrap()),
        ..ProbeSettings::default()
    }
}

/// One probe from inside namespace `name`, on a runtime of its own.
fn probe_in(name: &str, target: ProbeTarget, drop_net_raw: bool) -> ProbeOutcome {
    let settings = settings();
    in_namespace(name, move || {
        if drop_net_raw {
            drop_capability(CAP_NET_RAW);
        }
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(probe(&target, &settings))
    })
    .unwrap()
}

fn host(kind: ProbeKind, host: &str) -> ProbeTarget {
    ProbeTarget { kind, url: None, host: Some(host.into()), port: None }
}

const CAP_NET_RAW: u32 = 13;

/// Drops a capability from this thread's effective set (capabilities are per thread).
fn drop_capability(capability: u32) {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let mut header = Header { version: VERSION_3, pid: 0 };
    let mut data = [Data::default(); 2];
    // SAFETY: capget and capset read and write a version-3 header and two data
    // structs, which these are, for the calling thread (pid 0).
    unsafe {
        assert_eq!(libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()), 0, "capget");
        data[(capability / 32) as usize].effective &= !(1 << (capability % 32));
        assert_eq!(libc::syscall(libc::SYS_capset, &header, data.as_ptr()), 0, "capset");
    }
}

#[test]
fn traceroute_crosses_a_router() {
    // client (198.18.1.2) -- (198.18.1.1) router (198.18.2.1) -- (198.18.2.2) server
    let Some(made) = namespaces("trace", &["client", "router", "server"], |names| {
        let [client, router, server] = [&names[0], &names[1], &names[2]].map(String::as_str);
        ip(&["-n", client, "link", "add", "eth0", "type", "veth", "peer", "name", "to-client", "netns", router])?;
        ip(&["-n", router, "link", "add", "to-server", "type", "veth", "peer", "name", "eth0", "netns", server])?;
        let links = [
            (client, "eth0", "198.18.1.2/24"),
            (router, "to-client", "198.18.1.1/24"),
            (router, "to-server", "198.18.2.1/24"),
            (server, "eth0", "198.18.2.2/24"),
        ];
        for (name, device, address) in links {
            ip(&["-n", name, "addr", "add", address, "dev", device])?;
            ip(&["-n", name, "link", "set", device, "up"])?;
        }
        for name in [client, router, server] {
            ip(&["-n", name, "link", "set", "lo", "up"])?;
        }
        ip(&["-n", client, "route", "add", "default", "via", "198.18.1.1"])?;
        ip(&["-n", server, "route", "add", "default", "via", "198.18.2.1"])?;
        sysctl(router, "net.ipv4.ip_forward", "1")
    }) else {
        return;
    };
    let client = made.names[0].clone();

    let outcome = probe_in(&client, host(ProbeKind::Traceroute, "198.18.2.2"), false);
    assert!(outcome.result.ok, "{:?}", outcome.result);
    let hops: Vec<(u8, Option<IpAddr>)> = outcome.facts.hops.iter().map(|hop| (hop.ttl, hop.addr)).collect();
    let router: IpAddr = "198.18.1.1".parse().unwrap();
    let server: IpAddr = "198.18.2.2".parse().unwrap();
    assert_eq!(hops, [(1, Some(router)), (2, Some(server))]);
    let result = outcome.into_result();
    assert!(result.detail.as_deref().unwrap().starts_with("2 hops: 1 198.18.1.1 "), "{result:?}");
    assert_eq!(result.protocol.as_deref(), Some("UDP"));

    // Past the router there is no route to 198.18.3.3: the router says so.
    let outcome = probe_in(&client, host(ProbeKind::Traceroute, "198.18.3.3"), false);
    assert!(!outcome.result.ok);
    assert_eq!(
        outcome.result.error.as_deref(),
        Some("traceroute to 198.18.3.3: hop 1 (198.18.1.1) says network unreachable")
    );
}

#[test]
fn icmp_uses_the_socket_it_may_and_names_what_is_missing() {
    let Some(made) = namespaces("icmp", &["pinger"], |names| ip(&["-n", &names[0], "link", "set", "lo", "up"])) else {
        return;
    };
    let name = made.names[0].clone();
    let loopback = || host(ProbeKind::Icmp, "127.0.0.1");

    sysctl(&name, "net.ipv4.ping_group_range", "0 2147483647").unwrap();
    let outcome = probe_in(&name, loopback(), false);
    assert!(outcome.result.ok, "{:?}", outcome.result);
    assert_eq!(outcome.facts.icmp_socket, Some(IcmpSocket::Datagram));
    assert_eq!(outcome.facts.rtt.unwrap().received, 4);

    sysctl(&name, "net.ipv4.ping_group_range", "1 0").unwrap();
    let outcome = probe_in(&name, loopback(), false);
    assert!(outcome.result.ok, "{:?}", outcome.result);
    assert_eq!(outcome.facts.icmp_socket, Some(IcmpSocket::Raw));

    // Neither permitted: the error says which permission is missing.
    let outcome = probe_in(&name, loopback(), true);
    assert!(!outcome.result.ok);
    let error = outcome.result.error.unwrap();
    assert!(
        error.starts_with("ICMP is not permitted: an ICMP datagram socket needs net.ipv4.ping_group_range"),
        "{error}"
    );
    assert!(error.contains("(it is \"1 0\")") && error.ends_with("a raw socket needs CAP_NET_RAW"), "{error}");
}

/// Gives this thread (and the threads it starts: the runtime's resolver
/// threads) a mount namespace of its own with `hosts` over /etc/hosts.
fn private_hosts_file(hosts: &std::path::Path) -> Result<(), String> {
    // SAFETY: unshare and mount take no pointers but the C strings, which
    // outlive the calls; they change only this thread's mount namespace.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            return Err(format!("unshare(CLONE_NEWNS): {}", io::Error::last_os_error()));
        }
        // Keep the bind mount from propagating to the host's namespace.
        let root = c"/";
        let flags = libc::MS_REC | libc::MS_PRIVATE;
        if libc::mount(std::ptr::null(), root.as_ptr(), std::ptr::null(), flags, std::ptr::null()) != 0 {
            return Err(format!("make / private: {}", io::Error::last_os_error()));
        }
        let source = std::ffi::CString::new(hosts.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
        let target = c"/etc/hosts";
        if libc::mount(source.as_ptr(), target.as_ptr(), std::ptr::null(), libc::MS_BIND, std::ptr::null()) != 0 {
            return Err(format!("bind {} over /etc/hosts: {}", hosts.display(), io::Error::last_os_error()));
        }
    }
    Ok(())
}

#[test]
fn an_http_name_that_resolves_to_a_private_address_is_refused_before_any_connection() {
    const PRIVATE: &str = "10.77.0.1";
    let Some(made) = namespaces("private", &["client"], |names| {
        ip(&["-n", &names[0], "link", "set", "lo", "up"])?;
        ip(&["-n", &names[0], "addr", "add", &format!("{PRIVATE}/32"), "dev", "lo"])
    }) else {
        return;
    };
    let hosts = std::env::temp_dir().join(format!("tidepool-hosts-{}", std::process::id()));
    std::fs::write(&hosts, format!("127.0.0.1 localhost\n{PRIVATE} internal.probe.test\n")).unwrap();
    let hosts_file = hosts.clone();
    let outcome = in_namespace(&made.names[0], move || {
        private_hosts_file(&hosts_file)?;
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let listener = tokio::net::TcpListener::bind((PRIVATE, 0)).await.map_err(|e| e.to_string())?;
            let port = listener.local_addr().map_err(|e| e.to_string())?.port();
            let url = format!("http://internal.probe.test:{port}/");
            let target = ProbeTarget { kind: ProbeKind::Http, url: Some(url), host: None, port: None };
            let accepted = || tokio::time::timeout(Duration::from_millis(300), listener.accept());

            let refused =
                probe(&target, &ProbeSettings { egress: Arc::new(EgressPolicy::default()), ..settings() }).await;
            let connected_when_refused = accepted().await.is_ok();
            // The pool's rule for the range lets the same probe through: the
            // address was reachable all along.
            let rule = format!(r#"[{{"cidr":"10.77.0.0/16","ports":[{port}]}}]"#);
            let allowed_settings =
                ProbeSettings { egress: Arc::new(EgressPolicy::parse(&rule, "").unwrap()), ..settings() };
            let allowed = tokio::spawn(async move { probe(&target, &allowed_settings).await });
            let connected_when_allowed = accepted().await.is_ok();
            allowed.abort();
            Ok::<_, String>((refused, connected_when_refused, connected_when_allowed))
        })
    });
    let _ = std::fs::remove_file(&hosts);
    let (refused, connected_when_refused, connected_when_allowed) = outcome.unwrap().unwrap();
    assert_eq!(
        refused.result.error.as_deref(),
        Some("refused by the pool's egress policy: internal.probe.test resolves to 10.77.0.1, which is private")
    );
    assert_eq!(refused.facts.egress_refused, Some("private"));
    let timings = refused.result.timings.unwrap();
    assert!(timings.connect_ms.is_none(), "{timings:?}");
    assert!(!connected_when_refused, "the refused probe connected");
    assert!(connected_when_allowed, "the allowed probe never connected: the test proves nothing");
}
