//! CPU time by process on this machine, for `slate bench`'s part 4: what a
//! job of each kind costs PostgreSQL, this process and the local S3 server,
//! and how busy the machine was meanwhile. Read from `/proc` (Linux); where
//! it cannot be read, or PostgreSQL or the S3 server run elsewhere, their
//! share reads 0.

use std::time::Instant;

use serde::Serialize;

/// Units of `/proc`'s process times (`USER_HZ`, 100 on Linux whatever the
/// kernel's own tick rate).
const USER_HZ: f64 = 100.0;

/// The S3 server the scripts start (`scripts/services`).
const S3_SERVER: &str = "s3s-fs";

/// CPU seconds used so far.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    at: Instant,
    /// PostgreSQL's processes: the live ones, and the ones that ended (their
    /// time is added to the postmaster's children's).
    postgres: f64,
    this: f64,
    s3: f64,
    /// The whole machine: busy (not idle, not waiting for I/O, not taken
    /// by the hypervisor), waiting for I/O with nothing else to run, and
    /// stolen by the hypervisor for other guests.
    machine: Machine,
}

#[derive(Debug, Clone, Copy, Default)]
struct Machine {
    busy: f64,
    iowait: f64,
    steal: f64,
}

/// Milliseconds of CPU per job between two samples, and the machine's busy
/// cores meanwhile.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct PerJob {
    pub postgres_ms: f64,
    /// This process: the clients, the worker, the instant provider.
    pub bench_ms: f64,
    pub s3_server_ms: f64,
    pub total_ms: f64,
    pub machine_busy_cores: f64,
    /// Cores idle while something waited for the disk: a run that shows
    /// many was bound by I/O (the WAL flush, a checkpoint), not by CPU.
    pub machine_iowait_cores: f64,
    /// Cores the hypervisor gave to other guests (noisy neighbours).
    pub machine_steal_cores: f64,
}

/// Fields after the command name of `/proc/<pid>/stat`, from the state on.
fn stat_fields(stat: &str) -> Vec<&str> {
    stat.rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default()
}

fn ticks(fields: &[&str], from: usize, to: usize) -> f64 {
    (from..=to)
        .filter_map(|i| fields.get(i)?.parse::<f64>().ok())
        .sum::<f64>()
        / USER_HZ
}

pub fn sample() -> Sample {
    let (mut postgres, mut s3) = (0.0, 0.0);
    let entries = std::fs::read_dir("/proc").into_iter().flatten().flatten();
    let mut pids = Vec::new();
    for e in entries {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let comm = comm.trim_end();
        if comm == "postgres" || comm == S3_SERVER {
            pids.push((pid, comm == "postgres"));
        }
    }
    let postgres_pids: Vec<u32> = pids.iter().filter(|p| p.1).map(|p| p.0).collect();
    for (pid, is_postgres) in pids {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let f = stat_fields(&stat);
        // utime and stime (fields 14 and 15 of stat(5); the state is 3).
        let own = ticks(&f, 11, 12);
        if !is_postgres {
            s3 += own;
            continue;
        }
        postgres += own;
        // The postmaster (its parent is not PostgreSQL): add its ended
        // children's time, cutime and cstime (fields 16 and 17).
        let parent = f.get(1).and_then(|p| p.parse::<u32>().ok());
        if !parent.is_some_and(|p| postgres_pids.contains(&p)) {
            postgres += ticks(&f, 13, 14);
        }
    }
    let this = std::fs::read_to_string("/proc/self/stat")
        .map(|s| ticks(&stat_fields(&s), 11, 12))
        .unwrap_or_default();
    let machine = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| machine_times(&s))
        .unwrap_or_default();
    Sample {
        at: Instant::now(),
        postgres,
        this,
        s3,
        machine,
    }
}

/// The machine's times from the first line of /proc/stat: user nice system
/// idle iowait irq softirq steal ..., in USER_HZ.
fn machine_times(proc_stat: &str) -> Option<Machine> {
    let v: Vec<f64> = proc_stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|x| x.parse().ok())
        .collect();
    (v.len() == 8).then(|| Machine {
        busy: (v[0] + v[1] + v[2] + v[5] + v[6]) / USER_HZ,
        iowait: v[4] / USER_HZ,
        steal: v[7] / USER_HZ,
    })
}

impl Sample {
    /// CPU per job for `jobs` jobs done since `earlier`.
    pub fn per_job_since(&self, earlier: &Sample, jobs: usize) -> PerJob {
        let n = jobs.max(1) as f64;
        let ms = |now: f64, then: f64| (now - then).max(0.0) * 1000.0 / n;
        let (postgres_ms, bench_ms, s3_server_ms) = (
            ms(self.postgres, earlier.postgres),
            ms(self.this, earlier.this),
            ms(self.s3, earlier.s3),
        );
        let seconds = (self.at - earlier.at).as_secs_f64().max(1e-3);
        let cores = |now: f64, then: f64| (now - then).max(0.0) / seconds;
        let (m, e) = (self.machine, earlier.machine);
        PerJob {
            postgres_ms,
            bench_ms,
            s3_server_ms,
            total_ms: postgres_ms + bench_ms + s3_server_ms,
            machine_busy_cores: cores(m.busy, e.busy),
            machine_iowait_cores: cores(m.iowait, e.iowait),
            machine_steal_cores: cores(m.steal, e.steal),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_start_after_the_command_name_whatever_it_holds() {
        let stat = "42 (post (gres)) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 7 3 20 0 1 0";
        let f = stat_fields(stat);
        assert_eq!(f[0], "S");
        assert_eq!(f[1], "1");
        assert_eq!(ticks(&f, 11, 12), 3.0);
        assert_eq!(ticks(&f, 13, 14), 0.1);
    }

    #[test]
    fn machine_times_split_busy_from_waiting_and_stolen() {
        let stat = "cpu  100 20 30 5000 40 5 6 70 0 0\ncpu0 50 10 15 2500 20 2 3 35 0 0\n";
        let m = machine_times(stat).unwrap();
        assert_eq!(m.busy, 1.61);
        assert_eq!(m.iowait, 0.4);
        assert_eq!(m.steal, 0.7);
        assert!(machine_times("cpu 1 2 3\n").is_none());
    }

    #[test]
    fn this_process_uses_cpu_and_the_machine_is_busy() {
        // Spin until /proc shows 50 ms of this process's CPU, however busy
        // the machine is (no wall-clock expectation).
        let before = sample();
        let give_up = Instant::now() + std::time::Duration::from_secs(60);
        let mut x = 0u64;
        let mut now = sample();
        while now.this - before.this < 0.05 && Instant::now() < give_up {
            for _ in 0..1_000_000 {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            }
            std::hint::black_box(x);
            now = sample();
        }
        let per = now.per_job_since(&before, 1);
        assert!(per.bench_ms >= 50.0, "{per:?}");
        assert!(per.machine_busy_cores > 0.0, "{per:?}");
        assert_eq!(
            per.total_ms,
            per.postgres_ms + per.bench_ms + per.s3_server_ms
        );
    }
}
