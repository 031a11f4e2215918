//! A live `Session` stream as a test drives it: start, say, finish, half-close, and read
//! what comes back, each read within 20 s.

use crate::requests::{ListenClient, segment};
use shared::proto::listen::v1::{
    Segments, SessionEvent, SessionRequest, Start, session_event::Event, session_request::Msg,
};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

/// One open Session call.
pub struct Session {
    pub tx: mpsc::Sender<SessionRequest>,
    pub events: Streaming<SessionEvent>,
}

impl Session {
    pub async fn open(client: &ListenClient) -> Session {
        let (tx, rx) = mpsc::channel(16);
        let events = client
            .clone()
            .session(ReceiverStream::new(rx))
            .await
            .expect("session")
            .into_inner();
        Session { tx, events }
    }

    /// Opens a session and starts it; returns it with its SessionStarted.
    pub async fn start(
        client: &ListenClient,
        uid: &str,
        timeout_s: u32,
    ) -> (Session, shared::proto::listen::v1::SessionStarted) {
        let mut session = Session::open(client).await;
        session
            .send(Msg::Start(Start {
                uid: uid.into(),
                language: "en".into(),
                conversation_timeout_s: timeout_s,
            }))
            .await;
        match session.next().await {
            Event::SessionStarted(started) => (session, started),
            other => panic!("expected session_started, got {other:?}"),
        }
    }

    pub async fn send(&self, msg: Msg) {
        self.tx
            .send(SessionRequest { msg: Some(msg) })
            .await
            .expect("session open");
    }

    pub async fn say(&mut self, texts: &[&str]) -> u64 {
        let segments = texts
            .iter()
            .enumerate()
            .map(|(i, t)| segment(t, i as f64))
            .collect();
        self.send(Msg::Segments(Segments { segments })).await;
        loop {
            match self.next().await {
                Event::SegmentsStored(stored) => return stored.total_segments,
                Event::ConversationStarted(_) => continue,
                other => panic!("expected segments_stored, got {other:?}"),
            }
        }
    }

    pub async fn next(&mut self) -> Event {
        let message = tokio::time::timeout(Duration::from_secs(20), self.events.message())
            .await
            .expect("an event within 20 s")
            .expect("no stream error")
            .expect("stream open");
        message.event.expect("event set")
    }

    /// Ends the request side (half-close): the client sends nothing more but still reads.
    pub fn half_close(&mut self) {
        self.tx = mpsc::channel(1).0;
    }

    /// Every event until the stream ends; panics if it ends with an error or takes 20 s.
    pub async fn rest(&mut self) -> Vec<Event> {
        let mut events = Vec::new();
        loop {
            match tokio::time::timeout(Duration::from_secs(20), self.events.message())
                .await
                .expect("the stream ends within 20 s")
            {
                Ok(Some(message)) => events.push(message.event.expect("event set")),
                Ok(None) => return events,
                Err(status) => panic!("stream ended with {status:?} after {events:?}"),
            }
        }
    }

    /// The status the stream ends with.
    pub async fn error(&mut self) -> tonic::Status {
        loop {
            match tokio::time::timeout(Duration::from_secs(20), self.events.message())
                .await
                .expect("ended in time")
            {
                Err(status) => return status,
                Ok(Some(_)) => continue,
                Ok(None) => panic!("stream ended without an error"),
            }
        }
    }
}
