//! whipgate: WHIP (WebRTC) ingest to HLS.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use whipgate::config::{self, Config, Overrides};
use whipgate::{publish, server};

#[derive(Parser)]
#[command(
    name = "whipgate",
    version,
    about = "WHIP (WebRTC) ingest to HLS gateway"
)]
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
            runtime.block_on(server::serve(config))
        }
        Command::CheckConfig { config, overrides } => {
            // Loads (and so validates) every preset file too.
            let c = Config::load(config.as_deref(), &overrides)?;
            eprintln!(
                "config OK: HTTP {}, WebRTC UDP {}, {} stream(s) configured, presets: {}",
                c.server.http_listen,
                c.webrtc.udp_listen,
                c.streams.len(),
                c.presets.names().collect::<Vec<_>>().join(", ")
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
