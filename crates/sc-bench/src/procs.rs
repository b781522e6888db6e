//! The server side of a measurement, read from /proc: the process tree under a root pid (the
//! Node server, or sc-master with its balancer, workers and brokers), its summed RSS and CPU.

use std::collections::BTreeMap;
use std::fs;

use serde::Serialize;

/// Resident memory and CPU time of a process tree at one moment.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub(crate) struct Sample {
    pub(crate) processes: usize,
    pub(crate) rss_kb: u64,
    /// User plus system CPU seconds since each process started.
    pub(crate) cpu_sec: f64,
}

/// `root` and every descendant that is alive now.
pub(crate) fn tree(root: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
            if let Some(fields) = stat_fields(pid) {
                // fields[0] is the state, fields[1] the parent pid.
                if fields.first().is_some_and(|s| s != "Z")
                    && let Some(ppid) = fields.get(1).and_then(|s| s.parse().ok())
                {
                    parents.push((pid, ppid));
                }
            }
        }
    }
    let mut all = vec![root];
    let mut i = 0;
    while i < all.len() {
        let parent = all[i];
        all.extend(parents.iter().filter(|(_, ppid)| *ppid == parent).map(|(pid, _)| *pid));
        i += 1;
    }
    all
}

/// RSS and CPU summed over the tree of `root`; zero when `root` is `None`.
pub(crate) fn sample(root: Option<u32>) -> Sample {
    let Some(root) = root else { return Sample::default() };
    let pids = tree(root);
    let ticks = clock_ticks();
    let mut s = Sample { processes: pids.len(), ..Sample::default() };
    for pid in pids {
        s.rss_kb += rss_kb(pid);
        if let Some(fields) = stat_fields(pid) {
            // utime and stime are fields 14 and 15 of /proc/pid/stat, 11 and 12 after the name.
            let t = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            s.cpu_sec += (t(11) + t(12)) as f64 / ticks;
        }
    }
    s
}

/// CPU seconds of each process in the tree of `root`, summed by program name (sc-worker,
/// sc-balancer, node...): where the server's time goes.
pub(crate) fn cpu_by_program(root: Option<u32>) -> BTreeMap<String, f64> {
    let mut by = BTreeMap::new();
    let Some(root) = root else { return by };
    let ticks = clock_ticks();
    for pid in tree(root) {
        let name =
            fs::read_to_string(format!("/proc/{pid}/comm")).map(|s| s.trim().to_owned()).unwrap_or_default();
        if let Some(fields) = stat_fields(pid) {
            let t = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            *by.entry(name).or_insert(0.0) += (t(11) + t(12)) as f64 / ticks;
        }
    }
    by
}

/// RSS in kB of each process in the tree of `root`, summed by program name: which process an
/// idle connection's memory is in.
pub(crate) fn rss_by_program(root: Option<u32>) -> BTreeMap<String, u64> {
    let mut by = BTreeMap::new();
    let Some(root) = root else { return by };
    for pid in tree(root) {
        let name =
            fs::read_to_string(format!("/proc/{pid}/comm")).map(|s| s.trim().to_owned()).unwrap_or_default();
        *by.entry(name).or_insert(0) += rss_kb(pid);
    }
    by
}

/// The difference `after - before` per program.
pub(crate) fn cpu_delta(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
) -> BTreeMap<String, f64> {
    after.iter().map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0))).collect()
}

/// The bench process's own CPU seconds (user + system).
pub(crate) fn self_cpu_sec() -> f64 {
    let ticks = clock_ticks();
    stat_fields(std::process::id())
        .map(|f| {
            let t = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            (t(11) + t(12)) as f64 / ticks
        })
        .unwrap_or(0.0)
}

/// The fields of /proc/pid/stat after the command name.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    Some(rest.split(' ').map(str::to_owned).collect())
}

/// VmRSS of one process in kB; 0 when it is gone.
pub(crate) fn rss_kb(pid: u32) -> u64 {
    let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) else { return 0 };
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// USER_HZ; 100 on every Linux this runs on.
fn clock_ticks() -> f64 {
    100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_has_memory_and_a_tree() {
        let me = std::process::id();
        let s = sample(Some(me));
        assert!(s.rss_kb > 0);
        assert!(s.processes >= 1);
        assert!(tree(me).contains(&me));
    }
}
