//! nginx from Debian, run in a directory of its own, for the benches that
//! set Tidepool's proxies beside it.

use std::path::Path;
use std::process::{Child, Command, Stdio};

/// A running nginx; killed when dropped.
pub struct Nginx {
    child: Child,
}

impl Nginx {
    /// Runs `nginx` in `dir` with `workers` connections a worker and `http`
    /// as its `http` block's servers and upstreams (logs, temp files and the
    /// pid file are set here, inside `dir`).
    pub fn start(nginx: &Path, dir: &Path, worker_connections: u32, http: &str) -> Self {
        std::fs::create_dir_all(dir.join("logs")).expect("nginx dir");
        let config = format!(
            "worker_processes auto;\nworker_rlimit_nofile 65536;\npid {dir}/nginx.pid;\n\
             error_log {dir}/logs/error.log warn;\n\
             events {{ worker_connections {worker_connections}; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {dir}/body;\n  proxy_temp_path {dir}/proxy;\n\
             fastcgi_temp_path {dir}/fastcgi;\n  uwsgi_temp_path {dir}/uwsgi;\n  scgi_temp_path {dir}/scgi;\n\
             {http}\n}}\n",
            dir = dir.display()
        );
        let path = dir.join("nginx.conf");
        std::fs::write(&path, config).expect("nginx.conf");
        let child = Command::new(nginx)
            .args(["-p", &dir.display().to_string(), "-c", &path.display().to_string(), "-g", "daemon off;"])
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx");
        Self { child }
    }

    /// The master and its workers.
    #[allow(dead_code, reason = "only the gateway bench reads nginx's memory")]
    pub fn pids(&self) -> Vec<u32> {
        let master = self.child.id();
        let children = std::fs::read_to_string(format!("/proc/{master}/task/{master}/children")).unwrap_or_default();
        std::iter::once(master).chain(children.split_whitespace().filter_map(|p| p.parse().ok())).collect()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `nginx -v`'s version.
pub fn version(nginx: &Path) -> String {
    let output = Command::new(nginx).arg("-v").output().expect("nginx -v");
    String::from_utf8_lossy(&output.stderr).trim().trim_start_matches("nginx version: ").to_string()
}
