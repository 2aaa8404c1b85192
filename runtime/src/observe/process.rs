//! The process's own figures, read from `/proc/self` when asked (Linux;
//! elsewhere they are absent).

/// CPU time, memory and threads of this process.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ProcessStats {
    /// User + system CPU time, seconds.
    pub cpu_seconds: f64,
    /// Resident set size, bytes.
    pub resident_bytes: u64,
    pub threads: u64,
    pub open_fds: u64,
    /// When the process started, seconds since 1970.
    pub start_time_seconds: f64,
}

/// The figures now, or `None` where `/proc/self` cannot be read.
pub fn stats() -> Option<ProcessStats> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) is in parentheses and may hold spaces.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields counted from 3 (state): utime 14, stime 15, num_threads 20,
    // starttime 22, rss 24.
    let field = |n: usize| f.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    // SAFETY: sysconf only reads configuration values.
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
    let cpu = (field(14)? + field(15)?) as f64 / tick;
    let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|v| v.trim().parse::<f64>().ok())
    });
    Some(ProcessStats {
        cpu_seconds: cpu,
        resident_bytes: field(24)? * page,
        threads: field(20).unwrap_or(0),
        open_fds: std::fs::read_dir("/proc/self/fd")
            .map(|d| d.count() as u64)
            .unwrap_or(0),
        start_time_seconds: boot.unwrap_or(0.0) + field(22).unwrap_or(0) as f64 / tick,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(target_os = "linux")]
    fn this_process_has_memory_threads_and_a_start() {
        let s = super::stats().expect("linux has /proc/self");
        assert!(s.resident_bytes > 0);
        assert!(s.threads >= 1);
        assert!(s.start_time_seconds > 1.0e9, "{s:?}");
    }
}
