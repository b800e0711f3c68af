//! A real nginx with the RTMP module (Debian: nginx, libnginx-mod-rtmp,
//! libnginx-mod-stream) on 127.0.0.1 free ports, recording every stream it
//! receives to `DIR/rec/KEY.flv`; optionally an RTMPS endpoint in front of
//! it (the stream module's TLS proxy) with a CA and server certificate made
//! at test time with the `openssl` CLI. Killed on drop.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};

use super::server::{ffmpeg_decode_errors, ffprobe_streams, wait_for};

const MODULES: &str = "/usr/lib/nginx/modules";

pub struct Nginx {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    /// Plain RTMP port.
    pub port: u16,
    /// RTMPS port (TLS proxy to `port`), when started with TLS.
    pub tls_port: Option<u16>,
    /// The CA that signed the RTMPS certificate (PEM), when started with TLS.
    pub ca_file: Option<PathBuf>,
}

fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free TCP port")
}

/// True when nginx and the RTMP module are installed.
pub fn available() -> bool {
    Path::new("/usr/sbin/nginx").exists() && Path::new(MODULES).join("ngx_rtmp_module.so").exists()
}

impl Nginx {
    /// Starts nginx; with `tls`, also the RTMPS proxy.
    pub fn start(tls: bool) -> anyhow::Result<Self> {
        ensure!(
            available(),
            "nginx with libnginx-mod-rtmp is not installed (scripts/install-deps.sh)"
        );
        let dir = tempfile::tempdir()?;
        std::fs::create_dir_all(dir.path().join("rec"))?;
        std::fs::create_dir_all(dir.path().join("logs"))?;
        let port = free_tcp_port();
        let (tls_port, ca_file) = if tls {
            make_certificates(dir.path())?;
            (Some(free_tcp_port()), Some(dir.path().join("ca.crt")))
        } else {
            (None, None)
        };
        let d = dir.path().display();
        let mut conf = String::new();
        conf += &format!("load_module {MODULES}/ngx_rtmp_module.so;\n");
        if tls {
            conf += &format!("load_module {MODULES}/ngx_stream_module.so;\n");
        }
        conf += &format!(
            "master_process off;\nworker_processes 1;\nerror_log {d}/error.log info;\npid {d}/nginx.pid;\n\
             events {{ worker_connections 64; }}\n\
             rtmp {{\n  server {{\n    listen 127.0.0.1:{port};\n    chunk_size 4096;\n\
             \x20   application live {{\n      live on;\n      record all;\n      record_path {d}/rec;\n\
             \x20     record_unique off;\n    }}\n  }}\n}}\n"
        );
        if let Some(tls_port) = tls_port {
            conf += &format!(
                "stream {{\n  server {{\n    listen 127.0.0.1:{tls_port} ssl;\n\
                 \x20   ssl_certificate {d}/server.crt;\n    ssl_certificate_key {d}/server.key;\n\
                 \x20   proxy_pass 127.0.0.1:{port};\n  }}\n}}\n"
            );
        }
        std::fs::write(dir.path().join("nginx.conf"), conf)?;
        let mut nginx = Nginx {
            child: None,
            dir,
            port,
            tls_port,
            ca_file,
        };
        nginx.spawn()?;
        Ok(nginx)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let dir = self.dir.path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("stderr.log"))?;
        let child = Command::new("/usr/sbin/nginx")
            .arg("-p")
            .arg(dir)
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .arg("-g")
            .arg("daemon off;")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting nginx")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        let ports: Vec<u16> = std::iter::once(self.port).chain(self.tls_port).collect();
        loop {
            if ports
                .iter()
                .all(|p| std::net::TcpStream::connect(("127.0.0.1", *p)).is_ok())
            {
                return Ok(());
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                bail!("nginx exited at start ({status}):\n{}", self.log());
            }
            if Instant::now() > deadline {
                bail!("nginx did not listen in time:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills nginx at once (SIGKILL): its connections drop mid-stream.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts nginx again with the same config and ports.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn()
    }

    /// The recording of stream `key`.
    pub fn recording(&self, key: &str) -> PathBuf {
        self.dir.path().join("rec").join(format!("{key}.flv"))
    }

    pub fn rtmp_url(&self, key: &str) -> String {
        format!("rtmp://127.0.0.1:{}/live/{key}", self.port)
    }

    pub fn rtmps_url(&self, key: &str) -> Option<String> {
        self.tls_port
            .map(|p| format!("rtmps://127.0.0.1:{p}/live/{key}"))
    }

    /// nginx's error log and stderr.
    pub fn log(&self) -> String {
        let dir = self.dir.path();
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
        format!("{}{}", read("stderr.log"), read("error.log"))
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A CA and a server certificate for 127.0.0.1 / localhost signed by it.
fn make_certificates(dir: &Path) -> anyhow::Result<()> {
    let run = |args: &[&str]| -> anyhow::Result<()> {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .output()
            .context("running openssl")?;
        ensure!(
            out.status.success(),
            "openssl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    std::fs::write(
        dir.join("server.ext"),
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n\
         extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )?;
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=whipgate test CA",
    ])?;
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ])?;
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "server.ext",
    ])?;
    Ok(())
}

/// ffprobe finds H264 and AAC, a full decode has no error, and the duration
/// is within 10 % of `expected` seconds.
pub async fn check_recording(path: &Path, expected: f64) -> anyhow::Result<()> {
    check_recording_between(path, expected * 0.9, expected * 1.1).await
}

/// As [`check_recording`], with the duration between `min` and `max` s.
pub async fn check_recording_between(path: &Path, min: f64, max: f64) -> anyhow::Result<()> {
    // nginx closes the file when the stream is deleted; let it finish.
    let mut last = 0;
    wait_for("the recording to settle", Duration::from_secs(15), || {
        let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        let settled = len > 0 && len == last;
        last = len;
        settled.then_some(())
    })
    .await?;
    let input = path.to_str().context("path")?;
    let streams = ffprobe_streams(input)?;
    let codecs: Vec<_> = streams.iter().map(|s| s.codec.as_str()).collect();
    ensure!(
        codecs.contains(&"h264") && codecs.contains(&"aac"),
        "{input}: streams {codecs:?}"
    );
    let errors = ffmpeg_decode_errors(input)?;
    ensure!(
        errors.is_empty(),
        "{input} does not decode cleanly:\n{errors}"
    );
    let duration = probe_duration(input)?;
    ensure!(
        (min..=max).contains(&duration),
        "{input}: duration {duration:.2} s, expected {min:.2} to {max:.2} s"
    );
    Ok(())
}

/// Duration from the packets' timestamps (first to last, plus one frame).
fn probe_duration(input: &str) -> anyhow::Result<f64> {
    let out = std::process::Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-select_streams",
            "v",
            "-show_entries",
            "packet=pts_time",
            "-of",
            "csv=p=0",
            input,
        ])
        .output()
        .context("running ffprobe")?;
    let times: Vec<f64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().trim_end_matches(',').parse().ok())
        .collect();
    let (min, max) = times
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), t| (a.min(*t), b.max(*t)));
    ensure!(times.len() > 10, "{input}: {} video packets", times.len());
    Ok(max - min + 1.0 / 30.0)
}
