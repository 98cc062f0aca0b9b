//! OpenTelemetry trace export of the real `twopc serve` process (`--otlp-endpoint`).
//!
//! The collector is a fake one in the test process: a tonic server implementing
//! `opentelemetry.proto.collector.trace.v1.TraceService` on `127.0.0.1:0` that records
//! every export request. A coordinator exporting to it runs one two-phase commit against
//! an in-test participant and is then stopped with SIGTERM; the spans flushed on the way
//! out must name the configured service and carry the transaction's `tx_id`.
//!
//! Every wait is a bounded poll; every test has an overall deadline.

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use support::{begin, commit, wait_until, with_deadline, Coordinator, ResState, TestParticipant};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};
use twopc_proto::v1 as pb;

/// Overall budget of one test.
const TEST_DEADLINE: Duration = Duration::from_secs(60);
/// Budget of one wait for something asynchronous to happen.
const WAIT: Duration = Duration::from_secs(15);

/// A span as the collector received it, with the `service.name` of its resource.
#[derive(Clone, Debug)]
struct ReceivedSpan {
    service_name: Option<String>,
    span: Span,
}

impl ReceivedSpan {
    /// The string value of attribute `key`, if the span has it.
    fn attr(&self, key: &str) -> Option<String> {
        string_attr(&self.span.attributes, key)
    }
}

fn string_attr(attrs: &[KeyValue], key: &str) -> Option<String> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| match &v.value {
            Some(Value::StringValue(s)) => Some(s.clone()),
            _ => None,
        })
}

/// The fake collector: records the spans of every export request.
#[derive(Clone, Default)]
struct FakeCollector {
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
    requests: Arc<Mutex<usize>>,
}

#[tonic::async_trait]
impl TraceService for FakeCollector {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let request = request.into_inner();
        let mut spans = self.spans.lock().unwrap_or_else(|p| p.into_inner());
        for rs in request.resource_spans {
            let service_name = rs
                .resource
                .as_ref()
                .and_then(|r| string_attr(&r.attributes, "service.name"));
            for ss in rs.scope_spans {
                for span in ss.spans {
                    spans.push(ReceivedSpan {
                        service_name: service_name.clone(),
                        span,
                    });
                }
            }
        }
        *self.requests.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl FakeCollector {
    /// Serves the collector on `127.0.0.1:0`; returns its address and the server task.
    async fn start(&self) -> (SocketAddr, JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake collector");
        let addr = listener.local_addr().expect("collector address");
        let service = TraceServiceServer::new(self.clone());
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(TcpIncoming::from(listener))
                .await;
        });
        (addr, task)
    }

    fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_exported_with_service_name_and_tx_id() {
    with_deadline(TEST_DEADLINE, async {
        let collector = FakeCollector::default();
        let (collector_addr, collector_task) = collector.start().await;
        let endpoint = format!("http://{collector_addr}");
        let mut coord = Coordinator::start(&[
            ("--otlp-endpoint", &endpoint),
            ("--otlp-service-name", "twopc-otel-test"),
        ])
        .await;
        let p = TestParticipant::start("p").await;
        let mut c = coord.client().await;

        let tx = begin(&mut c, vec![p.branch("a"), p.branch("b")]).await;
        let resp = commit(&mut c, &tx, 5_000).await.expect("Commit");
        assert_eq!(resp.outcome, pb::Outcome::Committed as i32);
        assert_eq!(p.state(&tx, "a"), Some(ResState::Committed));
        assert_eq!(p.state(&tx, "b"), Some(ResState::Committed));

        // SIGTERM: the coordinator flushes its queued spans on the way out.
        let status = coord.sigterm(WAIT).await;
        assert!(status.success(), "exit after SIGTERM: {status:?}");
        let has_tx_span = |spans: &[ReceivedSpan]| {
            spans
                .iter()
                .any(|s| s.attr("tx_id").as_deref() == Some(tx.as_str()))
        };
        wait_until(WAIT, "the collector received a span with the tx_id", || {
            has_tx_span(&collector.spans())
        })
        .await;

        let spans = collector.spans();
        assert!(!spans.is_empty());
        for s in &spans {
            assert_eq!(
                s.service_name.as_deref(),
                Some("twopc-otel-test"),
                "span {:?} has the configured service.name",
                s.span.name
            );
        }
        let commit_span = spans
            .iter()
            .find(|s| s.span.name == "commit" && s.attr("tx_id").as_deref() == Some(tx.as_str()))
            .unwrap_or_else(|| {
                let names: Vec<_> = spans.iter().map(|s| &s.span.name).collect();
                panic!(
                    "no `commit` span with tx_id {tx}; received {names:?}\n{}",
                    coord.stderr_log()
                )
            });
        assert_eq!(commit_span.span.trace_id.len(), 16, "a valid trace id");
        assert!(
            commit_span.span.end_time_unix_nano >= commit_span.span.start_time_unix_nano,
            "the span ended"
        );
        collector_task.abort();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_collector_does_not_block_transactions() {
    with_deadline(TEST_DEADLINE, async {
        // A port that was free a moment ago: nothing listens there.
        let dead = {
            let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            l.local_addr().expect("address")
        };
        let endpoint = format!("http://{dead}");
        let mut coord = Coordinator::start(&[("--otlp-endpoint", &endpoint)]).await;
        let p = TestParticipant::start("p").await;
        let mut c = coord.client().await;
        for i in 0..5 {
            let tx = begin(
                &mut c,
                vec![p.branch(&format!("a{i}")), p.branch(&format!("b{i}"))],
            )
            .await;
            let resp = tokio::time::timeout(Duration::from_secs(10), commit(&mut c, &tx, 5_000))
                .await
                .expect("Commit is not held up by the collector")
                .expect("Commit");
            assert_eq!(resp.outcome, pb::Outcome::Committed as i32);
        }
        // Stopping is bounded too: the final flush gives up on the dead collector.
        let status = coord.sigterm(WAIT).await;
        assert!(status.success(), "exit after SIGTERM: {status:?}");
    })
    .await;
}
