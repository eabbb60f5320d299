//! Our own programs, built on demand for the tests that run them.

use std::path::PathBuf;

use crate::{HarnessError, Result};

/// Builds `bin` of `package` with the cargo that runs us (a no-op when it is
/// up to date) and returns its path in the target directory we run from.
/// Tests use it for programs of other packages than their own.
pub fn workspace_binary(package: &str, bin: &str) -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = std::process::Command::new(cargo);
    build.args(["build", "--quiet", "-p", package, "--bin", bin]);
    if !cfg!(debug_assertions) {
        build.arg("--release");
    }
    let status = build.status().map_err(HarnessError::io("running cargo build"))?;
    if !status.success() {
        return Err(HarnessError::Other(format!("building {bin} failed: {status}")));
    }
    let here = std::env::current_exe().map_err(HarnessError::io("finding the running program"))?;
    let dir = here.parent().ok_or_else(|| HarnessError::Other("the running program has no directory".into()))?;
    // Test binaries live in target/<profile>/deps; programs one level up.
    let dir = if dir.ends_with("deps") { dir.parent().unwrap_or(dir) } else { dir };
    Ok(dir.join(bin))
}
