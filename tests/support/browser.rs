//! Headless Chromium driven over the DevTools protocol (a WebSocket per
//! page): open pages, evaluate JavaScript, take screenshots. Chromium is
//! Debian's `chromium` (scripts/install-deps.sh), started with a fake
//! camera and microphone and no permission prompts.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The Chromium binary: `$CHROMIUM`, else the first of the usual names on
/// the PATH.
pub fn find_chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    for dir in std::env::split_paths(&path) {
        for name in ["chromium", "chromium-browser", "google-chrome"] {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return Some(candidate);
            }
        }
    }
    None
}

/// [`find_chromium`], or a panic that says how to get one.
pub fn chromium() -> PathBuf {
    find_chromium().expect(
        "Chromium is needed for this test: run scripts/install-deps.sh (Debian's `chromium`), \
         or set CHROMIUM to a Chromium or Chrome binary",
    )
}

pub struct Browser {
    child: Option<Child>,
    pub port: u16,
    _profile: tempfile::TempDir,
    stderr: PathBuf,
}

impl Browser {
    pub fn launch(binary: &Path) -> anyhow::Result<Self> {
        let profile = tempfile::tempdir()?;
        let stderr = profile.path().join("chromium.log");
        let mut cmd = Command::new(binary);
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--use-fake-device-for-media-stream",
            "--use-fake-ui-for-media-stream",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--no-default-browser-check",
            "--autoplay-policy=no-user-gesture-required",
            "--disable-background-timer-throttling",
            "--disable-renderer-backgrounding",
            "--disable-backgrounding-occluded-windows",
            "--window-size=1280,800",
            "--remote-debugging-port=0",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("about:blank")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr)?);
        // Its own process group, so that every Chromium process goes with it.
        #[cfg(unix)]
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd.spawn().context("starting chromium")?;
        let mut browser = Browser {
            child: Some(child),
            port: 0,
            _profile: profile,
            stderr,
        };
        let active = browser._profile.path().join("DevToolsActivePort");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let port = std::fs::read_to_string(&active)
                .ok()
                .and_then(|t| t.lines().next().and_then(|l| l.trim().parse().ok()));
            if let Some(port) = port {
                browser.port = port;
                return Ok(browser);
            }
            if let Some(status) = browser
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!("chromium exited at start ({status}):\n{}", browser.log());
            }
            if Instant::now() > deadline {
                bail!("chromium did not start within 30 s:\n{}", browser.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    async fn json(&self, path: &str) -> anyhow::Result<Value> {
        let url = format!("http://127.0.0.1:{}{path}", self.port);
        let client = reqwest::Client::builder().no_proxy().build()?;
        Ok(client.get(&url).send().await?.json().await?)
    }

    /// Opens `url` in a new window (windows, unlike background tabs, are
    /// not throttled nor have their media paused).
    pub async fn open(&self, url: &str) -> anyhow::Result<Page> {
        let version = self.json("/json/version").await?;
        let ws = version["webSocketDebuggerUrl"]
            .as_str()
            .context("no browser WebSocket")?;
        let mut browser = Page::connect(ws).await?;
        let target = browser
            .call(
                "Target.createTarget",
                json!({ "url": url, "newWindow": true }),
            )
            .await?;
        let id = target["targetId"].as_str().context("targetId")?;
        let ws = format!("ws://127.0.0.1:{}/devtools/page/{id}", self.port);
        let mut page = Page::connect(&ws).await?;
        page.call("Page.enable", json!({})).await?;
        page.call("Runtime.enable", json!({})).await?;
        page.call(
            "Emulation.setFocusEmulationEnabled",
            json!({ "enabled": true }),
        )
        .await?;
        // A new window starts on about:blank, itself `complete`, before the
        // navigation to `url` commits: wait for the page itself.
        page.wait_for(
            "location.protocol !== 'about:' && document.readyState === 'complete'",
            Duration::from_secs(20),
        )
        .await?;
        Ok(page)
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // The process group of the browser (see `launch`). Not
            // `kill -KILL -PGID`: procps-ng 4.0.2's kill reads that as
            // kill(-1, SIGKILL), which kills every process of the user (as
            // root: the whole machine). `-s KILL -- -PGID` is kill(-PGID).
            let _ = Command::new("kill")
                .args(["-s", "KILL", "--"])
                .arg(format!("-{}", child.id()))
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub struct Page {
    socket: Socket,
    next_id: u64,
}

impl Page {
    async fn connect(ws: &str) -> anyhow::Result<Self> {
        let (socket, _) = tokio_tungstenite::connect_async(ws)
            .await
            .with_context(|| format!("connecting to {ws}"))?;
        Ok(Page { socket, next_id: 1 })
    }

    /// One DevTools command and its result (events in between are skipped).
    pub async fn call(&mut self, method: &str, params: Value) -> anyhow::Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        let msg = json!({ "id": id, "method": method, "params": params });
        self.socket.send(Message::text(msg.to_string())).await?;
        let deadline = Duration::from_secs(30);
        loop {
            let msg = tokio::time::timeout(deadline, self.socket.next())
                .await
                .with_context(|| format!("{method}: no answer in {deadline:?}"))?
                .context("DevTools connection closed")??;
            let Message::Text(text) = msg else { continue };
            let v: Value = serde_json::from_str(&text)?;
            if v["id"] != id {
                continue;
            }
            if let Some(e) = v.get("error") {
                bail!("{method}: {e}");
            }
            return Ok(v["result"].clone());
        }
    }

    /// Evaluates `expression` in the page (promises awaited), its value
    /// as JSON; a thrown exception is an error.
    pub async fn eval(&mut self, expression: &str) -> anyhow::Result<Value> {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({
                    "expression": expression,
                    "awaitPromise": true,
                    "returnByValue": true,
                    "userGesture": true,
                }),
            )
            .await?;
        if let Some(e) = r.get("exceptionDetails") {
            bail!("{expression}: {e}");
        }
        Ok(r["result"]["value"].clone())
    }

    /// Waits until `expression` is true; its last value in the error.
    pub async fn wait_for(&mut self, expression: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.eval(expression).await;
            if matches!(v, Ok(Value::Bool(true))) {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for `{expression}` (last: {v:?})"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// A PNG of the page as it is shown.
    pub async fn screenshot(&mut self, path: &Path) -> anyhow::Result<()> {
        let r = self
            .call("Page.captureScreenshot", json!({ "format": "png" }))
            .await?;
        let data = r["data"].as_str().context("screenshot data")?;
        let png = base64::engine::general_purpose::STANDARD.decode(data)?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, png)?;
        Ok(())
    }

    pub async fn bring_to_front(&mut self) -> anyhow::Result<()> {
        self.call("Page.bringToFront", json!({})).await.map(|_| ())
    }

    /// Whether this Chromium can send H264 with packetization-mode 1, the
    /// only video the gateway ingests from a browser without encoding it.
    pub async fn sends_h264(&mut self) -> anyhow::Result<bool> {
        let v = self
            .eval(
                "RTCRtpSender.getCapabilities('video').codecs.some(c => \
                 c.mimeType.toLowerCase() === 'video/h264' && \
                 /packetization-mode=1/.test(c.sdpFmtpLine || ''))",
            )
            .await?;
        Ok(v == Value::Bool(true))
    }

    /// On a `/publish/{stream}` page: clicks Start and waits (30 s) until
    /// the session is connected; the page's log in the error.
    pub async fn start_publishing(&mut self) -> anyhow::Result<()> {
        self.eval("document.getElementById('start').click(); true")
            .await?;
        let connected = self
            .wait_for(
                "document.getElementById('state').textContent === 'connected'",
                Duration::from_secs(30),
            )
            .await;
        if let Err(e) = connected {
            let log = self
                .eval("document.getElementById('log').textContent")
                .await;
            bail!("{e}\npage log: {log:?}");
        }
        Ok(())
    }

    /// On a `/watch/{stream}` page: waits until the video has played past
    /// `seconds`, with a picture, and is not paused.
    pub async fn wait_playing(&mut self, seconds: f64, timeout: Duration) -> anyhow::Result<()> {
        let playing = format!(
            "(() => {{ const v = document.getElementById('video'); \
             return v.currentTime > {seconds} && v.videoWidth > 0 && !v.paused; }})()"
        );
        self.wait_for(&playing, timeout).await
    }

    /// Closes the page (its media and timers stop with it).
    pub async fn close(mut self) -> anyhow::Result<()> {
        self.call("Page.close", json!({})).await.map(|_| ())
    }
}
