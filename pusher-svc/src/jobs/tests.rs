use super::*;
use shared::proto::pusher::v1::Structured;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::sync::Notify;

/// A processor that blocks until released, counting how often it ran.
struct Gated {
    calls: AtomicUsize,
    release: Notify,
    fail: Option<ProcessError>,
}

impl Gated {
    fn new(fail: Option<ProcessError>) -> Arc<Self> {
        Arc::new(Gated {
            calls: AtomicUsize::new(0),
            release: Notify::new(),
            fail,
        })
    }
}

#[async_trait::async_trait]
impl Processor for Gated {
    async fn process(&self, request: &ProcessConversation) -> Result<Processed, ProcessError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.release.notified().await;
        match &self.fail {
            Some(error) => Err(error.clone()),
            None => Ok(Processed {
                structured: Some(Structured {
                    title: format!("title of {}", request.conversation_id),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        }
    }
}

fn config() -> JobsConfig {
    JobsConfig {
        max_concurrency: 2,
        max_queued: 1,
        cache_size: 2,
        cache_ttl: Duration::from_secs(60),
        progress_interval: Duration::from_secs(5),
        busy_retry_after: Duration::from_millis(750),
    }
}

fn request(id: &str, attempt: u32) -> ProcessConversation {
    ProcessConversation {
        conversation_id: id.to_string(),
        attempt,
        ..Default::default()
    }
}

fn stream() -> (
    StreamTx,
    mpsc::Receiver<Result<LinkResponse, tonic::Status>>,
) {
    mpsc::channel(16)
}

async fn next_ack(rx: &mut mpsc::Receiver<Result<LinkResponse, tonic::Status>>) -> Ack {
    loop {
        match rx.recv().await.expect("stream open").expect("no error").msg {
            Some(link_response::Msg::Ack(ack)) => return ack,
            Some(link_response::Msg::Progress(_)) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn duplicate_attaches_to_the_running_job_and_each_requester_gets_its_attempt() {
    let processor = Gated::new(None);
    let jobs = Jobs::new(config(), processor.clone());
    let (tx1, mut rx1) = stream();
    let (tx2, mut rx2) = stream();
    assert_eq!(
        jobs.submit(
            request("c1", 1),
            Requester::Stream {
                tx: tx1,
                attempt: 1
            }
        ),
        Admission::Started
    );
    assert_eq!(
        jobs.submit(
            request("c1", 2),
            Requester::Stream {
                tx: tx2,
                attempt: 2
            }
        ),
        Admission::Attached
    );
    tokio::task::yield_now().await;
    processor.release.notify_waiters();

    let (a1, a2) = (next_ack(&mut rx1).await, next_ack(&mut rx2).await);
    assert_eq!((a1.attempt, a2.attempt), (1, 2));
    assert!(matches!(a1.outcome, Some(ack::Outcome::Processed(_))));
    assert_eq!(processor.calls.load(Ordering::SeqCst), 1, "processed once");
}

#[tokio::test]
async fn finished_result_is_served_from_the_cache() {
    let processor = Gated::new(None);
    let jobs = Jobs::new(config(), processor.clone());
    let (tx, mut rx) = stream();
    jobs.submit(
        request("c1", 1),
        Requester::Stream {
            tx: tx.clone(),
            attempt: 1,
        },
    );
    tokio::task::yield_now().await;
    processor.release.notify_waiters();
    next_ack(&mut rx).await;

    assert_eq!(
        jobs.submit(request("c1", 7), Requester::Stream { tx, attempt: 7 }),
        Admission::Cached
    );
    let ack = next_ack(&mut rx).await;
    assert_eq!(ack.attempt, 7);
    let Some(ack::Outcome::Processed(Processed {
        structured: Some(s),
        ..
    })) = ack.outcome
    else {
        panic!()
    };
    assert_eq!(s.title, "title of c1");
    assert_eq!(processor.calls.load(Ordering::SeqCst), 1);
    assert_eq!(jobs.stats().cached, 1);
}

#[tokio::test]
async fn failures_are_not_cached() {
    let processor = Gated::new(Some(ProcessError {
        reason: "boom".into(),
        retryable: false,
    }));
    let jobs = Jobs::new(config(), processor.clone());
    let (tx, mut rx) = stream();
    for attempt in 1..=2 {
        assert_eq!(
            jobs.submit(
                request("c1", attempt),
                Requester::Stream {
                    tx: tx.clone(),
                    attempt
                }
            ),
            Admission::Started
        );
        tokio::task::yield_now().await;
        processor.release.notify_waiters();
        let ack = next_ack(&mut rx).await;
        assert_eq!(
            ack.outcome,
            Some(ack::Outcome::Failed(Failed {
                reason: "boom".into(),
                retryable: false
            }))
        );
    }
    assert_eq!(processor.calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn beyond_concurrency_plus_queue_requests_are_busy() {
    let processor = Gated::new(None);
    let jobs = Jobs::new(config(), processor.clone());
    let (tx, _rx) = stream();
    for id in ["a", "b", "c"] {
        assert_eq!(
            jobs.submit(
                request(id, 1),
                Requester::Stream {
                    tx: tx.clone(),
                    attempt: 1
                }
            ),
            Admission::Started
        );
    }
    assert_eq!(
        jobs.submit(
            request("d", 1),
            Requester::Stream {
                tx: tx.clone(),
                attempt: 1
            }
        ),
        Admission::Busy {
            retry_after: Duration::from_millis(750)
        }
    );
    // A duplicate of a running job is still accepted when full: it costs nothing.
    assert_eq!(
        jobs.submit(request("a", 2), Requester::Stream { tx, attempt: 2 }),
        Admission::Attached
    );
    tokio::task::yield_now().await;
    assert_eq!(
        processor.calls.load(Ordering::SeqCst),
        2,
        "only max_concurrency run at once"
    );
    assert_eq!(
        jobs.stats(),
        JobStats {
            started: 3,
            attached: 1,
            busy: 1,
            ..JobStats::default()
        }
    );
}

#[tokio::test(start_paused = true)]
async fn progress_is_sent_while_the_job_runs() {
    let processor = Gated::new(None);
    let jobs = Jobs::new(config(), processor.clone());
    let (tx, mut rx) = stream();
    jobs.submit(request("c1", 3), Requester::Stream { tx, attempt: 3 });
    tokio::time::sleep(Duration::from_secs(11)).await;
    let mut progress = 0;
    while let Ok(Ok(LinkResponse {
        msg: Some(link_response::Msg::Progress(p)),
    })) = rx.try_recv()
    {
        assert_eq!((p.conversation_id.as_str(), p.attempt), ("c1", 3));
        progress += 1;
    }
    assert_eq!(progress, 2, "one at 5 s and one at 10 s");
    processor.release.notify_waiters();
    assert_eq!(next_ack(&mut rx).await.attempt, 3);
}

#[tokio::test]
async fn dropped_stream_does_not_cancel_the_job() {
    let processor = Gated::new(None);
    let jobs = Jobs::new(config(), processor.clone());
    let (tx, rx) = stream();
    jobs.submit(request("c1", 1), Requester::Stream { tx, attempt: 1 });
    drop(rx);
    tokio::task::yield_now().await;
    processor.release.notify_waiters();
    // The replay on a new stream is answered from the cache.
    let (tx, mut rx) = stream();
    let admission = loop {
        match jobs.submit(
            request("c1", 2),
            Requester::Stream {
                tx: tx.clone(),
                attempt: 2,
            },
        ) {
            Admission::Attached => {
                tokio::task::yield_now().await;
                let _ = next_ack(&mut rx).await;
                continue;
            }
            other => break other,
        }
    };
    assert_eq!(admission, Admission::Cached);
    assert_eq!(next_ack(&mut rx).await.attempt, 2);
    assert_eq!(processor.calls.load(Ordering::SeqCst), 1);
}

#[test]
fn each_event_counts_once_in_its_own_field() {
    let mut stats = JobStats::default();
    for event in [
        JobEvent::Started,
        JobEvent::Attached,
        JobEvent::Attached,
        JobEvent::Cached,
        JobEvent::Busy,
        JobEvent::Succeeded,
        JobEvent::Failed,
        JobEvent::Failed,
        JobEvent::Failed,
    ] {
        stats.record(event);
    }
    assert_eq!(
        stats,
        JobStats {
            started: 1,
            attached: 2,
            cached: 1,
            busy: 1,
            succeeded: 1,
            failed: 3,
        }
    );
}

#[test]
fn the_ack_names_the_conversation_and_the_requesters_attempt() {
    let processed = Outcome::Processed(Processed::default());
    assert_eq!(processed.event(), JobEvent::Succeeded);
    assert_eq!(
        processed.ack("c1", 4),
        Ack {
            conversation_id: "c1".into(),
            attempt: 4,
            outcome: Some(ack::Outcome::Processed(Processed::default())),
        }
    );
    let failed = Outcome::Failed(ProcessError::retryable("LLM unavailable"));
    assert_eq!(failed.event(), JobEvent::Failed);
    assert_eq!(
        failed.ack("c2", 1).outcome,
        Some(ack::Outcome::Failed(Failed {
            reason: "LLM unavailable".into(),
            retryable: true,
        }))
    );
}
