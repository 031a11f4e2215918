//! `grpc.health.v1.Health` as the health checking protocol describes it.
//!
//! We replace tonic-health's service (keeping its generated `pb` types and server trait)
//! because its Watch answers an unknown name with NOT_FOUND and ends the call. The protocol
//! (<https://github.com/grpc/grpc/blob/master/doc/health-checking.md> and the comments in
//! `grpc/health/v1/health.proto`) says Watch sends `SERVICE_UNKNOWN`, keeps the call open,
//! and sends the real status once the name becomes known, then each change. Check on an
//! unknown name stays NOT_FOUND, as the protocol says.
//!
//! [`HealthReporter`] keeps tonic-health's methods, so callers only change the import.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

use tokio::sync::watch;
use tokio_stream::Stream;
use tonic::server::NamedService;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus as WireStatus;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

pub use tonic_health::ServingStatus;

/// Distinct unknown names that may be watched at once; a Watch on one more gets
/// RESOURCE_EXHAUSTED (clients retry with backoff, as the protocol asks). Known names (the
/// ones our code sets, a fixed few) do not count.
pub const MAX_UNKNOWN_WATCHED: usize = 64;

/// Largest health request accepted, so a watched unknown name costs at most this much
/// (larger requests get OUT_OF_RANGE from tonic).
pub const MAX_REQUEST_BYTES: usize = 1024;

/// A reporter and the health service it feeds. The overall server name `""` starts SERVING,
/// as with tonic-health.
pub fn health_reporter() -> (HealthReporter, HealthServer<HealthService>) {
    let reporter = HealthReporter::new();
    let server = HealthServer::new(reporter.service()).max_decoding_message_size(MAX_REQUEST_BYTES);
    (reporter, server)
}

/// Sets the status of named services; every Watch on that name sees each change.
///
/// The methods are `async` only to match tonic-health's `HealthReporter`; none waits.
#[derive(Clone, Debug)]
pub struct HealthReporter {
    statuses: Arc<Statuses>,
    /// Turned true by [`HealthReporter::end_watches`].
    closing: Arc<watch::Sender<bool>>,
}

impl HealthReporter {
    fn new() -> Self {
        let statuses = Arc::new(Statuses::default());
        statuses.set("", ServingStatus::Serving);
        HealthReporter {
            statuses,
            closing: Arc::new(watch::channel(false).0),
        }
    }

    fn service(&self) -> HealthService {
        HealthService {
            statuses: Arc::clone(&self.statuses),
            closing: self.closing.subscribe(),
        }
    }

    /// Ends every Watch call with OK, after it has sent the statuses set so far (a watcher
    /// sees NOT_SERVING, then the end). For shutdown: an open Watch would otherwise hold its
    /// connection, and the server's graceful stop, until the shutdown grace runs out. Watch
    /// calls made later end at once; Check keeps answering.
    pub fn end_watches(&self) {
        self.closing.send_replace(true);
    }

    /// Sets the service implemented by `S` to SERVING.
    pub async fn set_serving<S: NamedService>(&self) {
        self.statuses.set(S::NAME, ServingStatus::Serving);
    }

    /// Sets the service implemented by `S` to NOT_SERVING.
    pub async fn set_not_serving<S: NamedService>(&self) {
        self.statuses.set(S::NAME, ServingStatus::NotServing);
    }

    /// Sets the status of `service_name`; from now on the name is known.
    pub async fn set_service_status(&self, service_name: impl AsRef<str>, status: ServingStatus) {
        self.statuses.set(service_name.as_ref(), status);
    }
}

/// The `grpc.health.v1.Health` service over a [`HealthReporter`]'s statuses.
#[derive(Debug)]
pub struct HealthService {
    statuses: Arc<Statuses>,
    closing: watch::Receiver<bool>,
}

#[tonic::async_trait]
impl Health for HealthService {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        let name = &request.get_ref().service;
        match self.statuses.get(name) {
            Some(status) => Ok(Response::new(response(status))),
            None => Err(Status::not_found(format!("unknown service {name:?}"))),
        }
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        let name = request.into_inner().service;
        let updates = self.statuses.subscribe(&name)?;
        Ok(Response::new(WatchStream {
            updates: tokio_stream::wrappers::WatchStream::new(updates),
            closing: tokio_stream::wrappers::WatchStream::new(self.closing.clone()),
            last: None,
            name,
            statuses: Arc::clone(&self.statuses),
        }))
    }
}

/// Status of each known name, and of each unknown name while someone watches it.
///
/// An entry holding `SERVICE_UNKNOWN` is an unknown name being watched: at most
/// [`MAX_UNKNOWN_WATCHED`] of them, each removed when its last watcher goes away. Entries
/// for known names stay (our code sets a fixed few).
#[derive(Debug, Default)]
struct Statuses(Mutex<HashMap<String, watch::Sender<WireStatus>>>);

impl Statuses {
    fn set(&self, name: &str, status: ServingStatus) {
        let status = WireStatus::from(status);
        let mut names = self.lock();
        match names.get(name) {
            // Watchers hear only of real changes.
            Some(tx) => {
                tx.send_if_modified(|current| {
                    let changed = *current != status;
                    *current = status;
                    changed
                });
            }
            None => {
                names.insert(name.to_string(), watch::channel(status).0);
            }
        }
    }

    /// The status of a known name.
    fn get(&self, name: &str) -> Option<WireStatus> {
        let status = *self.lock().get(name)?.borrow();
        (status != WireStatus::ServiceUnknown).then_some(status)
    }

    fn subscribe(&self, name: &str) -> Result<watch::Receiver<WireStatus>, Status> {
        let mut names = self.lock();
        if let Some(tx) = names.get(name) {
            return Ok(tx.subscribe());
        }
        let unknown = names
            .values()
            .filter(|tx| *tx.borrow() == WireStatus::ServiceUnknown)
            .count();
        if unknown >= MAX_UNKNOWN_WATCHED {
            return Err(Status::resource_exhausted(format!(
                "{MAX_UNKNOWN_WATCHED} unknown service names are already being watched, \
                 the most this server allows"
            )));
        }
        let (tx, rx) = watch::channel(WireStatus::ServiceUnknown);
        names.insert(name.to_string(), tx);
        Ok(rx)
    }

    /// Called as a watcher of `name` goes away, while its receiver still exists: forgets
    /// the name if it is unknown and that receiver is the last one.
    fn unwatch(&self, name: &str) {
        let mut names = self.lock();
        if let Some(tx) = names.get(name)
            && *tx.borrow() == WireStatus::ServiceUnknown
            && tx.receiver_count() <= 1
        {
            names.remove(name);
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, watch::Sender<WireStatus>>> {
        // No critical section can panic half-way through an update.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The responses of one Watch call: the current status, then each change.
pub struct WatchStream {
    updates: tokio_stream::wrappers::WatchStream<WireStatus>,
    /// Yields true once the server is shutting down.
    closing: tokio_stream::wrappers::WatchStream<bool>,
    /// The last status sent, so a change and its reversal between two polls send nothing.
    last: Option<WireStatus>,
    name: String,
    statuses: Arc<Statuses>,
}

impl Stream for WatchStream {
    type Item = Result<HealthCheckResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            let status = match Pin::new(&mut self.updates).poll_next(cx) {
                Poll::Ready(Some(status)) => status,
                Poll::Ready(None) => return Poll::Ready(None),
                // Nothing new to send: end the call if the server is shutting down.
                Poll::Pending => {
                    while let Poll::Ready(Some(closing)) = Pin::new(&mut self.closing).poll_next(cx)
                    {
                        if closing {
                            return Poll::Ready(None);
                        }
                    }
                    return Poll::Pending;
                }
            };
            if self.last != Some(status) {
                self.last = Some(status);
                return Poll::Ready(Some(Ok(response(status))));
            }
        }
    }
}

impl Drop for WatchStream {
    fn drop(&mut self) {
        // Runs before `updates` is dropped, so this watcher's receiver is still counted.
        self.statuses.unwatch(&self.name);
    }
}

impl std::fmt::Debug for WatchStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchStream")
            .field("name", &self.name)
            .finish()
    }
}

fn response(status: WireStatus) -> HealthCheckResponse {
    HealthCheckResponse {
        status: status as i32,
    }
}

#[cfg(test)]
mod tests;
