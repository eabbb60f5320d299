//! A real S3 server for the tests: SeaweedFS (`weed mini`), built from the
//! Go module proxy by `tests/control-plane/build.sh` beside the control
//! plane, on loopback ports of its own, with one identity and one bucket.
//! It can be stopped and started again on the same data and ports, as a
//! store that goes down for a while and comes back.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use crate::control_plane::bin_dir;
use crate::process::Managed;
use crate::{HarnessError, Result};

pub const ACCESS_KEY_ID: &str = "tidepool-tests";
pub const SECRET_ACCESS_KEY: &str = "tidepool-tests-secret-key-0123456789";

/// SeaweedFS serves gRPC on each HTTP port plus this.
const GRPC_OFFSET: u16 = 10_000;
/// HTTP ports come from here, so that they and their gRPC twins sit below
/// the kernel's ephemeral range (32768 up): a port found free and released
/// cannot then be taken by some process's outbound connection before
/// SeaweedFS binds it, which failed a CI run.
const FIRST_PORT: u16 = 12_000;
const LAST_PORT: u16 = 32_767 - GRPC_OFFSET;
/// Another test may still pick the same ports in the moment between our
/// check and SeaweedFS's bind; a start that fails so is tried afresh.
const STARTS: usize = 3;

pub struct S3Server {
    process: Option<Managed>,
    dir: PathBuf,
    args: Vec<String>,
    pub port: u16,
    pub bucket: String,
}

impl S3Server {
    /// Starts a server with `bucket` made, and waits until it answers.
    pub async fn start(bucket: &str) -> Result<Self> {
        weed_binary()?;
        let mut last_error = None;
        for _ in 0..STARTS {
            let mut server = Self::prepare(bucket)?;
            match server.start_again().await {
                Ok(()) => return Ok(server),
                // A lost port race; the failed try's directory goes with it.
                Err(error @ HarnessError::Exited { .. }) if error.to_string().contains("address already in use") => {
                    last_error = Some(error)
                }
                Err(error) => return Err(error),
            }
        }
        Err(last_error.unwrap_or_else(|| HarnessError::Other("SeaweedFS did not start".into())))
    }

    /// A directory with the identity's config, and fresh ports.
    fn prepare(bucket: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("tidepool-s3-{}-{}", std::process::id(), unique()));
        let data = dir.join("data");
        std::fs::create_dir_all(&data).map_err(HarnessError::io(format!("creating {}", data.display())))?;
        let config = serde_json::json!({
            "identities": [{
                "name": "tidepool",
                "credentials": [{ "accessKey": ACCESS_KEY_ID, "secretKey": SECRET_ACCESS_KEY }],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }]
        });
        let config_path = dir.join("s3.json");
        std::fs::write(&config_path, config.to_string())
            .map_err(HarnessError::io(format!("writing {}", config_path.display())))?;
        let [master, volume, filer, s3, admin] = ports()?;
        let args = [
            "mini".to_string(),
            format!("-dir={}", data.display()),
            "-ip=127.0.0.1".into(),
            "-ip.bind=127.0.0.1".into(),
            format!("-master.port={master}"),
            format!("-volume.port={volume}"),
            format!("-filer.port={filer}"),
            format!("-s3.port={s3}"),
            format!("-admin.port={admin}"),
            "-admin.port.legacy=0".into(),
            "-admin.ui=false".into(),
            "-webdav=false".into(),
            "-s3.port.iceberg=0".into(),
            "-s3.port.lance=0".into(),
            "-master.telemetry=false".into(),
            format!("-s3.config={}", config_path.display()),
            format!("-bucket={bucket}"),
        ]
        .to_vec();
        Ok(Self { process: None, dir, args, port: s3, bucket: bucket.to_string() })
    }

    /// The endpoint clients use.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Stops the server (SIGKILL, as a crash); its data stays.
    pub fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill();
        }
    }

    /// Starts it again on the same data and ports, and waits until the bucket answers.
    pub async fn start_again(&mut self) -> Result<()> {
        self.stop();
        let process = Managed::spawn("seaweedfs", &weed_binary()?, &self.args, &self.dir)?;
        self.process = Some(process);
        let started = std::time::Instant::now();
        // The bucket is made once the filer is up: wait for it, not just the port.
        let url = format!("{}/{}", self.endpoint(), self.bucket);
        let http = reqwest::Client::new();
        loop {
            if let Some(process) = self.process.as_mut() {
                process.check_running()?;
            }
            // Unsigned, so refused; a 403 from the S3 port says it serves.
            let answered = http.head(&url).timeout(Duration::from_secs(1)).send().await;
            if answered.is_ok_and(|r| r.status().as_u16() == 403 || r.status().is_success()) {
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(60) {
                return Err(HarnessError::Timeout { what: "SeaweedFS to serve S3".into(), seconds: 60 });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The end of the server's log.
    pub fn log_tail(&self, lines: usize) -> String {
        self.process.as_ref().map(|p| p.log_tail(lines)).unwrap_or_default()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn weed_binary() -> Result<PathBuf> {
    let dir = bin_dir()?;
    let entries = std::fs::read_dir(&dir).map_err(HarnessError::io(format!("reading {}", dir.display())))?;
    entries
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("weed-")))
        .ok_or_else(|| HarnessError::Build(format!("no weed-* binary in {}", dir.display())))
}

/// Five HTTP ports whose gRPC twins (port + 10000) are free too, all below
/// the ephemeral range, starting from a point that differs per process and call.
fn ports() -> Result<[u16; 5]> {
    let span = u32::from(LAST_PORT - FIRST_PORT) + 1;
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let seed = std::process::id().wrapping_mul(7919) ^ nanos ^ unique().wrapping_mul(104_729);
    let mut found = Vec::new();
    let mut held = Vec::new();
    for step in 0..span {
        let Ok(port) = u16::try_from(u32::from(FIRST_PORT) + (seed.wrapping_add(step.wrapping_mul(17))) % span) else {
            continue;
        };
        if found.contains(&port) {
            continue;
        }
        let Ok(listener) = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, port)) else { continue };
        let Ok(twin) = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, port + GRPC_OFFSET)) else { continue };
        found.push(port);
        // Held until all five are found, so none is handed out twice.
        held.push((listener, twin));
        if found.len() == 5 {
            return Ok([found[0], found[1], found[2], found[3], found[4]]);
        }
    }
    Err(HarnessError::Other("no five free port pairs on loopback below the ephemeral range".into()))
}

fn unique() -> u32 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}
