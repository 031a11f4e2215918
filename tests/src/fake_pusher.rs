//! A controllable pusher for the faults the real one cannot produce: acks that never come,
//! jobs slower than the ack timeout (with or without `Progress`), a conversation that always
//! fails, a stale ack on a new stream, a drain. It speaks the real `pusher.v1.Pusher` Connect protocol
//! on a loopback port and records every request it receives.

use shared::proto::pusher::v1::{
    Ack, Draining, Failed, LinkRequest, LinkResponse, ProcessConversation, Processed, Progress,
    Structured, Welcome, ack, link_request, link_response,
    pusher_server::{Pusher, PusherServer},
};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

/// Text that makes a conversation fail permanently, whatever the behaviour.
pub const POISON: &str = "POISON";

/// How the fake answers a ProcessConversation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Behaviour {
    /// Ack `processed` at once.
    Normal,
    /// Hold the request; send `Progress` every `progress_every` if set; ack `processed` after
    /// `ack_after` if set (never otherwise).
    Slow {
        ack_after: Option<Duration>,
        progress_every: Option<Duration>,
    },
}

#[derive(Default)]
struct State {
    behaviour: Option<Behaviour>,
    received: HashMap<String, Vec<u32>>,
    /// Sent first on every new stream: a permanent failure for (id, attempt).
    stale_ack: Option<(String, u32)>,
    /// Every stream's response half, held weakly: a stream ends when its own tasks do.
    open: Vec<mpsc::WeakSender<Result<LinkResponse, Status>>>,
}

pub struct FakePusher {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    streams: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl FakePusher {
    pub async fn start(behaviour: Behaviour) -> FakePusher {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State {
            behaviour: Some(behaviour),
            ..State::default()
        }));
        let streams = Arc::new(AtomicU64::new(0));
        let service = Service {
            state: Arc::clone(&state),
            streams: Arc::clone(&streams),
        };
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(PusherServer::new(service))
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await;
        });
        FakePusher {
            addr,
            state,
            streams,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set(&self, behaviour: Behaviour) {
        self.state.lock().unwrap().behaviour = Some(behaviour);
    }

    /// On every stream opened from now on, first send a permanent failure for (id, attempt).
    pub fn send_stale_ack_on_connect(&self, id: &str, attempt: u32) {
        self.state.lock().unwrap().stale_ack = Some((id.to_string(), attempt));
    }

    /// Tells every open stream `Draining`, as a pusher does on SIGTERM; requests already
    /// received are still answered.
    pub fn drain(&self) {
        let open = self.state.lock().unwrap().open.clone();
        for tx in open.iter().filter_map(mpsc::WeakSender::upgrade) {
            let _ = tx.try_send(Ok(LinkResponse {
                msg: Some(link_response::Msg::Draining(Draining {})),
            }));
        }
    }

    /// Attempts received for conversation `id`, in arrival order.
    pub fn attempts(&self, id: &str) -> Vec<u32> {
        self.state
            .lock()
            .unwrap()
            .received
            .get(id)
            .cloned()
            .unwrap_or_default()
    }

    /// Requests received in all.
    pub fn total_received(&self) -> usize {
        self.state
            .lock()
            .unwrap()
            .received
            .values()
            .map(Vec::len)
            .sum()
    }

    /// Connect streams opened so far.
    pub fn streams(&self) -> u64 {
        self.streams.load(Ordering::SeqCst)
    }
}

impl Drop for FakePusher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Service {
    state: Arc<Mutex<State>>,
    streams: Arc<AtomicU64>,
}

type Tx = mpsc::Sender<Result<LinkResponse, Status>>;

#[tonic::async_trait]
impl Pusher for Service {
    type ConnectStream = ReceiverStream<Result<LinkResponse, Status>>;

    async fn connect(
        &self,
        request: Request<Streaming<LinkRequest>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        self.streams.fetch_add(1, Ordering::SeqCst);
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(4096);
        let state = Arc::clone(&self.state);
        {
            let mut state = state.lock().unwrap();
            state.open.retain(|tx| tx.strong_count() > 0);
            state.open.push(tx.downgrade());
        }
        tokio::spawn(async move {
            while let Ok(Some(LinkRequest { msg: Some(msg) })) = inbound.message().await {
                match msg {
                    link_request::Msg::Hello(_) => {
                        send(
                            &tx,
                            link_response::Msg::Welcome(Welcome {
                                pusher_id: "fake".into(),
                                max_concurrency: 1,
                            }),
                        )
                        .await;
                        let stale = state.lock().unwrap().stale_ack.clone();
                        if let Some((id, attempt)) = stale {
                            send(
                                &tx,
                                link_response::Msg::Ack(failed(&id, attempt, "stale failure")),
                            )
                            .await;
                        }
                    }
                    link_request::Msg::Heartbeat(beat) => {
                        send(&tx, link_response::Msg::Heartbeat(beat)).await
                    }
                    link_request::Msg::Transcript(_) => {}
                    link_request::Msg::Process(process) => {
                        let behaviour = {
                            let mut state = state.lock().unwrap();
                            state
                                .received
                                .entry(process.conversation_id.clone())
                                .or_default()
                                .push(process.attempt);
                            state.behaviour.unwrap_or(Behaviour::Normal)
                        };
                        tokio::spawn(answer(tx.clone(), process, behaviour));
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn process(
        &self,
        _request: Request<ProcessConversation>,
    ) -> Result<Response<Ack>, Status> {
        Err(Status::unimplemented("the fake pusher only speaks Connect"))
    }
}

async fn answer(tx: Tx, process: ProcessConversation, behaviour: Behaviour) {
    let (id, attempt) = (process.conversation_id.clone(), process.attempt);
    if process.segments.iter().any(|s| s.text.contains(POISON)) {
        send(
            &tx,
            link_response::Msg::Ack(failed(
                &id,
                attempt,
                "poison conversation: cannot be structured",
            )),
        )
        .await;
        return;
    }
    let Behaviour::Slow {
        ack_after,
        progress_every,
    } = behaviour
    else {
        send(&tx, link_response::Msg::Ack(processed(&id, attempt))).await;
        return;
    };
    let started = tokio::time::Instant::now();
    loop {
        let step = progress_every.unwrap_or(Duration::from_secs(3600));
        let until_ack = ack_after.map(|after| after.saturating_sub(started.elapsed()));
        if let Some(left) = until_ack
            && left <= step
        {
            tokio::time::sleep(left).await;
            send(&tx, link_response::Msg::Ack(processed(&id, attempt))).await;
            return;
        }
        tokio::time::sleep(step).await;
        if tx.is_closed() {
            return;
        }
        if progress_every.is_some() {
            send(
                &tx,
                link_response::Msg::Progress(Progress {
                    conversation_id: id.clone(),
                    attempt,
                }),
            )
            .await;
        }
    }
}

fn processed(id: &str, attempt: u32) -> Ack {
    Ack {
        conversation_id: id.to_string(),
        attempt,
        outcome: Some(ack::Outcome::Processed(Processed {
            structured: Some(Structured {
                title: format!("fake result for {id}"),
                ..Default::default()
            }),
            ..Default::default()
        })),
    }
}

fn failed(id: &str, attempt: u32, reason: &str) -> Ack {
    Ack {
        conversation_id: id.to_string(),
        attempt,
        outcome: Some(ack::Outcome::Failed(Failed {
            reason: reason.to_string(),
            retryable: false,
        })),
    }
}

async fn send(tx: &Tx, msg: link_response::Msg) {
    let _ = tx.send(Ok(LinkResponse { msg: Some(msg) })).await;
}
