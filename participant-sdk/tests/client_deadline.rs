//! The SDK's own deadline on its calls to the coordinator (`TwoPcBuilder::call_timeout`):
//! a coordinator whose answers do not come (paused, overloaded, cut off on the way back)
//! fails the call at the deadline, naming the coordinator and the setting, instead of
//! holding the caller for as long as the coordinator is gone.
mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use support::{bounded, Coordinator};
use twopc_coordinator::config::ServeConfig;
use twopc_participant::{Error, TwoPc};
use twopc_testkit::proxy::{Direction, Fault, FaultProxy};

const TEST_LIMIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_whose_answers_do_not_come_fails_the_call_at_the_deadline() {
    bounded(TEST_LIMIT, async {
        let coord = Coordinator::start(ServeConfig::default()).await;
        let addr: SocketAddr = coord
            .url
            .trim_start_matches("http://")
            .parse()
            .expect("coordinator address");
        let proxy = FaultProxy::start(addr).await.expect("start the proxy");
        let timeout = Duration::from_millis(300);
        let sdk = TwoPc::builder(proxy.url())
            .service("deadline")
            .recovery_interval(Duration::from_secs(3600))
            .call_timeout(timeout)
            .start()
            .await
            .expect("start the SDK");
        // Answers get through: a transaction begins and aborts.
        let tx = sdk.begin().await.expect("begin");
        tx.abort("warm-up").await.expect("abort");

        // From now on the coordinator's answers are lost, as with a paused process.
        proxy.set(Direction::ServerToClient, Fault::Drop);
        let started = Instant::now();
        let Err(err) = sdk.begin().await else {
            panic!("a begin with no answer succeeded")
        };
        let took = started.elapsed();
        assert!(
            took >= timeout && took < timeout + Duration::from_secs(2),
            "failed after {took:?}, not at its deadline of {timeout:?}: {err}"
        );
        match &err {
            Error::Coordinator(s) => {
                assert_eq!(s.code(), tonic::Code::DeadlineExceeded, "{err}");
                assert!(s.message().contains(&proxy.url()), "{err}");
                assert!(s.message().contains("call_timeout 300 ms"), "{err}");
            }
            other => panic!("expected a coordinator error, got {other:?}"),
        }
        proxy.restore();
        sdk.shutdown().await;
        coord.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_call_timeout_out_of_range_is_refused_naming_it() {
    for bad in [Duration::ZERO, Duration::from_secs(3601)] {
        let err = TwoPc::builder("http://127.0.0.1:1")
            .call_timeout(bad)
            .start()
            .await
            .err()
            .unwrap_or_else(|| panic!("call_timeout {bad:?} was accepted"));
        assert!(
            matches!(&err, Error::Usage(m) if m.contains("call_timeout")),
            "{err}"
        );
    }
}
