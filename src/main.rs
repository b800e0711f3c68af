//! whipgate: WHIP (WebRTC) ingest to HLS.

mod config;
mod error;
mod hls;
mod http;
mod hub;
mod media;
mod publish;
mod rtc;
mod streams;
mod transcode;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::sync::watch;

use crate::config::{Config, Overrides};

#[derive(Parser)]
#[command(name = "whipgate", version, about = "WHIP (WebRTC) ingest to HLS gateway")]
struct Cli {
    /// Log filter (RUST_LOG syntax).
    #[arg(long, global = true, env = "WHIPGATE_LOG", default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        /// TOML config file; without it the embedded default is used.
        #[arg(long, short, env = "WHIPGATE_CONFIG")]
        config: Option<PathBuf>,
        #[command(flatten)]
        overrides: Overrides,
    },
    /// Check a config file and print the result.
    CheckConfig {
        config: Option<PathBuf>,
        #[command(flatten)]
        overrides: Overrides,
    },
    /// Print the embedded default config.
    DefaultConfig,
    /// Publish a media file (H264 + Opus) to a WHIP endpoint in real time.
    Publish(publish::PublishArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&cli.log))
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    match cli.command {
        Command::Serve { config, overrides } => {
            let config = Config::load(config.as_deref(), &overrides)?;
            runtime.block_on(serve(config))
        }
        Command::CheckConfig { config, overrides } => {
            let c = Config::load(config.as_deref(), &overrides)?;
            eprintln!(
                "config OK: HTTP {}, WebRTC UDP {}, {} stream(s) configured",
                c.server.http_listen,
                c.webrtc.udp_listen,
                c.streams.len()
            );
            Ok(())
        }
        Command::DefaultConfig => {
            print!("{}", config::DEFAULT_TOML);
            Ok(())
        }
        Command::Publish(args) => runtime.block_on(publish::run(args)),
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let config = Arc::new(config);
    let candidate_ips = config.candidate_ips()?;
    anyhow::ensure!(
        !candidate_ips.is_empty(),
        "no address to advertise in ICE candidates: set webrtc.public_addresses"
    );
    std::fs::create_dir_all(config.server.data_dir.join("hls")).with_context(|| {
        format!(
            "creating the data directory {}",
            config.server.data_dir.display()
        )
    })?;
    let rtc = rtc::RtcHandle::start(
        config.webrtc.udp_listen,
        candidate_ips.clone(),
        std::time::Duration::from_secs_f64(config.webrtc.idle_timeout),
    )
    .await
    .with_context(|| format!("binding WebRTC UDP {}", config.webrtc.udp_listen))?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let streams = streams::Streams::new(config.clone(), shutdown_rx);
    let app = http::router(http::AppState {
        streams: streams.clone(),
        rtc: rtc.clone(),
    });
    let listener = tokio::net::TcpListener::bind(config.server.http_listen)
        .await
        .with_context(|| format!("binding HTTP {}", config.server.http_listen))?;
    tracing::info!(
        http = %listener.local_addr()?,
        webrtc_udp = %rtc.local_addr(),
        candidates = ?candidate_ips,
        "whipgate listening; publish to http://HOST:PORT/whip/STREAM, watch /hls/STREAM/index.m3u8"
    );
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown_signal())
    .await?;
    tracing::info!("shutting down: closing sessions and finishing playlists");
    rtc.shutdown().await;
    let _ = shutdown_tx.send(true);
    streams.join_outputs().await;
    tracing::info!("bye");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
