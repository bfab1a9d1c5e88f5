//! The soak's process supervisor: starts the `serve` and `work` processes,
//! SIGKILLs and restarts workers on request, and restarts any process that
//! exits on its own (as a real supervisor would), recording that it did.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Serve,
    Work,
}

struct Proc {
    name: String,
    kind: Kind,
    env: Vec<(String, String)>,
    child: Option<Child>,
    started: Instant,
    restart_at: Option<Instant>,
    starts: u32,
    /// PostgreSQL was down when this run of it started.
    started_in_pg_outage: bool,
    /// Where this run's output starts in its log (runs append to one file).
    log_start: u64,
}

/// An exit nobody asked for.
#[derive(Debug, Clone)]
pub struct Exit {
    pub name: String,
    pub status: String,
    pub uptime: Duration,
    /// PostgreSQL was down when it started or when it exited (a start that
    /// could not connect; PostgreSQL may be back, but still recovering,
    /// by the time the start gives up).
    pub during_pg_outage: bool,
    /// `slate work`'s watchdog stopped it because one of its job workers
    /// had gone silent (see workers/src/runtime.rs): that worker's queue,
    /// as the watchdog's line names it.
    pub silent_queue: Option<String>,
    /// The exit code (none when a signal ended it).
    pub code: Option<i32>,
}

impl Exit {
    /// `slate work`'s watchdog stopped it: its line, and the failure exit
    /// `slate work` makes after it (1), not a panic's (101) or a signal.
    pub fn watchdog(&self) -> bool {
        self.silent_queue.is_some() && self.code == Some(1)
    }
}

/// The queue named by the watchdog's line in a run's output, if it stopped
/// the process.
fn silent_queue(output: &str) -> Option<String> {
    let line = output.lines().find(|l| l.contains(WATCHDOG_LINE))?;
    let queue = serde_json::from_str::<serde_json::Value>(line)
        .ok()
        .and_then(|v| v.get("queue").and_then(|q| q.as_str()).map(str::to_owned));
    Some(queue.unwrap_or_else(|| "?".to_owned()))
}

/// What `slate work` logs when its watchdog stops it.
const WATCHDOG_LINE: &str = "stopped heartbeating without an error";

pub struct Supervisor {
    bin: PathBuf,
    logs: PathBuf,
    pids: PathBuf,
    procs: Vec<Proc>,
    pub kills: u32,
    pub exits: Vec<Exit>,
}

impl Supervisor {
    pub fn new(bin: PathBuf, state: &Path) -> Self {
        Self {
            bin,
            logs: state.join("logs"),
            pids: state.join("pids"),
            procs: Vec::new(),
            kills: 0,
            exits: Vec::new(),
        }
    }

    pub fn add(
        &mut self,
        name: &str,
        kind: Kind,
        env: Vec<(String, String)>,
    ) -> anyhow::Result<()> {
        self.procs.push(Proc {
            name: name.to_owned(),
            kind,
            env,
            child: None,
            started: Instant::now(),
            restart_at: None,
            starts: 0,
            started_in_pg_outage: false,
            log_start: 0,
        });
        let i = self.procs.len() - 1;
        self.spawn(i, false)
    }

    fn spawn(&mut self, i: usize, pg_down: bool) -> anyhow::Result<()> {
        let p = &mut self.procs[i];
        let log_path = self.logs.join(format!("{}.log", p.name));
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        p.log_start = log.metadata()?.len();
        let child = Command::new(&self.bin)
            .arg(match p.kind {
                Kind::Serve => "serve",
                Kind::Work => "work",
            })
            .envs(p.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        std::fs::write(
            self.pids.join(format!("{}.pid", p.name)),
            child.id().to_string(),
        )?;
        p.child = Some(child);
        p.started = Instant::now();
        p.restart_at = None;
        p.starts += 1;
        p.started_in_pg_outage = pg_down;
        Ok(())
    }

    /// Reap exits and start what is due. `pg_down`: PostgreSQL is down now.
    pub fn tick(&mut self, pg_down: bool) -> anyhow::Result<()> {
        let now = Instant::now();
        for i in 0..self.procs.len() {
            let p = &mut self.procs[i];
            if let Some(child) = &mut p.child
                && let Some(status) = child.try_wait()?
            {
                // This run's whole output: a watchdog stop is followed by
                // the shutdown's own lines (in-flight jobs finishing), more
                // than 8 KiB of them in one soak.
                let tail = std::fs::read(self.logs.join(format!("{}.log", p.name)))
                    .map(|b| {
                        let start = usize::try_from(p.log_start).unwrap_or(0).min(b.len());
                        String::from_utf8_lossy(&b[start..]).into_owned()
                    })
                    .unwrap_or_default();
                self.exits.push(Exit {
                    silent_queue: silent_queue(&tail),
                    name: p.name.clone(),
                    status: status.to_string(),
                    code: status.code(),
                    uptime: p.started.elapsed(),
                    during_pg_outage: pg_down || p.started_in_pg_outage,
                });
                p.child = None;
                p.restart_at = Some(now + Duration::from_secs(2));
            }
            if p.child.is_none() && p.restart_at.is_some_and(|t| t <= now) {
                self.spawn(i, pg_down)?;
            }
        }
        Ok(())
    }

    /// A running worker (`pick` chooses among them): its index and pid.
    pub fn pick_worker(&self, pick: impl FnOnce(usize) -> usize) -> Option<(usize, u32)> {
        let running: Vec<usize> = (0..self.procs.len())
            .filter(|&i| self.procs[i].kind == Kind::Work && self.procs[i].child.is_some())
            .collect();
        if running.is_empty() {
            return None;
        }
        let i = running[pick(running.len()) % running.len()];
        self.procs[i].child.as_ref().map(|c| (i, c.id()))
    }

    /// SIGKILL process `i` if it is still the one with `pid`, and restart it
    /// after `restart_in`. Returns its name.
    pub fn kill(
        &mut self,
        i: usize,
        pid: u32,
        restart_in: Duration,
    ) -> anyhow::Result<Option<String>> {
        let p = &mut self.procs[i];
        if p.child.as_ref().map(Child::id) != Some(pid) {
            return Ok(None);
        }
        let Some(mut child) = p.child.take() else {
            return Ok(None);
        };
        child.kill()?; // SIGKILL
        child.wait()?;
        p.restart_at = Some(Instant::now() + restart_in);
        self.kills += 1;
        Ok(Some(format!("{} (pid {pid})", p.name)))
    }

    /// (name, pid) of every running process of `kind`.
    pub fn running(&self, kind: Kind) -> Vec<(String, u32)> {
        self.procs
            .iter()
            .filter(|p| p.kind == kind)
            .filter_map(|p| p.child.as_ref().map(|c| (p.name.clone(), c.id())))
            .collect()
    }

    /// Every process is running.
    pub fn all_running(&self) -> bool {
        self.procs.iter().all(|p| p.child.is_some())
    }

    pub fn starts(&self) -> u32 {
        self.procs.iter().map(|p| p.starts).sum()
    }

    /// SIGTERM everything, wait up to `grace` for each to exit, then
    /// SIGKILL. Returns the names of those that had to be killed, and of
    /// those that exited with a failure.
    pub fn stop_all(&mut self, grace: Duration) -> (Vec<String>, Vec<String>) {
        for p in &self.procs {
            if let Some(c) = &p.child {
                let _ = Command::new("kill")
                    .arg("-TERM")
                    .arg(c.id().to_string())
                    .status();
            }
        }
        let deadline = Instant::now() + grace;
        let (mut killed, mut failed) = (Vec::new(), Vec::new());
        for p in &mut self.procs {
            let Some(mut c) = p.child.take() else {
                continue;
            };
            loop {
                match c.try_wait() {
                    Ok(Some(status)) => {
                        if !status.success() {
                            failed.push(format!("{} ({status})", p.name));
                        }
                        break;
                    }
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    _ => {
                        let _ = c.kill();
                        let _ = c.wait();
                        killed.push(p.name.clone());
                        break;
                    }
                }
            }
        }
        (killed, failed)
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        for p in &mut self.procs {
            if let Some(c) = &mut p.child {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_watchdog_line_names_the_silent_queue() {
        let output = r#"{"level":"INFO","message":"worker started"}
{"level":"ERROR","message":"a job worker stopped heartbeating without an error; stopping the process so that its supervisor starts it again","queue":"slate.maintenance","silent_for_s":30}
{"level":"INFO","message":"worker stopped"}"#;
        assert_eq!(
            super::silent_queue(output).as_deref(),
            Some("slate.maintenance")
        );
        assert_eq!(super::silent_queue("worker stopped"), None);
        assert_eq!(
            super::silent_queue("ERROR stopped heartbeating without an error").as_deref(),
            Some("?")
        );
    }
}
