//! A small shaped network out of network namespaces, for measuring our
//! instruments against a known truth.
//!
//! ```text
//!   client 10.X.1.2 ── veth ── 10.X.1.1 router 10.X.2.1 ── veth ── 10.X.2.2 server
//! ```
//!
//! The router shapes its egress both ways with tc's `tbf` (rate, burst and the
//! queue's `latency`: how deep the buffer is). Everything is removed when the
//! [`ShapedPath`] drops, also when a test panics.

use std::path::Path;
use std::process::Command;

use crate::process::Managed;
use crate::{HarnessError, Result};

/// How the router shapes each direction.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub rate_mbit: u32,
    /// tbf's `latency`: the longest a packet may wait in the queue, which
    /// sizes the buffer (deep: hundreds of ms; shallow: a few).
    pub queue_ms: u32,
    /// The TCP congestion control of the client and server namespaces
    /// (`net.ipv4.tcp_congestion_control`); the kernel's default when None.
    pub congestion: Option<&'static str>,
}

/// Three namespaces joined through a shaping router.
pub struct ShapedPath {
    prefix: String,
    pub client_ip: String,
    pub server_ip: String,
}

impl ShapedPath {
    /// Creates the namespaces `<prefix>c`, `<prefix>r` and `<prefix>s`.
    /// `subnet` (1 to 250) picks 10.`subnet`.1.0/24 and 10.`subnet`.2.0/24.
    pub fn create(prefix: &str, subnet: u8, shape: Shape) -> Result<Self> {
        let path = Self {
            prefix: prefix.to_string(),
            client_ip: format!("10.{subnet}.1.2"),
            server_ip: format!("10.{subnet}.2.2"),
        };
        path.remove();
        let (c, r, s) = (path.ns("c"), path.ns("r"), path.ns("s"));
        let (c0, r0, r1, s0) =
            (format!("{prefix}c0"), format!("{prefix}r0"), format!("{prefix}r1"), format!("{prefix}s0"));
        let rate = format!("{}mbit", shape.rate_mbit);
        let queue = format!("{}ms", shape.queue_ms);
        let steps: Vec<Vec<&str>> = vec![
            vec!["netns", "add", &c],
            vec!["netns", "add", &r],
            vec!["netns", "add", &s],
            vec!["-n", &c, "link", "set", "lo", "up"],
            vec!["-n", &r, "link", "set", "lo", "up"],
            vec!["-n", &s, "link", "set", "lo", "up"],
            vec!["link", "add", &c0, "netns", &c, "type", "veth", "peer", "name", &r0, "netns", &r],
            vec!["link", "add", &s0, "netns", &s, "type", "veth", "peer", "name", &r1, "netns", &r],
        ];
        for step in steps {
            ip(&step)?;
        }
        let addresses = [
            (&c, &c0, format!("10.{subnet}.1.2/24")),
            (&r, &r0, format!("10.{subnet}.1.1/24")),
            (&r, &r1, format!("10.{subnet}.2.1/24")),
            (&s, &s0, format!("10.{subnet}.2.2/24")),
        ];
        for (ns, dev, address) in &addresses {
            ip(&["-n", ns, "addr", "add", address, "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        ip(&["-n", &c, "route", "add", "default", "via", &format!("10.{subnet}.1.1")])?;
        ip(&["-n", &s, "route", "add", "default", "via", &format!("10.{subnet}.2.1")])?;
        run("ip", &["netns", "exec", &r, "sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        if let Some(algorithm) = shape.congestion {
            let setting = format!("net.ipv4.tcp_congestion_control={algorithm}");
            for ns in [&c, &s] {
                run("ip", &["netns", "exec", ns, "sysctl", "-qw", &setting])?;
            }
        }
        for dev in [&r0, &r1] {
            let tbf = ["qdisc", "add", "dev", dev, "root", "tbf", "rate", &rate, "burst", "32kbit", "latency", &queue];
            let mut args = vec!["netns", "exec", &r, "tc"];
            args.extend(tbf);
            run("ip", &args)?;
        }
        Ok(path)
    }

    fn ns(&self, role: &str) -> String {
        format!("{}{role}", self.prefix)
    }

    pub fn client_ns(&self) -> String {
        self.ns("c")
    }

    pub fn server_ns(&self) -> String {
        self.ns("s")
    }

    /// Starts `program` inside the namespace `ns`.
    pub fn spawn_in(
        &self,
        ns: &str,
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(String, String)],
        dir: &Path,
    ) -> Result<Managed> {
        let mut full = vec!["netns".to_string(), "exec".to_string(), ns.to_string(), program.display().to_string()];
        full.extend(args.iter().cloned());
        Managed::spawn_with_env(name, Path::new("ip"), &full, env, dir)
    }

    /// Moves the calling thread into the namespace `ns`. The threads and
    /// processes it starts from then on start there too, so a test can run
    /// a whole cluster behind the shaped line.
    pub fn enter(&self, ns: &str) -> Result<()> {
        use std::os::fd::AsRawFd;
        let path = format!("/var/run/netns/{ns}");
        let file = std::fs::File::open(&path).map_err(HarnessError::io(format!("opening {path}")))?;
        // SAFETY: setns only reads the descriptor, which `file` keeps open
        // for the call; it changes nothing but this thread's namespace.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(HarnessError::Other(format!("entering {ns}: {}", std::io::Error::last_os_error())));
        }
        Ok(())
    }

    /// Runs `program` inside `ns` to the end and returns its stdout.
    pub fn output_in(&self, ns: &str, program: &Path, args: &[String], env: &[(String, String)]) -> Result<String> {
        let output = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(program)
            .args(args)
            .envs(env.iter().cloned())
            .output()
            .map_err(HarnessError::io(format!("running {} in {ns}", program.display())))?;
        if !output.status.success() {
            return Err(HarnessError::Other(format!(
                "{} in {ns} failed ({}): {}",
                program.display(),
                output.status,
                String::from_utf8_lossy(&output.stderr)
            )));
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    fn remove(&self) {
        for role in ["c", "r", "s"] {
            let _ = Command::new("ip").args(["netns", "del", &self.ns(role)]).output();
        }
    }
}

impl Drop for ShapedPath {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Whether this process may make network namespaces (root, and a kernel and
/// `ip` that allow it): tried, not guessed.
pub fn namespaces_available() -> std::result::Result<(), String> {
    let name = format!("tpcheck{}", std::process::id());
    let made = Command::new("ip").args(["netns", "add", &name]).output();
    match made {
        Ok(output) if output.status.success() => {
            let _ = Command::new("ip").args(["netns", "del", &name]).output();
            Ok(())
        }
        Ok(output) => Err(String::from_utf8_lossy(&output.stderr).trim().to_string()),
        Err(e) => Err(format!("cannot run ip: {e}")),
    }
}

fn ip(args: &[&str]) -> Result<()> {
    run("ip", args)
}

fn run(program: &str, args: &[&str]) -> Result<()> {
    let output =
        Command::new(program).args(args).output().map_err(HarnessError::io(format!("running {program} {args:?}")))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(HarnessError::Other(format!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}
