//! Set-up shared by the coordinator's integration tests that run the real gRPC server
//! in-process over a sled log the test holds (`bad_input`, `durability`, `streams`; each
//! includes it with `mod support;`): [`serve`] starts that server, usually with
//! [`quick_retries`], and [`connect`] a client of it.

// Every test binary compiles its own copy of this module and uses only part of it; what
// one binary leaves unused would be a dead-code warning there (an error under
// `clippy -D warnings`).
#![allow(dead_code)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use twopc_coordinator::config::ServeConfig;
use twopc_coordinator::log::SledLog;
use twopc_coordinator::server;
use twopc_proto::v1::coordinator_client::CoordinatorClient;

/// A coordinator served in-process by [`serve`].
pub struct Served {
    /// Its gRPC URL, `http://127.0.0.1:<port>`.
    pub url: String,
    /// Stops it when sent to (or dropped).
    pub stop: oneshot::Sender<()>,
    /// The server's task; it ends once the coordinator stopped.
    pub task: JoinHandle<()>,
}

/// Coordinator settings with quick phase-two retries (10 ms, doubling up to 50 ms).
pub fn quick_retries() -> ServeConfig {
    ServeConfig {
        retry_initial_ms: 10,
        retry_max_ms: 50,
        ..ServeConfig::default()
    }
}

/// Serves the coordinator with the settings `cfg` over `log` on a fresh port of
/// 127.0.0.1 (its `listen` address is the port bound); an error it stops with is printed.
pub async fn serve(cfg: ServeConfig, log: Arc<SledLog>) -> Served {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind coordinator");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let res = server::run_with_log(cfg, log, listener, async {
            let _ = stopped.await;
        })
        .await;
        if let Err(e) = res {
            eprintln!("coordinator stopped with an error: {e}");
        }
    });
    Served { url, stop, task }
}

/// A client of the coordinator at `url`, connected within 10 s (it may still be starting).
pub async fn connect(url: &str) -> CoordinatorClient<tonic::transport::Channel> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match CoordinatorClient::connect(url.to_string()).await {
            Ok(c) => return c,
            Err(e) if Instant::now() > deadline => panic!("cannot connect to {url}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}
