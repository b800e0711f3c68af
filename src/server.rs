//! `whipgate serve`: binds the sockets, runs HTTP (and HTTPS) and WebRTC until SIGTERM
//! or SIGINT, then closes every session and finishes every playlist.

use std::sync::Arc;

use anyhow::Context;
use axum::serve::Listener;
use tokio::sync::watch;

use crate::config::Config;
use crate::{cluster, http, rtc, state, streams, tls};

pub async fn serve(config: Config) -> anyhow::Result<()> {
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
    crate::hls::storage::install(&config.hls.storage, config.server.data_dir.join("hls"))
        .context("setting up hls.storage")?;
    let rtc = rtc::RtcHandle::start(
        config.webrtc.udp_listen,
        config.webrtc.tcp_listen,
        candidate_ips.clone(),
        std::time::Duration::from_secs_f64(config.webrtc.idle_timeout),
    )
    .await
    .with_context(|| {
        format!(
            "binding WebRTC UDP {} (ICE-TCP {:?})",
            config.webrtc.udp_listen, config.webrtc.tcp_listen
        )
    })?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let store = state::StreamStore::open(&config)?;
    let streams =
        streams::Streams::with_store(config.clone(), Arc::new(store), shutdown_rx.clone());
    let cluster = cluster::Cluster::new(&config.cluster);
    cluster.spawn_polling(shutdown_rx);
    let app = http::router(http::AppState {
        streams: streams.clone(),
        rtc: rtc.clone(),
        cluster,
    });
    let listener = tokio::net::TcpListener::bind(config.server.http_listen)
        .await
        .with_context(|| format!("binding HTTP {}", config.server.http_listen))?;
    let https_listener = match config.tls() {
        Some(source) => {
            let store = tls::CertStore::new(source)?;
            #[cfg(unix)]
            store.reload_on_sighup()?;
            let tcp = tokio::net::TcpListener::bind(config.server.https_listen)
                .await
                .with_context(|| format!("binding HTTPS {}", config.server.https_listen))?;
            Some(tls::TlsListener::new(tcp, store.server_config()?)?)
        }
        None => None,
    };
    tracing::info!(
        http = %listener.local_addr()?,
        https = ?https_listener.as_ref().map(|l| l.local_addr()).transpose()?,
        webrtc_udp = %rtc.local_addr(),
        candidates = ?candidate_ips,
        "whipgate listening; publish to http://HOST:PORT/whip/STREAM, watch /hls/STREAM/index.m3u8"
    );
    // One signal stops both listeners.
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let max_connections = config.server.max_connections;
    let http = http::serve::serve(
        listener,
        app.clone(),
        max_connections,
        stopped(stop_rx.clone()),
    );
    let https = async {
        if let Some(l) = https_listener {
            http::serve::serve(l, app, max_connections, stopped(stop_rx)).await;
        }
    };
    tokio::join!(http, https);
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
