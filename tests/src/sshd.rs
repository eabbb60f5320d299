//! Debian's sshd on loopback with a key of its own, for benchmarks that
//! set Tidepool's tunnels beside `ssh -L` (the tool people use for this).
//! Needs `openssh-server` and `openssh-client`, and root (sshd's privilege
//! separation directory); [`Sshd::start`] is `None` without them.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::net::TcpStream;

/// A running sshd, killed (and its directory removed) when dropped.
pub struct Sshd {
    process: Child,
    port: u16,
    dir: PathBuf,
}

/// An `ssh -N -L` process, killed when dropped.
pub struct Forward {
    process: Child,
    /// The local port it forwards from.
    pub port: u16,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Forward {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

fn free_port() -> Option<u16> {
    std::net::TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok().map(|a| a.port())
}

impl Sshd {
    /// Starts sshd on 127.0.0.1 with a fresh host key and a user key for
    /// the current user; `None` when sshd or ssh is not installed.
    pub async fn start(name: &str) -> Option<Self> {
        if !std::path::Path::new("/usr/sbin/sshd").exists() || Command::new("ssh").arg("-V").output().is_err() {
            return None;
        }
        let _ = std::fs::create_dir_all("/run/sshd");
        let port = free_port()?;
        let dir = std::env::temp_dir().join(format!("tidepool-{name}-sshd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok()?;
        for key in ["host", "user"] {
            let made =
                Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(dir.join(key)).status();
            if !made.is_ok_and(|s| s.success()) {
                return None;
            }
        }
        std::fs::copy(dir.join("user.pub"), dir.join("authorized_keys")).ok()?;
        let config = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nPidFile none\nUsePAM no\nStrictModes no\n\
             PermitRootLogin yes\nAuthorizedKeysFile {}\nAllowTcpForwarding yes\n",
            dir.join("host").display(),
            dir.join("authorized_keys").display()
        );
        std::fs::write(dir.join("sshd_config"), config).ok()?;
        let process = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(dir.join("sshd_config"))
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let sshd = Self { process, port, dir };
        for _ in 0..100 {
            if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                return Some(sshd);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    /// Starts `ssh -N -L` from a free local port to `127.0.0.1:target`
    /// through this sshd. It returns at once: the forward is ready when a
    /// connection to its port is carried.
    pub fn forward(&self, target: u16) -> Option<Forward> {
        let local = free_port()?;
        let user = std::env::var("USER").unwrap_or_else(|_| "root".into());
        let process = Command::new("ssh")
            .args(["-N", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes"])
            .args(["-o", "LogLevel=ERROR", "-p", &self.port.to_string(), "-i"])
            .arg(self.dir.join("user"))
            .args(["-L", &format!("127.0.0.1:{local}:127.0.0.1:{target}"), &format!("{user}@127.0.0.1")])
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        Some(Forward { process, port: local })
    }
}

impl Forward {
    /// Waits (up to 10 s) until a connection to the forward's port is accepted.
    pub async fn ready(&self) -> Option<TcpStream> {
        for _ in 0..2000 {
            if let Ok(tcp) = TcpStream::connect(("127.0.0.1", self.port)).await {
                return Some(tcp);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        None
    }
}
