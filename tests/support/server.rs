//! Runs the real `whipgate` binary on 127.0.0.1 with free ports and a
//! temporary data directory, and checks its HLS output with ffprobe/ffmpeg.
#![allow(dead_code)]

use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};

pub struct Server {
    child: Option<Child>,
    pub http_port: u16,
    pub udp_port: u16,
    /// The UDP port was picked here (not given with `--udp-listen`).
    udp_picked: bool,
    pub dir: tempfile::TempDir,
    /// The arguments after `whipgate`, for [`Server::restart`].
    args: Vec<String>,
}

pub fn sample_mkv() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("samples/sample.mkv")
}

/// A TCP port on 127.0.0.1 that nothing listens on (right now).
pub fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free TCP port")
}

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("a free UDP port")
}

impl Server {
    /// Starts the server with `config` (TOML, may be empty) and waits until
    /// it answers HTTP.
    pub fn start(config: &str) -> anyhow::Result<Self> {
        Self::start_with_args(config, &[])
    }

    /// As [`Server::start`], with more command-line arguments; a
    /// `--udp-listen` among them replaces the default one.
    pub fn start_with_args(config: &str, args: &[&str]) -> anyhow::Result<Self> {
        let udp_picked = !args.contains(&"--udp-listen");
        let dir = tempfile::tempdir()?;
        let config_path = dir.path().join("whipgate.toml");
        std::fs::write(&config_path, config)?;
        let http_port = free_tcp_port();
        let udp_listen = match args.iter().position(|a| *a == "--udp-listen") {
            Some(i) => args
                .get(i + 1)
                .context("--udp-listen needs a value")?
                .to_string(),
            None => format!("127.0.0.1:{}", free_udp_port()),
        };
        let udp_port = udp_listen
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .context("--udp-listen port")?;
        let mut extra: Vec<&str> = args.to_vec();
        if let Some(i) = extra.iter().position(|a| *a == "--udp-listen") {
            extra.drain(i..(i + 2).min(extra.len()));
        }
        let mut args = vec![
            "serve".to_owned(),
            "--config".to_owned(),
            config_path.display().to_string(),
            "--http-listen".to_owned(),
            format!("127.0.0.1:{http_port}"),
            "--udp-listen".to_owned(),
            udp_listen,
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        args.push("--data-dir".to_owned());
        args.push(dir.path().join("data").display().to_string());
        let mut server = Server {
            child: None,
            http_port,
            udp_port,
            udp_picked,
            dir,
            args,
        };
        server.spawn()?;
        Ok(server)
    }

    /// Starts the process (its log appended to `server.log`) and waits
    /// until it answers HTTP. Ports picked free can be taken by another
    /// test's server in between: then it starts again on new ones.
    fn spawn(&mut self) -> anyhow::Result<()> {
        let mut attempt = 0;
        loop {
            match self.spawn_once() {
                Err(e) if attempt < 4 && e.to_string().contains("in use") => {
                    attempt += 1;
                    self.pick_new_ports();
                }
                other => return other,
            }
        }
    }

    /// New free ports for the ones [`Server::start`] picked (not for a
    /// `--udp-listen` the test gave).
    fn pick_new_ports(&mut self) {
        let http_port = free_tcp_port();
        let old_http = format!("127.0.0.1:{}", self.http_port);
        let old_udp = format!("127.0.0.1:{}", self.udp_port);
        let udp_port = free_udp_port();
        for a in &mut self.args {
            if *a == old_http {
                *a = format!("127.0.0.1:{http_port}");
            } else if *a == old_udp && self.udp_picked {
                *a = format!("127.0.0.1:{udp_port}");
            }
        }
        self.http_port = http_port;
        if self.udp_picked {
            self.udp_port = udp_port;
        }
    }

    fn spawn_once(&mut self) -> anyhow::Result<()> {
        let log_len = std::fs::metadata(self.dir.path().join("server.log")).map_or(0, |m| m.len());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("server.log"))?;
        let child = Command::new(env!("CARGO_BIN_EXE_whipgate"))
            .args(&self.args)
            .env("WHIPGATE_LOG", "info,whipgate=debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting whipgate")?;
        self.child = Some(child);
        let http_port = self.http_port;
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            // Our own process says it listens (another one may answer on
            // the port when ours could not bind it).
            let ours = self
                .log()
                .get(log_len as usize..)
                .is_some_and(|l| l.contains("whipgate listening"));
            if ours && std::net::TcpStream::connect(("127.0.0.1", http_port)).is_ok() {
                return Ok(());
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!("whipgate exited at start ({status}):\n{}", self.log());
            }
            if Instant::now() > deadline {
                bail!("whipgate did not listen within 15 s:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the server (SIGTERM, clean exit) and starts it again with the
    /// same config, ports and data directory.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            let status = self.terminate()?;
            ensure!(status.success(), "whipgate exited with {status}");
        }
        self.spawn()
    }

    /// The server's log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    /// The server's process id (for signals), while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.http_port)
    }

    pub fn hls_dir(&self, stream: &str) -> PathBuf {
        self.dir.path().join("data/hls").join(stream)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// Sends SIGTERM and waits (bounded) for a clean exit.
    pub fn terminate(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        let mut child = self.child.take().context("already stopped")?;
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()?;
        ensure!(status.success(), "kill -TERM failed");
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("whipgate did not exit within 15 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One media playlist, as far as the tests care.
#[derive(Debug)]
pub struct MediaPlaylist {
    pub target_duration: u64,
    pub segments: Vec<(String, f64)>,
    pub ended: bool,
    pub discontinuities: usize,
    pub program_date_times: usize,
}

pub fn read_playlist(path: &Path) -> anyhow::Result<MediaPlaylist> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let p = m3u8_rs::parse_media_playlist_res(text.as_bytes())
        .map_err(|e| anyhow::anyhow!("parsing playlist: {e:?}\n{text}"))?;
    Ok(MediaPlaylist {
        target_duration: p.target_duration,
        segments: p
            .segments
            .iter()
            .map(|s| (s.uri.clone(), s.duration as f64))
            .collect(),
        ended: p.end_list,
        discontinuities: p.segments.iter().filter(|s| s.discontinuity).count(),
        program_date_times: text.matches("#EXT-X-PROGRAM-DATE-TIME:").count(),
    })
}

/// Waits (bounded) until `f` gives `Some`.
pub async fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What ffprobe says of one stream.
#[derive(Debug)]
pub struct ProbedStream {
    pub codec: String,
    pub start_time: f64,
    pub width: Option<u64>,
    pub height: Option<u64>,
    /// Audio: 0 when the stream is declared but carries nothing.
    pub sample_rate: Option<u64>,
}

/// ffprobe of an HLS URL or file: the streams it finds.
pub fn ffprobe_streams(input: &str) -> anyhow::Result<Vec<ProbedStream>> {
    let out = Command::new("ffprobe")
        .args(["-v", "error", "-of", "json", "-show_streams", input])
        .output()
        .context("running ffprobe")?;
    ensure!(
        out.status.success() && out.stderr.is_empty(),
        "ffprobe {input}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let streams = v["streams"].as_array().cloned().unwrap_or_default();
    Ok(streams
        .iter()
        .map(|s| ProbedStream {
            codec: s["codec_name"].as_str().unwrap_or_default().to_owned(),
            start_time: s["start_time"]
                .as_str()
                .and_then(|t| t.parse().ok())
                .unwrap_or(f64::NAN),
            width: s["width"].as_u64(),
            height: s["height"].as_u64(),
            sample_rate: s["sample_rate"].as_str().and_then(|r| r.parse().ok()),
        })
        .collect())
}

/// A full decode with `ffmpeg -v error`: the error output (empty when clean).
pub fn ffmpeg_decode_errors(input: &str) -> anyhow::Result<String> {
    let out = Command::new("ffmpeg")
        // Frames keep their own timestamps, in the input's time base (90 kHz
        // in HLS). By default the decoded frames get a time base of one
        // over the frame rate ffmpeg guesses from the first timestamps; when
        // WebRTC arrival jitter makes it guess low (20 fps for 30), frames
        // round onto the same tick and the null muxer reports "non
        // monotonically increasing dts ... 3 >= 3" for a clean stream (seen
        // in CI; reproduced with `-r 20`, which `-enc_time_base -1` fixes).
        .args(["-nostdin", "-v", "error", "-i", input])
        .args(["-fps_mode", "passthrough", "-enc_time_base", "-1"])
        .args(["-f", "null", "-"])
        .output()
        .context("running ffmpeg")?;
    let mut errors = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        errors.push_str(&format!("\nffmpeg exited with {}", out.status));
    }
    Ok(errors)
}

/// Runs `whipgate publish FILE URL ARGS…` to its end (within `limit`),
/// logging at `log`; panics unless it succeeds, and returns its stderr.
pub async fn publish_cli(
    file: &Path,
    url: &str,
    args: &[&str],
    log: &str,
    limit: Duration,
) -> String {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_whipgate"))
        .arg("publish")
        .arg(file)
        .arg(url)
        .args(args)
        .env("WHIPGATE_LOG", log)
        .output();
    let out = tokio::time::timeout(limit, out)
        .await
        .expect("whipgate publish finished in time")
        .expect("whipgate publish ran");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "whipgate publish: {stderr}");
    stderr
}
