//! A `redis-server` of the test's own, on a free loopback port with its own directory and
//! configuration, so the test can kill, pause (SIGSTOP) and restart it. Never the machine's
//! shared Redis on 6379. Dropping it resumes (if paused), kills and cleans up.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct TestRedis {
    pub port: u16,
    dir: PathBuf,
    extra: Vec<String>,
    /// A Sentinel: started from `sentinel.conf` in its directory with `--sentinel`.
    sentinel: bool,
    child: Option<Child>,
    paused: bool,
}

/// A loopback port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl TestRedis {
    /// Start on a free port with the default test configuration.
    pub fn start() -> TestRedis {
        Self::start_with(&[])
    }

    /// Start with extra `redis-server` arguments, e.g. `["--maxmemory", "1mb"]`.
    pub fn start_with(extra: &[&str]) -> TestRedis {
        Self::start_on_a_free_port(|| Self::on_port(free_port(), extra))
    }

    /// Spawn what `make` prepares, on another free port if that one was taken meanwhile.
    fn start_on_a_free_port(make: impl Fn() -> TestRedis) -> TestRedis {
        for _ in 0..5 {
            let mut redis = make();
            if redis.spawn() {
                return redis;
            }
        }
        panic!("redis-server did not start (is it installed?)");
    }

    /// A server that is not running yet, for a given port (see [`TestRedis::spawn`]).
    pub fn on_port(port: u16, extra: &[&str]) -> TestRedis {
        let dir = super::temp_path(&format!("redis-{port}"));
        std::fs::create_dir_all(&dir).unwrap();
        TestRedis {
            port,
            dir,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            sentinel: false,
            child: None,
            paused: false,
        }
    }

    /// A Sentinel monitoring the master on `master_port` as `mymaster` (quorum 2), declaring it
    /// down after 1 s without an answer.
    pub fn sentinel(master_port: u16) -> TestRedis {
        Self::start_on_a_free_port(|| {
            let mut s = Self::on_port(free_port(), &[]);
            s.sentinel = true;
            let conf = format!(
                "sentinel monitor mymaster 127.0.0.1 {master_port} 2\n\
                 sentinel down-after-milliseconds mymaster 1000\n\
                 sentinel failover-timeout mymaster 10000\n\
                 sentinel parallel-syncs mymaster 1\n"
            );
            std::fs::write(s.dir.join("sentinel.conf"), conf).unwrap();
            s
        })
    }

    /// Start the process; `true` once it answers PING (within 5 s).
    pub fn spawn(&mut self) -> bool {
        assert!(self.child.is_none(), "already running");
        let mut command = Command::new("redis-server");
        if self.sentinel {
            // Sentinel rewrites its configuration file, so it must be an absolute path.
            command.arg(self.dir.join("sentinel.conf")).arg("--sentinel");
        }
        let child = command
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--logfile", "redis.log", "--protected-mode", "no"])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server runs");
        self.child = Some(child);
        for _ in 0..250 {
            if self.try_command(&["PING"]).is_some_and(|r| r == "+PONG") {
                return true;
            }
            if let Some(Ok(Some(_))) = self.child.as_mut().map(|c| c.try_wait()) {
                self.child = None;
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        false
    }

    /// Whether the process is running (not killed).
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// One field of `INFO` (e.g. `master_link_status`), if present.
    pub fn info_field(&self, field: &str) -> Option<String> {
        let reply = self.raw_command(&["INFO"])?;
        let prefix = format!("{field}:");
        reply.lines().find_map(|l| l.strip_prefix(&prefix)).map(|v| v.trim().to_string())
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            if self.paused {
                self.signal(&child, "CONT");
                self.paused = false;
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start again on the same port with an empty dataset.
    pub fn restart(&mut self) {
        self.kill();
        assert!(self.spawn(), "redis-server restarted on port {}", self.port);
    }

    /// SIGSTOP: the server hangs, its sockets stay open, nothing is answered.
    pub fn pause(&mut self) {
        let child = self.child.as_ref().expect("running");
        self.signal(child, "STOP");
        self.paused = true;
    }

    /// SIGCONT after [`TestRedis::pause`].
    pub fn resume(&mut self) {
        let child = self.child.as_ref().expect("running");
        self.signal(child, "CONT");
        self.paused = false;
    }

    fn signal(&self, child: &Child, sig: &str) {
        let ok = Command::new("kill").arg(format!("-{sig}")).arg(child.id().to_string()).status().unwrap();
        assert!(ok.success(), "kill -{sig}");
    }

    /// One command over RESP; the first reply line (e.g. `+OK`, `:3`, `$5`), panicking on failure.
    pub fn command(&self, args: &[&str]) -> String {
        self.try_command(args).unwrap_or_else(|| panic!("redis command {args:?} failed"))
    }

    /// One command; every reply line (a bulk string's value is the second).
    pub fn reply_lines(&self, args: &[&str]) -> Vec<String> {
        let reply = self.raw_command(args).unwrap_or_else(|| panic!("redis command {args:?} failed"));
        reply.split("\r\n").filter(|l| !l.is_empty()).map(str::to_string).collect()
    }

    fn try_command(&self, args: &[&str]) -> Option<String> {
        self.raw_command(args)?.split("\r\n").next().map(str::to_string)
    }

    fn raw_command(&self, args: &[&str]) -> Option<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        s.write_all(req.as_bytes()).ok()?;
        let mut reply = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = s.read(&mut buf).ok()?;
            reply.extend_from_slice(&buf[..n]);
            // A bulk string (INFO) may take several reads: wait for all of it.
            let text = String::from_utf8_lossy(&reply);
            let complete = match text.strip_prefix('$').and_then(|t| t.split_once("\r\n")) {
                Some((len, rest)) => len.parse::<usize>().map_or(true, |len| rest.len() >= len + 2),
                None => true,
            };
            if n == 0 || complete {
                return Some(text.to_string());
            }
        }
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis Cluster of `masters` nodes without replicas, made with `redis-cli --cluster create`.
pub struct TestCluster {
    pub nodes: Vec<TestRedis>,
    /// Each node's TLS port, when started with TLS.
    tls_ports: Vec<u16>,
}

impl TestCluster {
    pub fn start(masters: usize) -> TestCluster {
        Self::start_with(masters, None)
    }

    /// With `pki`, every node also serves TLS on a port of its own, and the cluster bus runs
    /// over TLS; a TLS client is told the TLS ports in the slot map.
    pub fn start_with(masters: usize, pki: Option<&super::pki::Pki>) -> TestCluster {
        let mut tls_ports = Vec::new();
        let nodes: Vec<TestRedis> = (0..masters)
            .map(|_| {
                // The bus port is set explicitly: the default (port + 10000) may not be free.
                let bus = free_port().to_string();
                let mut args: Vec<String> = [
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                    "--cluster-port",
                    &bus,
                ]
                .map(String::from)
                .into();
                if let Some(pki) = pki {
                    let tls_port = free_port();
                    tls_ports.push(tls_port);
                    args.extend([
                        "--tls-port".into(),
                        tls_port.to_string(),
                        "--tls-cert-file".into(),
                        pki.file("server.pem"),
                        "--tls-key-file".into(),
                        pki.file("server.key"),
                        "--tls-ca-cert-file".into(),
                        pki.file("ca.pem"),
                        "--tls-cluster".into(),
                        "yes".into(),
                        "--tls-auth-clients".into(),
                        "no".into(),
                    ]);
                }
                TestRedis::start_with(&args.iter().map(String::as_str).collect::<Vec<_>>())
            })
            .collect();
        let addrs: Vec<String> = nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli runs");
        assert!(out.status.success(), "cluster create: {}", String::from_utf8_lossy(&out.stdout));
        let cluster = TestCluster { nodes, tls_ports };
        cluster.wait_ok();
        cluster
    }

    /// Wait (up to 10 s) until every running node reports `cluster_state:ok`.
    pub fn wait_ok(&self) {
        for _ in 0..500 {
            if self.nodes.iter().filter(|n| n.running()).all(|n| n.cluster_state().as_deref() == Some("ok")) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("cluster never became ok");
    }

    pub fn url(&self) -> String {
        let addrs: Vec<String> = self.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        format!("redis-cluster://{}", addrs.join(","))
    }

    /// `rediss-cluster://` with the first node's TLS port on `host` as the only seed: the rest
    /// are found through the slot map.
    pub fn tls_url(&self, host: &str) -> String {
        format!("rediss-cluster://{host}:{}", self.tls_ports[0])
    }
}

impl TestRedis {
    /// `cluster_state` from `CLUSTER INFO`.
    pub fn cluster_state(&self) -> Option<String> {
        let reply = self.raw_command(&["CLUSTER", "INFO"])?;
        reply.lines().find_map(|l| l.strip_prefix("cluster_state:")).map(|v| v.trim().to_string())
    }
}
