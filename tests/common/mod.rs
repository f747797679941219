//! Helpers for integration tests that boot real guests under /dev/kvm.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The test guest ELF; built by `guest-images/build-testguest.sh` (scripts/test.sh
/// runs it first).
pub fn testguest() -> PathBuf {
    let p = repo_root().join("guest-images/out/testguest.elf");
    assert!(
        p.exists(),
        "{} is missing: run guest-images/build-testguest.sh (scripts/test.sh does)",
        p.display()
    );
    p
}

/// True when /dev/kvm can be used. Without it the test fails, unless
/// WBVMM_ALLOW_NO_KVM=1 is set, in which case it prints a loud SKIPPED line.
pub fn kvm_available(test: &str) -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        if std::env::var("WBVMM_ALLOW_NO_KVM").as_deref() == Ok("1") {
            eprintln!("\n!!! SKIPPED {test}: /dev/kvm is missing or not accessible; nothing was tested !!!\n");
            return false;
        }
        panic!("{test}: /dev/kvm is missing or not accessible (set WBVMM_ALLOW_NO_KVM=1 to skip loudly)");
    }
    true
}

pub struct Output {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Output {
    pub fn show(&self) -> String {
        format!(
            "exit={:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Run wbvmm with `args`, feeding `stdin`, killing it after `timeout`.
pub fn wbvmm(args: &[&str], stdin: Option<&[u8]>, timeout: Duration) -> Output {
    run_with_timeout(
        Command::new(env!("CARGO_BIN_EXE_wbvmm")).args(args),
        stdin,
        timeout,
    )
}

/// Boot the test guest with `cmdline` and extra wbvmm args.
pub fn boot_testguest(cmdline: &str, extra: &[&str], stdin: Option<&[u8]>) -> Output {
    boot_testguest_timeout(cmdline, extra, stdin, Duration::from_secs(60))
}

/// [`boot_testguest`] with a timeout of its own, for guests with long work.
pub fn boot_testguest_timeout(
    cmdline: &str,
    extra: &[&str],
    stdin: Option<&[u8]>,
    timeout: Duration,
) -> Output {
    let kernel = testguest();
    let kernel = kernel.to_str().expect("utf-8 path");
    let mut args = vec![
        "--kernel",
        kernel,
        "--cmdline",
        cmdline,
        "--serial",
        "stdio",
    ];
    args.extend_from_slice(extra);
    wbvmm(&args, stdin, timeout)
}

/// Start wbvmm and watch its stdout until `needle` appears (true) or `timeout`
/// passes (false); the VM is killed either way. Returns what was printed.
pub fn boot_until(args: &[&str], needle: &str, timeout: Duration) -> (bool, String, Duration) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wbvmm"));
    cmd.args(args);
    let mut vm = Running::spawn(cmd, None);
    let found = vm.try_wait_for(needle, timeout);
    let elapsed = vm.start.elapsed();
    let o = vm.kill();
    (found, o.stdout, elapsed)
}

/// Does guest kernel mode run natively here (per `wbvmm probe`)?
pub fn kernel_mode_native() -> bool {
    let o = wbvmm(&["probe", "--json"], None, Duration::from_secs(120));
    let v: serde_json::Value = serde_json::from_str(&o.stdout).expect("probe JSON");
    v["kernel_mode_native"].as_bool().unwrap_or(false)
}

pub fn linux_image(name: &str) -> PathBuf {
    let p = repo_root().join("guest-images/out/linux").join(name);
    assert!(
        p.exists(),
        "{} is missing: run guest-images/build-linux-guest.sh (scripts/setup.sh does)",
        p.display()
    );
    p
}

/// A network namespace with a tap, made for one test and removed when dropped. The
/// host side of the tap is 169.254.NET.1/24; traffic stays inside the namespace.
pub struct NetNs {
    pub name: String,
    pub tap: String,
    pub host_ip: String,
    pub guest_ip: String,
    pids: Vec<u32>,
}

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

impl NetNs {
    /// None (with a loud line) when namespaces cannot be made here (not root, no `ip`).
    pub fn new(tag: &str, net: u8) -> Option<Self> {
        let name = format!("wbvmm-{tag}-{}", std::process::id());
        if !ip(&["netns", "add", &name]) {
            eprintln!("\n!!! SKIPPED {tag}: cannot create a network namespace (need root and iproute2) !!!\n");
            return None;
        }
        let ns = NetNs {
            name,
            tap: "wbt0".into(),
            host_ip: format!("169.254.{net}.1"),
            guest_ip: format!("169.254.{net}.2"),
            pids: Vec::new(),
        };
        let ok = ns.exec_ok(&["ip", "link", "set", "lo", "up"])
            && ns.exec_ok(&["ip", "tuntap", "add", &ns.tap, "mode", "tap"])
            && ns.exec_ok(&[
                "ip",
                "addr",
                "add",
                &format!("{}/24", ns.host_ip),
                "dev",
                &ns.tap,
            ])
            && ns.exec_ok(&["ip", "link", "set", &ns.tap, "up"]);
        assert!(ok, "setting up the tap in {} failed", ns.name);
        Some(ns)
    }

    pub fn exec_ok(&self, cmd: &[&str]) -> bool {
        let mut args = vec!["netns", "exec", &self.name];
        args.extend_from_slice(cmd);
        ip(&args)
    }

    /// Start a process inside the namespace; it is killed (by PID) on drop.
    pub fn spawn(&mut self, cmd: &[&str]) -> u32 {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(cmd)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn in namespace");
        let pid = child.id();
        self.pids.push(pid);
        // Reaped by nobody: the test process ends soon, and Drop kills it by PID.
        std::mem::forget(child);
        pid
    }

    /// A TCP echo server (socat) on `port`, bounded to `secs` seconds; returns once
    /// it listens.
    pub fn echo_server(&mut self, port: u16, secs: u32) {
        let listen = format!("TCP-LISTEN:{port},reuseaddr,fork");
        let secs = secs.to_string();
        self.spawn(&["timeout", &secs, "socat", &listen, "PIPE"]);
        self.wait_listen(port);
    }

    /// Wait until something listens on TCP `port` inside the namespace.
    pub fn wait_listen(&self, port: u16) {
        let listening = wait_until(STARTUP_DEADLINE, || {
            let out = Command::new("ip")
                .args(["netns", "exec", &self.name, "ss", "-Hltn"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            out.contains(&format!(":{port} "))
        });
        assert!(
            listening,
            "socat did not listen on port {port} within {STARTUP_DEADLINE:?}"
        );
    }

    /// A command that runs wbvmm inside the namespace (for [`Running::spawn`]).
    pub fn wbvmm_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, env!("CARGO_BIN_EXE_wbvmm")])
            .args(args);
        cmd
    }

    /// Run wbvmm inside the namespace.
    pub fn wbvmm(&self, args: &[&str], timeout: Duration) -> Output {
        let mut full = vec![
            "netns",
            "exec",
            self.name.as_str(),
            env!("CARGO_BIN_EXE_wbvmm"),
        ];
        full.extend_from_slice(args);
        run_with_timeout(Command::new("ip").args(&full), None, timeout)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        for pid in &self.pids {
            // SAFETY: signals only processes this test started.
            unsafe {
                libc::kill(*pid as i32, libc::SIGTERM);
            }
        }
        ip(&["netns", "del", &self.name]);
    }
}

/// How long a test waits for a guest or a helper process to reach a state before it
/// calls the run failed. Only the failure path ever waits this long: every wait
/// polls for its condition and returns as soon as it holds, on any machine.
pub const STARTUP_DEADLINE: Duration = Duration::from_secs(120);

/// Poll `cond` every 20 ms until it holds (true) or `deadline` passes (false).
pub fn wait_until(deadline: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if cond() {
            return true;
        }
        if start.elapsed() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A running wbvmm that a test talks to while it runs: it waits for the guest's
/// lines, writes to the guest's console, asks for statistics snapshots (SIGUSR1),
/// and ends it. Tests use it to drive guest and host work by conditions, never by
/// sleeps; see the test guest's `hold` word.
pub struct Running {
    child: std::process::Child,
    stdin: Option<std::process::ChildStdin>,
    lines: std::sync::mpsc::Receiver<String>,
    stdout: String,
    /// When each line arrived, since the start.
    line_times: Vec<(Duration, String)>,
    stderr: std::thread::JoinHandle<String>,
    stats: Option<PathBuf>,
    start: Instant,
}

impl Running {
    /// Start `cmd` (wbvmm, directly or through `ip netns exec`, which execs it, so
    /// the child's PID is wbvmm's) with its console on pipes. `stats` is the
    /// `--stats=PATH` file the command was given, for [`Running::snapshot`].
    pub fn spawn(mut cmd: Command, stats: Option<PathBuf>) -> Self {
        use std::io::BufRead;
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn wbvmm");
        let out = child.stdout.take().expect("stdout");
        let mut err = child.stderr.take().expect("stderr");
        let (tx, lines) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            let mut r = std::io::BufReader::new(out);
            let mut line = Vec::new();
            while let Ok(n) = r.read_until(b'\n', &mut line) {
                if n == 0
                    || tx
                        .send(String::from_utf8_lossy(&line).into_owned())
                        .is_err()
                {
                    break;
                }
                line.clear();
            }
        });
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        Running {
            stdin: child.stdin.take(),
            child,
            lines,
            stdout: String::new(),
            line_times: Vec::new(),
            stderr,
            stats,
            start: Instant::now(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The `--stats=PATH` file given at spawn.
    pub fn stats_path(&self) -> Option<PathBuf> {
        self.stats.clone()
    }

    /// What the guest printed so far.
    pub fn stdout(&self) -> &str {
        &self.stdout
    }

    /// Wait until the guest printed `needle`: true, or false when wbvmm ended or
    /// `deadline` passed first.
    pub fn try_wait_for(&mut self, needle: &str, deadline: Duration) -> bool {
        let start = Instant::now();
        while !self.stdout.contains(needle) {
            let left = deadline.saturating_sub(start.elapsed());
            match self
                .lines
                .recv_timeout(left.min(Duration::from_millis(200)))
            {
                Ok(l) => self.take_line(l),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) if !left.is_zero() => {}
                Err(_) => return false,
            }
        }
        true
    }

    /// Wait until the guest printed `needle`; panics with everything printed so
    /// far (and the VM killed) when it ends or `deadline` passes first.
    pub fn wait_for(&mut self, needle: &str, deadline: Duration) {
        let start = Instant::now();
        if !self.try_wait_for(needle, deadline) {
            let o = self.kill();
            panic!(
                "waited for '{needle}' (wbvmm ended or {:?} passed)\n{}",
                start.elapsed(),
                o.show()
            );
        }
    }

    fn take_line(&mut self, l: String) {
        self.line_times.push((self.start.elapsed(), l.clone()));
        self.stdout.push_str(&l);
    }

    /// When the first line containing `needle` arrived (since the start), if it did.
    pub fn seen_at(&self, needle: &str) -> Option<Duration> {
        self.line_times
            .iter()
            .find(|(_, l)| l.contains(needle))
            .map(|(t, _)| *t)
    }

    /// "name 12.3 s, ..." for each (name, needle) seen so far; "-" for the others.
    pub fn stage_times(&self, stages: &[(&str, &str)]) -> String {
        stages
            .iter()
            .map(|(name, needle)| match self.seen_at(needle) {
                Some(t) => format!("{name} {:.1} s", t.as_secs_f64()),
                None => format!("{name} -"),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Write `line` and a newline to the guest's console.
    pub fn send_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin is open");
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|()| stdin.flush())
            .expect("write to the guest's console");
    }

    /// A fresh statistics snapshot of the running VM: SIGUSR1, then the `--stats`
    /// file once it holds a complete snapshot written after the signal.
    pub fn snapshot(&mut self) -> serde_json::Value {
        let path = self
            .stats
            .clone()
            .expect("spawned with a --stats=PATH file");
        let _ = std::fs::remove_file(&path);
        // SAFETY: signals only the process this test started.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGUSR1);
        }
        let mut snap = None;
        let ok = wait_until(STARTUP_DEADLINE, || {
            snap = std::fs::read_to_string(&path)
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
            snap.is_some()
        });
        assert!(
            ok,
            "no statistics snapshot in {} after SIGUSR1",
            path.display()
        );
        snap.unwrap_or_default()
    }

    /// Take snapshots until `cond` holds for one; returns it. Panics (VM killed,
    /// last snapshot shown) when `deadline` passes first.
    pub fn wait_for_stats(
        &mut self,
        what: &str,
        deadline: Duration,
        cond: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let start = Instant::now();
        loop {
            let v = self.snapshot();
            if cond(&v) {
                return v;
            }
            if start.elapsed() > deadline {
                let o = self.kill();
                panic!(
                    "waited {deadline:?} for {what}; last snapshot:\n{v:#}\n{}",
                    o.show()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Close the console and wait for wbvmm to end by itself; killed (status None)
    /// only if it is still running after `deadline`.
    pub fn finish(&mut self, deadline: Duration) -> Output {
        drop(self.stdin.take());
        let start = Instant::now();
        let code = loop {
            if let Some(st) = self.child.try_wait().expect("wait") {
                break st.code();
            }
            if start.elapsed() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        self.collect(code)
    }

    /// End the VM now (SIGKILL to the process this test started) and collect it.
    pub fn kill(&mut self) -> Output {
        let _ = self.child.kill();
        let code = self.child.wait().ok().and_then(|s| s.code());
        self.collect(code)
    }

    fn drain_stdout(&mut self) -> String {
        // The reader thread ends with the process: take every line it has.
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.take_line(l);
        }
        std::mem::take(&mut self.stdout)
    }

    fn collect(&mut self, code: Option<i32>) -> Output {
        let stdout = self.drain_stdout();
        let stderr = std::mem::replace(&mut self.stderr, std::thread::spawn(String::new));
        Output {
            code,
            stdout,
            stderr: stderr.join().unwrap_or_default(),
            elapsed: self.start.elapsed(),
        }
    }
}

/// The `--stats=PATH` report a finished VM left, parsed, and the file removed;
/// panics with the VM's output when there is none.
pub fn take_final_stats(path: &std::path::Path, vm: &Output) -> serde_json::Value {
    let v = serde_json::from_str(&std::fs::read_to_string(path).unwrap_or_default())
        .unwrap_or_else(|e| panic!("final statistics in {}: {e}\n{}", path.display(), vm.show()));
    let _ = std::fs::remove_file(path);
    v
}

/// A path for a `--stats=PATH` file of one test, removed first.
pub fn stats_file(tag: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("wbvmm-{tag}-{}.json", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p
}

/// Run a prepared command with a timeout, capturing its output.
pub fn run_with_timeout(cmd: &mut Command, stdin: Option<&[u8]>, timeout: Duration) -> Output {
    let mut child = cmd
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input)
            .expect("write stdin");
    }
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    let code = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st.code();
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        code,
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
        elapsed: start.elapsed(),
    }
}
