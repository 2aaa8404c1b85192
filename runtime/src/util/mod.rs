//! Small helpers with no dependency on the rest of the crate (leaves of
//! the module graph, so no layer imports another just for them).

pub mod dbfile;
pub mod memory;
pub mod pem;
pub mod suggest;

/// This machine's host name: `$HOSTNAME`, else `/etc/hostname`, else the
/// kernel's; `None` when none is set. Default MQTT client ids and peer ids
/// are built from it, so it must be the same at every start.
pub fn host_name() -> Option<String> {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
}
