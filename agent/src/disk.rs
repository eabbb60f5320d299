//! Disk size and use over the configured paths, from statvfs.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use tracing::{info, warn};

/// One filesystem's size and use, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct DiskUse {
    pub total: u64,
    pub used: u64,
}

/// Asks the kernel how big the filesystem holding `path` is and how much of
/// it is used (as `df` counts it: blocks less free blocks).
pub fn statvfs(path: &Path) -> io::Result<DiskUse> {
    let c_path = CString::new(path.as_os_str().as_bytes()).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: statvfs only writes into `buf`, which is a plain C struct that
    // may start zeroed; `c_path` is a valid NUL-terminated string that
    // outlives the call.
    let buf = unsafe {
        let mut buf: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c_path.as_ptr(), &mut buf) != 0 {
            return Err(io::Error::last_os_error());
        }
        buf
    };
    let fragment = buf.f_frsize as u64;
    let total = (buf.f_blocks as u64).saturating_mul(fragment);
    // Blocks reserved for root are no room for sessions: only what an
    // unprivileged writer can use counts as free.
    let free = (buf.f_bavail as u64).saturating_mul(fragment);
    Ok(DiskUse { total, used: total.saturating_sub(free) })
}

/// Sums disk use over the configured paths.
#[derive(Debug)]
pub struct Disks {
    paths: Vec<PathBuf>,
    /// Which paths were already warned about, so each is warned about once.
    warned: Vec<bool>,
    /// Devices counted in this sample, reused between samples.
    devices: Vec<u64>,
}

impl Disks {
    pub fn new(paths: Vec<PathBuf>) -> Disks {
        let warned = vec![false; paths.len()];
        Disks { paths, warned, devices: Vec::new() }
    }

    /// The sum over the paths that can be read, and how many could not.
    /// Two paths on one filesystem count once.
    pub fn sample(&mut self) -> (DiskUse, usize) {
        let mut sum = DiskUse::default();
        let mut failed = 0;
        self.devices.clear();
        for (path, warned) in self.paths.iter().zip(self.warned.iter_mut()) {
            let result = std::fs::metadata(path).and_then(|m| Ok((m.dev(), statvfs(path)?)));
            match result {
                Ok((device, disk)) => {
                    if *warned {
                        info!(path = %path.display(), "disk path is readable again");
                        *warned = false;
                    }
                    if self.devices.contains(&device) {
                        continue;
                    }
                    self.devices.push(device);
                    sum.total = sum.total.saturating_add(disk.total);
                    sum.used = sum.used.saturating_add(disk.used);
                }
                Err(error) => {
                    failed += 1;
                    if !*warned {
                        warn!(path = %path.display(), %error, "cannot read disk path; leaving it out");
                        *warned = true;
                    }
                }
            }
        }
        (sum, failed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_has_a_size() {
        let disk = statvfs(Path::new("/")).unwrap();
        assert!(disk.total > 0 && disk.used <= disk.total);
    }

    #[test]
    fn a_missing_path_is_skipped_and_a_filesystem_counts_once() {
        let root = statvfs(Path::new("/")).unwrap();
        let mut disks = Disks::new(vec!["/".into(), "/no/such/path".into(), "/".into()]);
        let (sum, failed) = disks.sample();
        assert_eq!(failed, 1);
        assert_eq!(sum.total, root.total);
        let (_, failed) = disks.sample();
        assert_eq!(failed, 1);
        assert!(statvfs(Path::new("a\0b")).is_err());
    }
}
