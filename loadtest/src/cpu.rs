//! Server CPU per delivered notification: the CPU time of each `--cpu-pid NAME=PID`
//! process over the publishing window (publish start → drain end), divided by the
//! deliveries in that window, plus each process's share of the servers' total.

use std::fmt;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde::Serialize;

use crate::proc;

/// Width of the name column; fits `servers total`.
const NAME_WIDTH: usize = 13;

/// One `--cpu-pid NAME=PID`: a process to account CPU time to, under a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuPid {
    /// Label in the report, e.g. `node-a`.
    pub name: String,
    /// Process id.
    pub pid: u32,
}

/// Parses `NAME=PID`, e.g. `redis=4242`.
pub fn parse_cpu_pid(text: &str) -> Result<CpuPid, String> {
    let (name, pid) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not NAME=PID, e.g. node-a=1234"))?;
    let name = name.trim();
    if name.is_empty() {
        return Err(format!("{text:?} has no NAME before '='"));
    }
    if name.chars().any(char::is_control) {
        return Err(format!("{text:?}: NAME has control characters"));
    }
    let pid = pid.trim();
    if pid.is_empty() {
        // What `--cpu-pid redis=$(pgrep redis-server)` gives when nothing matched.
        return Err(format!("{text:?} has no PID after '='"));
    }
    match pid.parse::<u32>() {
        Ok(0) => Err(format!("{text:?}: PID must be above 0")),
        Ok(pid) => Ok(CpuPid {
            name: name.to_owned(),
            pid,
        }),
        Err(_) => Err(format!(
            "{text:?}: PID {pid:?} is not a process id (one number; pgrep may have \
             matched several processes)"
        )),
    }
}

/// Fails if two `--cpu-pid` share a name, since the report could not tell them apart.
pub fn check_unique(pids: &[CpuPid]) -> Result<()> {
    for (i, p) in pids.iter().enumerate() {
        ensure!(
            !pids[..i].iter().any(|q| q.name == p.name),
            "--cpu-pid name {:?} is given more than once",
            p.name
        );
    }
    Ok(())
}

/// Reads the CPU time of every process; an error names the process that is gone.
pub fn sample(pids: &[CpuPid]) -> Result<Vec<Duration>> {
    pids.iter()
        .map(|p| {
            proc::cpu_time_of(p.pid).with_context(|| format!("--cpu-pid {}={}", p.name, p.pid))
        })
        .collect()
}

/// CPU readings at both ends of the publishing window.
#[derive(Debug, Clone)]
pub struct CpuSamples {
    /// The processes, in command-line order.
    pub pids: Vec<CpuPid>,
    /// CPU time of each process when publishing started.
    pub before: Vec<Duration>,
    /// CPU time of each process when the drain ended.
    pub after: Vec<Duration>,
    /// The load generator's own CPU time (parent and workers) over the window, if known.
    pub loadgen: Option<Duration>,
    /// Wall time from the first reading to the second.
    pub window: Duration,
}

/// CPU time and its cost per delivery.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CpuFigure {
    /// CPU seconds over the window.
    pub cpu_secs: f64,
    /// CPU µs per delivered notification; absent without deliveries.
    pub us_per_delivery: Option<f64>,
}

impl CpuFigure {
    fn new(cpu: Duration, deliveries: u64) -> Self {
        let cpu_secs = cpu.as_secs_f64();
        Self {
            cpu_secs,
            us_per_delivery: (deliveries > 0).then(|| cpu_secs * 1e6 / deliveries as f64),
        }
    }
}

/// One process's figures.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProcessCpu {
    /// NAME from `--cpu-pid`.
    pub name: String,
    /// Process id.
    pub pid: u32,
    /// CPU time and per-delivery cost.
    #[serde(flatten)]
    pub cpu: CpuFigure,
    /// Percentage of the servers' total CPU time; absent when the total is zero.
    pub share_pct: Option<f64>,
}

/// The CPU section of the report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CpuReport {
    /// Publish start → drain end, s.
    pub window_secs: f64,
    /// Notifications received by the connections (duplicates included) in the window.
    pub deliveries: u64,
    /// Each `--cpu-pid` process.
    pub processes: Vec<ProcessCpu>,
    /// The sum over all `--cpu-pid` processes.
    pub servers_total: CpuFigure,
    /// The load generator itself (parent and workers), not part of the servers' total.
    pub loadgen: Option<CpuFigure>,
}

impl CpuSamples {
    /// Works out the figures for `deliveries` deliveries in the window.
    pub fn report(&self, deliveries: u64) -> CpuReport {
        let used: Vec<Duration> = self
            .after
            .iter()
            .zip(&self.before)
            // CPU time never goes backwards for one process; saturate rather than trust it.
            .map(|(after, before)| after.saturating_sub(*before))
            .collect();
        let total: Duration = used.iter().sum();
        let processes = self
            .pids
            .iter()
            .zip(&used)
            .map(|(p, &cpu)| ProcessCpu {
                name: p.name.clone(),
                pid: p.pid,
                cpu: CpuFigure::new(cpu, deliveries),
                share_pct: (!total.is_zero())
                    .then(|| 100.0 * cpu.as_secs_f64() / total.as_secs_f64()),
            })
            .collect();
        CpuReport {
            window_secs: self.window.as_secs_f64(),
            deliveries,
            processes,
            servers_total: CpuFigure::new(total, deliveries),
            loadgen: self.loadgen.map(|cpu| CpuFigure::new(cpu, deliveries)),
        }
    }
}

/// Writes one line of the CPU section.
fn write_line(
    f: &mut fmt::Formatter<'_>,
    width: usize,
    name: &str,
    figure: &CpuFigure,
    share_pct: Option<f64>,
) -> fmt::Result {
    let per_delivery = figure
        .us_per_delivery
        .map_or_else(|| "n/a".to_owned(), |us| format!("{us:.1} µs"));
    write!(
        f,
        "  {name:<width$} {:>7.2} s {per_delivery:>10}",
        figure.cpu_secs
    )?;
    match share_pct {
        Some(pct) => writeln!(f, " {pct:>4.0}%"),
        None => writeln!(f),
    }
}

impl fmt::Display for CpuReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "cpu per delivery (publish start → drain end, {:.2} s, {} deliveries)",
            self.window_secs, self.deliveries
        )?;
        let width = self
            .processes
            .iter()
            .map(|p| p.name.chars().count())
            .fold(NAME_WIDTH, usize::max);
        for p in &self.processes {
            write_line(f, width, &p.name, &p.cpu, p.share_pct)?;
        }
        write_line(f, width, "servers total", &self.servers_total, None)?;
        if let Some(loadgen) = &self.loadgen {
            write_line(f, width, "loadgen", loadgen, None)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pid(name: &str, pid: u32) -> CpuPid {
        CpuPid {
            name: name.into(),
            pid,
        }
    }

    #[test]
    fn parses_name_and_pid() {
        assert_eq!(parse_cpu_pid("node-a=1234"), Ok(pid("node-a", 1234)));
        assert_eq!(parse_cpu_pid(" redis = 7 "), Ok(pid("redis", 7)));
        // Only the first '=' separates.
        assert!(parse_cpu_pid("a=b=1").is_err());
    }

    #[test]
    fn rejects_bad_cpu_pids_with_a_reason() {
        for (bad, reason) in [
            ("1234", "is not NAME=PID"),
            ("=1234", "no NAME"),
            ("redis=", "no PID"),
            ("redis=abc", "is not a process id"),
            ("redis=12 34", "is not a process id"),
            ("redis=-1", "is not a process id"),
            ("redis=0", "above 0"),
            ("re\tdis=1", "control characters"),
        ] {
            let err = parse_cpu_pid(bad).err().unwrap_or_default();
            assert!(err.contains(reason), "{bad:?}: {err:?}");
        }
    }

    #[test]
    fn names_must_be_unique() {
        assert!(check_unique(&[pid("a", 1), pid("b", 1)]).is_ok());
        let err = check_unique(&[pid("a", 1), pid("b", 2), pid("a", 3)])
            .err()
            .map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("\"a\"")));
    }

    #[test]
    fn sampling_a_missing_process_names_it() {
        let err = sample(&[pid("node-a", std::process::id()), pid("redis", 5_000_000)])
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default();
        assert!(err.contains("--cpu-pid redis=5000000"), "{err}");
        assert!(err.contains("no process 5000000"), "{err}");
    }

    fn samples() -> CpuSamples {
        CpuSamples {
            pids: vec![pid("node-a", 1), pid("node-b", 2), pid("redis", 3)],
            before: [10_000, 500, 0].map(Duration::from_millis).to_vec(),
            after: [12_100, 4_700, 2_100].map(Duration::from_millis).to_vec(),
            loadgen: Some(Duration::from_millis(1_500)),
            window: Duration::from_millis(25_500),
        }
    }

    #[test]
    fn works_out_cost_per_delivery_and_shares() {
        let r = samples().report(100_000);
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        let secs: Vec<f64> = r.processes.iter().map(|p| p.cpu.cpu_secs).collect();
        assert!(close(secs[0], 2.1) && close(secs[1], 4.2) && close(secs[2], 2.1));
        let us: Vec<f64> = r
            .processes
            .iter()
            .filter_map(|p| p.cpu.us_per_delivery)
            .collect();
        assert!(close(us[0], 21.0) && close(us[1], 42.0) && close(us[2], 21.0));
        let shares: Vec<f64> = r.processes.iter().filter_map(|p| p.share_pct).collect();
        assert!(close(shares[0], 25.0) && close(shares[1], 50.0) && close(shares[2], 25.0));
        assert!(close(r.servers_total.cpu_secs, 8.4));
        assert_eq!(
            r.servers_total.us_per_delivery.map(|u| u.round()),
            Some(84.0)
        );
        assert_eq!(
            r.loadgen.and_then(|l| l.us_per_delivery).map(|u| u.round()),
            Some(15.0)
        );
        assert_eq!(r.deliveries, 100_000);
        assert!(close(r.window_secs, 25.5));
    }

    #[test]
    fn nothing_delivered_or_nothing_used_gives_no_ratios() {
        let r = samples().report(0);
        assert!(r.processes.iter().all(|p| p.cpu.us_per_delivery.is_none()));
        assert!(r.servers_total.us_per_delivery.is_none());

        let mut idle = samples();
        idle.after = idle.before.clone();
        let r = idle.report(10);
        assert!(r.processes.iter().all(|p| p.share_pct.is_none()));
        assert_eq!(r.servers_total.us_per_delivery, Some(0.0));
    }

    #[test]
    fn renders_one_line_per_process_and_the_total() -> Result<()> {
        let text = samples().report(100_000).to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "cpu per delivery (publish start → drain end, 25.50 s, 100000 deliveries)",
                "  node-a           2.10 s    21.0 µs   25%",
                "  node-b           4.20 s    42.0 µs   50%",
                "  redis            2.10 s    21.0 µs   25%",
                "  servers total    8.40 s    84.0 µs",
                "  loadgen          1.50 s    15.0 µs",
            ]
        );
        let json = serde_json::to_value(samples().report(100_000))?;
        assert_eq!(json["processes"][1]["name"], "node-b");
        assert_eq!(json["processes"][1]["pid"], 2);
        assert_eq!(json["processes"][1]["share_pct"], 50.0);
        assert!(json["servers_total"]["cpu_secs"].is_f64());
        Ok(())
    }
}
