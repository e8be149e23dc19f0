//! Process facts from `/proc`: resident memory and CPU time of any pid, and the
//! open-files limit.

use std::time::Duration;

use anyhow::{Context, Result, bail};

/// Kernel clock ticks per second as `/proc/<pid>/stat` reports them.
///
/// `/proc` always reports in USER_HZ, which is 100 on every mainstream Linux target;
/// reading it properly needs `sysconf`, which would mean unsafe code.
const USER_HZ: u64 = 100;

/// Resident set size in KiB of `pid`, or of this process when `pid` is `None`.
pub fn rss_kib(pid: Option<u32>) -> Result<u64> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/status"),
        None => "/proc/self/status".to_owned(),
    };
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_vm_rss(&status).with_context(|| format!("no VmRSS line in {path}"))
}

/// Extracts the `VmRSS:` value (in kB) from the text of `/proc/<pid>/status`.
fn parse_vm_rss(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// User plus system CPU time consumed so far by this process.
pub fn cpu_time() -> Result<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").context("reading /proc/self/stat")?;
    let ticks = parse_cpu_ticks(&stat).context("unexpected format of /proc/self/stat")?;
    Ok(ticks_to_duration(ticks))
}

/// User plus system CPU time consumed so far by process `pid` (its threads included).
///
/// Fails if the process does not exist or has exited: an exited process that nobody has
/// reaped yet still has a `stat` file, but its figures no longer mean anything here.
pub fn cpu_time_of(pid: u32) -> Result<Duration> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path)
        .with_context(|| format!("no process {pid} (reading {path})"))?;
    if parse_state(&stat).is_some_and(|state| matches!(state, 'Z' | 'X')) {
        bail!("process {pid} has exited");
    }
    let ticks = parse_cpu_ticks(&stat).with_context(|| format!("unexpected format of {path}"))?;
    Ok(ticks_to_duration(ticks))
}

fn ticks_to_duration(ticks: u64) -> Duration {
    Duration::from_millis(ticks.saturating_mul(1000) / USER_HZ)
}

/// The fields after the command name of `/proc/<pid>/stat`, starting with field 3.
fn fields_after_comm(stat: &str) -> Option<&str> {
    // The command name (field 2) may contain spaces and parentheses, so count fields
    // from the last ')' on.
    Some(&stat[stat.rfind(')')? + 1..])
}

/// The state letter (field 3) of `/proc/<pid>/stat`, e.g. `S`, or `Z` for a zombie.
fn parse_state(stat: &str) -> Option<char> {
    fields_after_comm(stat)?
        .split_whitespace()
        .next()?
        .chars()
        .next()
}

/// Sums utime and stime (fields 14 and 15) from the text of `/proc/<pid>/stat`.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let mut fields = fields_after_comm(stat)?.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Number of ephemeral ports in `net.ipv4.ip_local_port_range`, if readable.
pub fn local_port_count() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    parse_port_range(&text)
}

/// Counts the ports of an `ip_local_port_range` value such as `"32768\t60999"`.
fn parse_port_range(text: &str) -> Option<u64> {
    let mut bounds = text.split_whitespace().map(str::parse::<u64>);
    let low = bounds.next()?.ok()?;
    let high = bounds.next()?.ok()?;
    (high >= low).then(|| high - low + 1)
}

/// Raises the soft RLIMIT_NOFILE to the hard limit and returns the new soft limit.
pub fn raise_nofile_limit() -> Result<u64> {
    rlimit::increase_nofile_limit(u64::MAX).context("raising RLIMIT_NOFILE")
}

/// Fails unless `needed` file descriptors fit under the current soft RLIMIT_NOFILE.
pub fn check_nofile(limit: u64, needed: u64) -> Result<()> {
    if needed > limit {
        bail!(
            "this process needs about {needed} open files but RLIMIT_NOFILE is {limit}; \
             use more --processes"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_vm_rss() {
        let status = "Name:\thub\nVmPeak:\t  999 kB\nVmRSS:\t   45312 kB\nRssAnon:\t 1 kB\n";
        assert_eq!(parse_vm_rss(status), Some(45312));
        assert_eq!(parse_vm_rss("Name:\tkthreadd\n"), None);
    }

    #[test]
    fn parses_cpu_ticks_with_odd_command_names() {
        let stat = "4242 (we ird) name)) S 1 4242 4242 0 -1 4194560 100 0 0 0 \
                    250 75 0 0 20 0 3 0 12345 1000000 500 18446744073709551615";
        assert_eq!(parse_cpu_ticks(stat), Some(325));
        assert_eq!(parse_cpu_ticks("garbage"), None);
        assert_eq!(parse_cpu_ticks("1 (x) S 1 2"), None);
        assert_eq!(parse_state(stat), Some('S'));
        assert_eq!(parse_state("7 (a) b) Z 1"), Some('Z'));
        assert_eq!(parse_state("garbage"), None);
    }

    #[test]
    fn reads_own_process() -> Result<()> {
        assert!(rss_kib(None)? > 0);
        assert!(rss_kib(Some(std::process::id()))? > 0);
        cpu_time()?;
        cpu_time_of(std::process::id())?;
        Ok(())
    }

    #[test]
    fn cpu_time_of_a_missing_process_is_an_error() {
        // Above the largest pid_max Linux allows (2^22), so never a live process.
        let err = cpu_time_of(5_000_000).err().map(|e| format!("{e:#}"));
        assert!(
            err.as_deref()
                .is_some_and(|e| e.contains("no process 5000000")),
            "{err:?}"
        );
    }

    #[test]
    fn parses_port_range() {
        assert_eq!(parse_port_range("32768\t60999\n"), Some(28232));
        assert_eq!(parse_port_range("1024 1024"), Some(1));
        assert_eq!(parse_port_range("60999 32768"), None);
        assert_eq!(parse_port_range("x"), None);
    }

    #[test]
    fn nofile_check() {
        assert!(check_nofile(20_000, 18_100).is_ok());
        assert!(check_nofile(1024, 18_100).is_err());
    }
}
