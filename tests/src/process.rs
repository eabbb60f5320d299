//! Child processes that log to a file and never outlive their owner.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{HarnessError, Result};

/// A running child process whose output goes to a log file. Dropping it stops it.
pub struct Managed {
    pub name: String,
    pub log: PathBuf,
    child: Child,
}

impl Managed {
    /// Starts `program` with `args`, its output going to `<dir>/<name>.log`.
    pub fn spawn(name: &str, program: &Path, args: &[String], dir: &Path) -> Result<Self> {
        Self::spawn_with_env(name, program, args, &[], dir)
    }

    /// Like [`Managed::spawn`], with extra environment variables.
    pub fn spawn_with_env(
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(String, String)],
        dir: &Path,
    ) -> Result<Self> {
        let log = dir.join(format!("{name}.log"));
        // Appended to: a process started again under the same name (a
        // restarted component) keeps one log.
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(HarnessError::io(format!("opening {}", log.display())))?;
        let err = out.try_clone().map_err(HarnessError::io("cloning a log handle"))?;
        let mut command = Command::new(program);
        command.args(args).envs(env.iter().cloned()).stdin(Stdio::null()).stdout(out).stderr(err).current_dir(dir);
        // Start planes from a thread that lives as long as they do (the
        // test's own, or a runtime worker), not a short-lived blocking thread.
        dies_with_parent(&mut command);
        let child = command.spawn().map_err(HarnessError::io(format!("starting {}", program.display())))?;
        Ok(Self { name: name.to_string(), log, child })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails with the end of the log if the process has already exited.
    pub fn check_running(&mut self) -> Result<()> {
        match self.child.try_wait() {
            Ok(Some(status)) => Err(HarnessError::Exited {
                name: self.name.clone(),
                status,
                log: self.log.clone(),
                tail: tail(&self.log, 30),
            }),
            Ok(None) => Ok(()),
            Err(e) => Err(HarnessError::io(format!("waiting on {}", self.name))(e)),
        }
    }

    /// How the process ended, if it has.
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Kills the process at once (SIGKILL), as a crash would, and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The end of the process's log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }

    /// Asks the process to stop, and kills it if it has not within `grace`.
    pub fn stop(&mut self, grace: Duration) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        // SAFETY: sending a signal to our own child's pid.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = std::time::Instant::now() + grace;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Managed {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(2));
    }
}

/// The last `lines` lines of a log file.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Has the kernel kill `command`'s child with SIGKILL when the thread that
/// started it exits, so a killed test or benchmark leaks no process.
pub fn dies_with_parent(command: &mut Command) -> &mut Command {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: prctl and getppid are async-signal-safe.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if libc::getppid() != parent {
                return Err(std::io::Error::other("the parent exited while starting a child"));
            }
            Ok(())
        })
    }
}
