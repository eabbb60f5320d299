//! Parsers for the host's `/proc` files: `stat`, `meminfo` and `net/dev`.
//!
//! They are pure functions over `&str` so tests can feed them fixtures, and
//! they write into buffers the caller keeps, so a tick allocates nothing.

use std::collections::HashMap;

use thiserror::Error;

/// Why a `/proc` file could not be read as expected.
#[derive(Debug, Error, PartialEq)]
pub enum ProcError {
    #[error("no per-core cpu lines")]
    NoCores,
    #[error("line {0:?} is not a list of numbers")]
    BadLine(String),
    #[error("no {0} line")]
    Missing(&'static str),
}

/// One core's time since boot, in clock ticks.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CpuTimes {
    /// Time spent neither idle nor waiting for I/O.
    pub busy: u64,
    pub total: u64,
}

/// Reads the per-core lines (`cpu0`, `cpu1`, ...) of `/proc/stat` into `out`.
pub fn parse_stat(text: &str, out: &mut Vec<CpuTimes>) -> Result<(), ProcError> {
    out.clear();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("cpu") else { continue };
        // The aggregate "cpu " line has no number; we want the cores.
        if !rest.starts_with(|c: char| c.is_ascii_digit()) {
            continue;
        }
        // user nice system idle iowait irq softirq steal; guest time is
        // already inside user and nice, so the two guest fields are left out.
        let mut total = 0u64;
        let mut idle = 0u64;
        let mut count = 0;
        for (i, field) in rest.split_ascii_whitespace().skip(1).take(8).enumerate() {
            let value: u64 = field.parse().map_err(|_| ProcError::BadLine(line.to_owned()))?;
            total = total.saturating_add(value);
            if i == 3 || i == 4 {
                idle = idle.saturating_add(value);
            }
            count += 1;
        }
        if count < 4 {
            return Err(ProcError::BadLine(line.to_owned()));
        }
        out.push(CpuTimes { busy: total - idle, total });
    }
    if out.is_empty() {
        return Err(ProcError::NoCores);
    }
    Ok(())
}

/// Each core's use between two readings, in percent, into `out`.
///
/// A core whose counters did not move (or went back, after a core came back
/// online) reads 0.
pub fn core_usage(before: &[CpuTimes], after: &[CpuTimes], out: &mut Vec<f32>) {
    out.clear();
    out.extend(after.iter().enumerate().map(|(i, now)| {
        let then = before.get(i).copied().unwrap_or_default();
        let total = now.total.saturating_sub(then.total);
        let busy = now.busy.saturating_sub(then.busy).min(total);
        if total == 0 { 0.0 } else { (busy as f64 * 100.0 / total as f64) as f32 }
    }));
}

/// Memory figures from `/proc/meminfo`, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct MemInfo {
    pub total: u64,
    pub used: u64,
}

/// Reads `/proc/meminfo`: used is MemTotal less MemAvailable (MemFree on
/// kernels too old to have MemAvailable).
pub fn parse_meminfo(text: &str) -> Result<MemInfo, ProcError> {
    let (mut total, mut available, mut free) = (None, None, None);
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else { continue };
        let slot = match key {
            "MemTotal" => &mut total,
            "MemAvailable" => &mut available,
            "MemFree" => &mut free,
            _ => continue,
        };
        let mut parts = value.split_ascii_whitespace();
        let number: u64 = parts.next().and_then(|n| n.parse().ok()).ok_or_else(|| ProcError::BadLine(line.into()))?;
        let scale = match parts.next() {
            Some("kB") => 1024,
            None => 1,
            Some(_) => return Err(ProcError::BadLine(line.into())),
        };
        *slot = Some(number.saturating_mul(scale));
    }
    let total = total.ok_or(ProcError::Missing("MemTotal"))?;
    let available = available.or(free).ok_or(ProcError::Missing("MemAvailable"))?;
    Ok(MemInfo { total, used: total.saturating_sub(available) })
}

/// Calls `each(interface, rx_bytes, tx_bytes)` for every interface in
/// `/proc/net/dev` except the loopback `lo`.
pub fn parse_net_dev<'a>(text: &'a str, mut each: impl FnMut(&'a str, u64, u64)) -> Result<(), ProcError> {
    for line in text.lines() {
        // The two header lines have no colon after the interface name
        // ("Inter-|" has none; " face |bytes" has none).
        let Some((name, counters)) = line.split_once(':') else { continue };
        let name = name.trim();
        if name == "lo" {
            continue;
        }
        let mut fields = counters.split_ascii_whitespace();
        let bad = || ProcError::BadLine(line.to_owned());
        let rx: u64 = fields.next().and_then(|f| f.parse().ok()).ok_or_else(bad)?;
        // rx has 8 fields (bytes packets errs drop fifo frame compressed
        // multicast); tx bytes is the 9th.
        let tx: u64 = fields.nth(7).and_then(|f| f.parse().ok()).ok_or_else(bad)?;
        each(name, rx, tx);
    }
    Ok(())
}

/// Turns `/proc/net/dev` readings into bytes moved since the last one.
///
/// It follows each interface on its own: on a Kubernetes node pods' veth
/// interfaces come and go, and a plain sum would drop when one goes.
#[derive(Debug, Default)]
pub struct NetCounter {
    interfaces: HashMap<String, Interface>,
    generation: u64,
}

#[derive(Debug)]
struct Interface {
    rx: u64,
    tx: u64,
    seen: u64,
}

impl NetCounter {
    /// Reads one `/proc/net/dev` text and returns (rx, tx) bytes moved since
    /// the previous reading. An interface seen for the first time only sets
    /// its baseline; a counter that went back (a reset) counts from 0.
    pub fn update(&mut self, text: &str) -> Result<(u64, u64), ProcError> {
        self.generation += 1;
        let generation = self.generation;
        let (mut rx_moved, mut tx_moved) = (0u64, 0u64);
        let interfaces = &mut self.interfaces;
        parse_net_dev(text, |name, rx, tx| match interfaces.get_mut(name) {
            Some(known) => {
                rx_moved = rx_moved.saturating_add(if rx >= known.rx { rx - known.rx } else { rx });
                tx_moved = tx_moved.saturating_add(if tx >= known.tx { tx - known.tx } else { tx });
                *known = Interface { rx, tx, seen: generation };
            }
            None => {
                interfaces.insert(name.to_owned(), Interface { rx, tx, seen: generation });
            }
        })?;
        self.interfaces.retain(|_, i| i.seen == generation);
        Ok((rx_moved, tx_moved))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "cpu  10 0 10 80 0 0 0 0 0 0\n\
        cpu0 5 0 5 40 0 0 0 0 0 0\n\
        cpu1 5 0 5 30 10 0 0 0 0 0\n\
        intr 12345 0 0\n\
        ctxt 999\n";

    #[test]
    fn stat_reads_each_core() {
        let mut cores = Vec::new();
        parse_stat(STAT, &mut cores).unwrap();
        assert_eq!(cores, vec![CpuTimes { busy: 10, total: 50 }, CpuTimes { busy: 10, total: 50 }]);
        // The old four-field format still parses.
        parse_stat("cpu0 1 2 3 4\n", &mut cores).unwrap();
        assert_eq!(cores, vec![CpuTimes { busy: 6, total: 10 }]);
    }

    #[test]
    fn stat_refuses_garbage() {
        let mut cores = vec![CpuTimes::default()];
        assert_eq!(parse_stat("", &mut cores), Err(ProcError::NoCores));
        assert_eq!(parse_stat("cpu 1 2 3 4\n", &mut cores), Err(ProcError::NoCores));
        assert!(matches!(parse_stat("cpu0 1 x 3 4\n", &mut cores), Err(ProcError::BadLine(_))));
        assert!(matches!(parse_stat("cpu0 1 2\n", &mut cores), Err(ProcError::BadLine(_))));
    }

    #[test]
    fn usage_is_the_busy_share_of_the_delta() {
        let before = [CpuTimes { busy: 10, total: 100 }, CpuTimes { busy: 0, total: 100 }, CpuTimes::default()];
        let after =
            [CpuTimes { busy: 35, total: 200 }, CpuTimes { busy: 0, total: 100 }, CpuTimes { busy: 5, total: 4 }];
        let mut usage = Vec::new();
        core_usage(&before, &after, &mut usage);
        assert_eq!(usage, vec![25.0, 0.0, 100.0]);
        // A core that appeared since the last reading counts from zero.
        core_usage(&before[..1], &after[..2], &mut usage);
        assert_eq!(usage, vec![25.0, 0.0]);
        // Counters that went back read 0, never a negative share.
        core_usage(&after, &before, &mut usage);
        assert_eq!(usage, vec![0.0, 0.0, 0.0]);
    }

    #[test]
    fn meminfo_used_is_total_less_available() {
        let text = "MemTotal:       16000 kB\nMemFree:         1000 kB\nMemAvailable:    4000 kB\nBuffers: 1 kB\n";
        assert_eq!(parse_meminfo(text), Ok(MemInfo { total: 16000 * 1024, used: 12000 * 1024 }));
        let old = "MemTotal: 100 kB\nMemFree: 40 kB\n";
        assert_eq!(parse_meminfo(old), Ok(MemInfo { total: 100 * 1024, used: 60 * 1024 }));
        assert_eq!(parse_meminfo("MemFree: 1 kB\n"), Err(ProcError::Missing("MemTotal")));
        assert!(matches!(parse_meminfo("MemTotal: lots kB\n"), Err(ProcError::BadLine(_))));
    }

    const NET_DEV: &str = "Inter-|   Receive                                                |  Transmit\n \
        face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    \
        lo: 999999 10 0 0 0 0 0 0 999999 10 0 0 0 0 0 0\n  \
        eth0: 1000 10 0 0 0 0 0 0 2000 20 0 0 0 0 0 0\n\
        veth1:500 1 0 0 0 0 0 0 700 1 0 0 0 0 0 0\n";

    #[test]
    fn net_dev_skips_headers_and_loopback() {
        let mut seen = Vec::new();
        parse_net_dev(NET_DEV, |name, rx, tx| seen.push((name, rx, tx))).unwrap();
        assert_eq!(seen, vec![("eth0", 1000, 2000), ("veth1", 500, 700)]);
        assert!(parse_net_dev("eth0: 1 2 3\n", |_, _, _| {}).is_err());
    }

    #[test]
    fn net_counter_follows_interfaces_that_come_and_go() {
        let mut counter = NetCounter::default();
        assert_eq!(counter.update(NET_DEV), Ok((0, 0)), "the first reading is the baseline");
        let later = "eth0: 1500 0 0 0 0 0 0 0 2100 0 0 0 0 0 0 0\nveth2: 50 0 0 0 0 0 0 0 60 0 0 0 0 0 0 0\n";
        // veth1 went away and veth2 is new: only eth0's growth counts.
        assert_eq!(counter.update(later), Ok((500, 100)));
        let reset = "eth0: 10 0 0 0 0 0 0 0 20 0 0 0 0 0 0 0\nveth2: 60 0 0 0 0 0 0 0 60 0 0 0 0 0 0 0\n";
        assert_eq!(counter.update(reset), Ok((20, 20)));
    }
}
