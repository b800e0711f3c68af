//! whipgate: WHIP (WebRTC) ingest to HLS.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use whipgate::config::{self, Config, Overrides};
use whipgate::{publish, server};

/// mimalloc: str0m allocates a few times per packet, and segments of a few hundred KiB come
/// and go every couple of seconds per stream.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Log line format: `text` (human-readable) or `json` (one object a
    /// line, with the current span and its parents).
    #[arg(
        long,
        global = true,
        env = "WHIPGATE_LOG_FORMAT",
        value_enum,
        default_value_t = LogFormat::Text
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
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
    init_logging(&cli.log, cli.log_format);
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    match cli.command {
        Command::Serve { config, overrides } => {
            let config = Config::load(config.as_deref(), &overrides)?;
            runtime.block_on(server::serve(config))
        }
        Command::CheckConfig { config, overrides } => {
            // Loads (and so validates) every preset file too.
            let c = Config::load(config.as_deref(), &overrides)?;
            // And the streams defined through the API, as `serve` loads them.
            let state = whipgate::state::StreamStore::open(&c)?;
            eprintln!(
                "config OK: HTTP {}, WebRTC UDP {}, {} stream(s) configured, {} defined through the API ({}), presets: {}",
                c.server.http_listen,
                c.webrtc.udp_listen,
                c.streams.len(),
                state.names().len(),
                c.state_file().display(),
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

/// Logs go to stderr, filtered by `filter`. In JSON every line is one
/// object: `timestamp`, `level`, `target`, `fields` (with `message`),
/// `span` (the innermost span and its fields, e.g. a session's `stream` and
/// `session`) and `spans` (all of them, outermost first).
fn init_logging(filter: &str, format: LogFormat) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .init(),
    }
}
