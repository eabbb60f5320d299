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
        let mut server = Self { process: None, dir, args, port: s3, bucket: bucket.to_string() };
        server.start_again().await?;
        Ok(server)
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

/// Five HTTP ports whose gRPC twins (port + 10000) are free too.
fn ports() -> Result<[u16; 5]> {
    let mut found = Vec::new();
    let mut held = Vec::new();
    for _ in 0..200 {
        let listener =
            std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(HarnessError::io("a free port"))?;
        let port = listener.local_addr().map_err(HarnessError::io("a port"))?.port();
        let Some(twin_port) = port.checked_add(GRPC_OFFSET) else { continue };
        let Ok(twin) = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, twin_port)) else { continue };
        found.push(port);
        // Held until all five are found, so none is handed out twice.
        held.push((listener, twin));
        if found.len() == 5 {
            return Ok([found[0], found[1], found[2], found[3], found[4]]);
        }
    }
    Err(HarnessError::Other("no five free port pairs on loopback".into()))
}

fn unique() -> u32 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}
