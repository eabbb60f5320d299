//! Other projects' CRDs, so that what we ship for them (Argo CD's
//! Application and AppProject, the Prometheus Operator's monitors and
//! rules) can be checked by a real API server with a server-side dry run.
//!
//! They come from the projects' own Go modules, pinned below, fetched with
//! `go mod download` into the Go module cache that
//! `tests/control-plane/build.sh` uses, outside the checkout. After the first
//! download they are read from that cache.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{ControlPlane, HarnessError, Result};

/// Argo CD. v3.5 is the newest line whose module the Go of the control-plane
/// build can fetch: v3.6 asks for Go 1.27.
pub const ARGO_CD: (&str, &str) = ("github.com/argoproj/argo-cd/v3", "v3.5.7");
/// The Prometheus Operator.
pub const PROMETHEUS_OPERATOR: (&str, &str) = ("github.com/prometheus-operator/prometheus-operator", "v0.85.0");

/// Argo CD's Application and AppProject CRDs.
pub fn argo_cd() -> Result<Vec<PathBuf>> {
    let dir = module_dir(ARGO_CD)?.join("manifests/crds");
    Ok(["application-crd.yaml", "appproject-crd.yaml"].iter().map(|f| dir.join(f)).collect())
}

/// The Prometheus Operator's ServiceMonitor, PodMonitor and PrometheusRule CRDs.
pub fn prometheus_operator() -> Result<Vec<PathBuf>> {
    let dir = module_dir(PROMETHEUS_OPERATOR)?.join("example/prometheus-operator-crd");
    Ok(["servicemonitors", "podmonitors", "prometheusrules"]
        .iter()
        .map(|f| dir.join(format!("monitoring.coreos.com_{f}.yaml")))
        .collect())
}

/// Applies `files` (CRDs) to `plane` and waits until each is Established.
pub fn install(plane: &ControlPlane, files: &[PathBuf]) -> Result<()> {
    for file in files {
        // Server-side: some of these are too large for client-side apply's annotation.
        let applied = plane
            .kubectl()
            .args(["apply", "--server-side", "--field-manager=tidepool-harness", "-o", "name", "-f"])
            .arg(file)
            .output()
            .map_err(HarnessError::io("running kubectl apply"))?;
        if !applied.status.success() {
            return Err(HarnessError::Other(format!(
                "applying {}: {}",
                file.display(),
                String::from_utf8_lossy(&applied.stderr)
            )));
        }
        let name = String::from_utf8_lossy(&applied.stdout).trim().to_string();
        wait_established(plane, &name)?;
    }
    Ok(())
}

/// Waits up to 60 s for CRD `name` to be Established. `kubectl wait` fails
/// at once, instead of waiting, when it reads the CRD before the API server
/// has written any status conditions ("accessor error"); that is asked again.
fn wait_established(plane: &ControlPlane, name: &str) -> Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let waited = plane
            .kubectl()
            .args(["wait", "--for=condition=Established", "--timeout=60s", name])
            .output()
            .map_err(HarnessError::io("running kubectl wait"))?;
        if waited.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&waited.stderr);
        if !stderr.contains("accessor error") || std::time::Instant::now() >= deadline {
            return Err(HarnessError::Other(format!("waiting for {name} to be Established: {stderr}")));
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// The directory of `module@version` in the Go module cache, downloading it first if needed.
fn module_dir((module, version): (&str, &str)) -> Result<PathBuf> {
    let cache = std::env::var_os("TIDEPOOL_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cache/tidepool")))
        .ok_or_else(|| HarnessError::Other("neither TIDEPOOL_CACHE nor HOME is set".into()))?;
    let output = Command::new("go")
        .args(["mod", "download", "-json", &format!("{module}@{version}")])
        .env("GOMODCACHE", cache.join("go/mod"))
        .env("GOTOOLCHAIN", "local")
        .env("GOFLAGS", "-mod=mod")
        // Outside any Go module of ours.
        .current_dir(std::env::temp_dir())
        .output()
        .map_err(HarnessError::io(format!("running `go mod download {module}@{version}` (is Go installed?)")))?;
    let answer: serde_json::Value = serde_json::from_slice(&output.stdout).map_err(|e| {
        HarnessError::Other(format!(
            "go mod download {module}@{version} gave no JSON ({e}): {}",
            String::from_utf8_lossy(&output.stderr)
        ))
    })?;
    if let Some(error) = answer["Error"].as_str() {
        return Err(HarnessError::Other(format!("go mod download {module}@{version}: {error}")));
    }
    answer["Dir"]
        .as_str()
        .map(PathBuf::from)
        .ok_or_else(|| HarnessError::Other(format!("go mod download {module}@{version} named no directory")))
}
