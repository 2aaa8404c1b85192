//! Giving back start-up memory once a pipeline runs.
//!
//! Starting rivulet touches code all over the binary (argument parsing,
//! YAML, TLS set-up, the MQTT client's runtime), and the kernel maps it in
//! chunks, so a running pipeline would show most of its executable as
//! resident although its steady state uses a fraction of it. Once the
//! pipeline has started, [`release_startup_pages`] tells the kernel
//! (`madvise(MADV_DONTNEED)`) that this process no longer needs the
//! read-only mappings of its own executable: the pages stay in the page
//! cache, and the code a running pipeline uses comes back on first use (a
//! minor fault). It also returns freed heap memory (`malloc_trim`).
//!
//! Safe to call at any time from any thread: the mappings are private,
//! read-only views of a file the kernel keeps from being written while it
//! runs.

/// Releases start-up pages (see the module docs). Returns how many KiB of
/// executable mappings were released; 0 where this is not Linux.
pub fn release_startup_pages() -> u64 {
    #[cfg(target_os = "linux")]
    {
        let released = release_executable_mappings();
        #[cfg(target_env = "gnu")]
        // SAFETY: malloc_trim only returns free heap memory to the system.
        unsafe {
            libc::malloc_trim(0);
        }
        released
    }
    #[cfg(not(target_os = "linux"))]
    {
        0
    }
}

#[cfg(target_os = "linux")]
fn release_executable_mappings() -> u64 {
    let Ok(exe) = std::fs::read_link("/proc/self/exe") else {
        return 0;
    };
    let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else {
        return 0;
    };
    let exe = exe.to_string_lossy();
    let mut released = 0;
    for (start, end) in clean_readonly_mappings(&smaps, &exe) {
        // SAFETY: the range is a whole, private, read-only file mapping of
        // this process with no page of its own (no copy-on-write page, such
        // as relocated constants): MADV_DONTNEED drops its page-table
        // entries and the next access reads the same bytes from the file.
        let rc =
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
        if rc == 0 {
            released += ((end - start) / 1024) as u64;
        }
    }
    released
}

/// The read-only mappings of `exe` in `smaps` that hold no anonymous
/// (copied-on-write) page: code and constants as the file has them. The
/// read-only part that relocations wrote to (RELRO) has anonymous pages and
/// is left alone: dropping it would bring back unrelocated bytes.
#[cfg(target_os = "linux")]
fn clean_readonly_mappings(smaps: &str, exe: &str) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut current: Option<(usize, usize)> = None;
    for line in smaps.lines() {
        if let Some((start, end, perms, path)) = parse_line(line) {
            current =
                (path == exe && perms.as_bytes().get(1) == Some(&b'-')).then_some((start, end));
            continue;
        }
        if let (Some(range), Some(kib)) = (current, line.strip_prefix("Anonymous:")) {
            if kib.trim().trim_end_matches("kB").trim() == "0" {
                out.push(range);
            }
            current = None;
        }
    }
    out
}

/// `start-end perms offset dev inode path` → (start, end, perms, path).
#[cfg(target_os = "linux")]
fn parse_line(line: &str) -> Option<(usize, usize, &str, &str)> {
    let mut parts = line.split_whitespace();
    let (range, perms) = (parts.next()?, parts.next()?);
    let path = parts.nth(3)?;
    let (a, b) = range.split_once('-')?;
    let start = usize::from_str_radix(a, 16).ok()?;
    let end = usize::from_str_radix(b, 16).ok()?;
    (end > start).then_some((start, end, perms, path))
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn a_maps_line_is_read() {
        let l = "7ffb00000000-7ffb00002000 r-xp 00001000 08:01 1234 /usr/bin/rivulet";
        assert_eq!(
            parse_line(l),
            Some((0x7ffb00000000, 0x7ffb00002000, "r-xp", "/usr/bin/rivulet"))
        );
        assert_eq!(parse_line("7ffb0000-7ffb1000 rw-p 0 00:00 0"), None);
    }

    #[test]
    fn only_clean_read_only_views_of_the_executable_are_chosen() {
        let smaps = "\
1000-2000 r--p 00000000 08:01 7 /bin/r
Anonymous:             0 kB
2000-5000 r-xp 00001000 08:01 7 /bin/r
Size:                 12 kB
Anonymous:             0 kB
5000-6000 r--p 00004000 08:01 7 /bin/r
Anonymous:             4 kB
6000-7000 rw-p 00005000 08:01 7 /bin/r
Anonymous:             4 kB
8000-9000 r-xp 00000000 08:01 9 /lib/libc.so
Anonymous:             0 kB
";
        assert_eq!(
            clean_readonly_mappings(smaps, "/bin/r"),
            vec![(0x1000, 0x2000), (0x2000, 0x5000)]
        );
    }

    #[test]
    fn releasing_keeps_the_process_working() {
        let before = release_startup_pages();
        // The code of this test binary comes back as it runs.
        let v: Vec<u64> = (0..1000).map(|i| i * i).collect();
        assert_eq!(v[999], 998_001);
        assert!(before > 0, "the test binary's code mappings were found");
    }
}
