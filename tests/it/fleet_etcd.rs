//! A three-member etcd cluster on loopback for the fleet tests and `benches/fleet.rs`: each
//! member a child process of Debian's `etcd` (3.4), on free ports, never the system service.

use std::time::{Duration, Instant};

/// A free loopback port (bound, then released for etcd to take).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A three-member etcd cluster on loopback, each member a child process.
pub struct Etcd {
    dir: tempfile::TempDir,
    token: String,
    clients: Vec<u16>,
    peers: Vec<u16>,
    members: Vec<Option<std::process::Child>>,
    /// With [`Etcd::start_tls`]: the client URLs are `https://`, clients must present a
    /// certificate, and these files are what `etcdctl` uses (CA, certificate, key).
    tls: Option<[std::path::PathBuf; 3]>,
}

impl Etcd {
    /// `None` (after printing SKIPPED) when the etcd binary is missing.
    pub fn start(what: &str) -> Option<Etcd> {
        if !Etcd::installed(what) {
            return None;
        }
        Some(Etcd::start_members(3, None))
    }

    /// One member serving clients over TLS only, with client certificates required (mTLS):
    /// `ca`, `cert` and `key` are PEM (the certificate, for `127.0.0.1`, serves as etcd's and
    /// as `etcdctl`'s). `None` (after printing SKIPPED) when the etcd binary is missing.
    pub fn start_tls(what: &str, ca: &str, cert: &str, key: &str) -> Option<Etcd> {
        if !Etcd::installed(what) {
            return None;
        }
        Some(Etcd::start_members(1, Some([ca, cert, key])))
    }

    fn installed(what: &str) -> bool {
        if std::process::Command::new("etcd")
            .arg("--version")
            .output()
            .is_err()
        {
            eprintln!(
                "SKIPPED: etcd not installed ({what}; apt-get install etcd-server etcd-client)"
            );
            return false;
        }
        true
    }

    fn start_members(n: usize, pems: Option<[&str; 3]>) -> Etcd {
        let dir = tempfile::tempdir().unwrap();
        let tls = pems.map(|pems| {
            let paths = ["ca.pem", "cert.pem", "key.pem"].map(|n| dir.path().join(n));
            for (p, pem) in paths.iter().zip(pems) {
                std::fs::write(p, pem).unwrap();
            }
            paths
        });
        let mut etcd = Etcd {
            dir,
            token: uuid::Uuid::new_v4().simple().to_string(),
            clients: (0..n).map(|_| free_port()).collect(),
            peers: (0..n).map(|_| free_port()).collect(),
            members: (0..n).map(|_| None).collect(),
            tls,
        };
        for i in 0..n {
            etcd.start_member(i);
        }
        etcd.wait_healthy();
        etcd
    }

    fn client_scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    fn start_member(&mut self, i: usize) {
        let cluster: Vec<String> = self
            .peers
            .iter()
            .enumerate()
            .map(|(j, p)| format!("m{j}=http://127.0.0.1:{p}"))
            .collect();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("m{i}.log")))
            .unwrap();
        let scheme = self.client_scheme();
        let mut cmd = std::process::Command::new("etcd");
        if let Some([ca, cert, key]) = &self.tls {
            cmd.arg("--cert-file")
                .arg(cert)
                .arg("--key-file")
                .arg(key)
                .arg("--trusted-ca-file")
                .arg(ca)
                .arg("--client-cert-auth");
        }
        let child = cmd
            .args(["--name", &format!("m{i}")])
            .arg("--data-dir")
            .arg(self.dir.path().join(format!("m{i}")))
            .args([
                "--listen-client-urls",
                &format!("{scheme}://127.0.0.1:{}", self.clients[i]),
                "--advertise-client-urls",
                &format!("{scheme}://127.0.0.1:{}", self.clients[i]),
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{}", self.peers[i]),
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{}", self.peers[i]),
                "--initial-cluster",
                &cluster.join(","),
                "--initial-cluster-token",
                &self.token,
                "--initial-cluster-state",
                "new",
                "--heartbeat-interval",
                "50",
                "--election-timeout",
                "500",
            ])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.members[i] = Some(child);
    }

    /// Stops member `i` (kill -9: a member lost, as in a partition).
    pub fn stop_member(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts member `i` again on its data.
    pub fn restart_member(&mut self, i: usize) {
        self.start_member(i);
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.clients
            .iter()
            .map(|p| format!("{}://127.0.0.1:{p}", self.client_scheme()))
            .collect()
    }

    /// `etcdctl` against the cluster.
    pub fn ctl(&self, args: &[&str]) -> std::process::Output {
        let mut cmd = std::process::Command::new("etcdctl");
        if let Some([ca, cert, key]) = &self.tls {
            cmd.arg("--cacert")
                .arg(ca)
                .arg("--cert")
                .arg(cert)
                .arg("--key")
                .arg(key);
        }
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoints().join(",")))
            .args(args)
            .output()
            .unwrap()
    }

    /// Every key under `prefix`.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        let out = self.ctl(&["get", "--prefix", "--keys-only", prefix]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect()
    }

    fn wait_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = self.ctl(&["put", "/health-check", "ok"]);
            if out.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "etcd did not come up: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.stop_member(i);
        }
    }
}
