//! `--rpc pg-queue`: the textbook PostgreSQL work queue, P7's baseline for listen on
//! PostgreSQL. The same conversations (1 KiB of speech), the same concurrency of producers and
//! the same pending window as listen, with none of listen's work beyond the queue itself:
//!
//! - `--concurrency` producers, one connection each, INSERT a conversation per statement
//!   (autocommit: stored when the INSERT returns, like a Submit);
//! - one claimer fills the free slots of the `--max-in-flight` window: in one transaction,
//!   `SELECT id, payload ... WHERE status = 'queued' ORDER BY id FOR UPDATE SKIP LOCKED
//!   LIMIT free` and an UPDATE marking them processing with an owner and a lease; it polls
//!   every 2 ms while the queue is empty;
//! - [`WORKERS`] workers complete each claimed conversation with one UPDATE writing a
//!   200-byte result (no processing: the result is fixed), freeing its slot.
//!
//! Durability is the server's: with PostgreSQL's defaults every commit is fsynced.

use super::{Args, Report, transcript};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, mpsc};
use tokio_postgres::{Client, NoTls};

/// Connections completing conversations: as many as listen's PostgreSQL pool.
const WORKERS: usize = 16;

/// How long the claimer waits before asking an empty queue again.
const POLL: Duration = Duration::from_millis(2);

/// The result each completion writes.
const RESULT_BYTES: usize = 200;

const SCHEMA: &str = "
    DROP TABLE IF EXISTS loadgen_queue;
    CREATE TABLE loadgen_queue (
        id bigserial PRIMARY KEY,
        payload text NOT NULL,
        status text NOT NULL DEFAULT 'queued',
        owner text,
        lease_expires_at timestamptz,
        result text,
        created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
        completed_at timestamptz
    );
    CREATE INDEX loadgen_queue_queued ON loadgen_queue (id) WHERE status = 'queued';";

/// What the producers, the claimer and the workers share.
struct Shared {
    /// Free slots in the pending window; a worker gives its slot back on completion.
    free: Semaphore,
    inserted: AtomicU64,
    completed: AtomicU64,
    /// When the latest completion committed.
    last_completion: Mutex<Option<Instant>>,
    errors: Mutex<BTreeMap<String, u64>>,
    /// Set when the run is over: the claimer stops, and with it the workers.
    stop: AtomicBool,
}

impl Shared {
    fn error(&self, error: &tokio_postgres::Error) {
        let code = error
            .code()
            .map_or_else(|| "connection".to_string(), |c| c.code().to_string());
        *self.errors.lock().unwrap().entry(code).or_default() += 1;
    }
}

pub(crate) async fn run(args: &Args) -> Report {
    let setup = connect(&args.postgres_url).await;
    setup.batch_execute(SCHEMA).await.unwrap_or_else(|e| {
        eprintln!("error: cannot create loadgen_queue: {e}");
        std::process::exit(1)
    });
    let mut producers = Vec::new();
    for _ in 0..args.concurrency {
        producers.push(connect(&args.postgres_url).await);
    }
    let claimer = connect(&args.postgres_url).await;
    let mut workers = Vec::new();
    for _ in 0..WORKERS {
        workers.push(connect(&args.postgres_url).await);
    }
    let shared = Arc::new(Shared {
        free: Semaphore::new(args.max_in_flight),
        inserted: AtomicU64::new(0),
        completed: AtomicU64::new(0),
        last_completion: Mutex::new(None),
        errors: Mutex::new(BTreeMap::new()),
        stop: AtomicBool::new(false),
    });
    let text = transcript(args.payload);
    let cpu_before = tests::cpu::own_seconds();
    let started = Instant::now();
    let deadline = started + args.duration;

    // The claimed conversations, bounded by the window (a claim never exceeds the free slots).
    let (claimed_tx, claimed_rx) = mpsc::channel::<(i64, String)>(args.max_in_flight);
    let claimed_rx = Arc::new(tokio::sync::Mutex::new(claimed_rx));
    let mut tasks = tokio::task::JoinSet::new();
    for client in workers {
        let (shared, claimed_rx) = (Arc::clone(&shared), Arc::clone(&claimed_rx));
        tasks.spawn(complete(client, claimed_rx, shared));
    }
    tasks.spawn(claim(claimer, claimed_tx, Arc::clone(&shared), deadline));

    let tickets = Arc::new(AtomicU64::new(0));
    let mut inserting = tokio::task::JoinSet::new();
    for client in producers {
        let (shared, tickets, text) = (Arc::clone(&shared), Arc::clone(&tickets), text.clone());
        let limit = args.requests;
        inserting.spawn(async move {
            let insert = client
                .prepare("INSERT INTO loadgen_queue (payload) VALUES ($1)")
                .await
                .expect("prepare INSERT");
            while tickets.fetch_add(1, Ordering::Relaxed) < limit && Instant::now() < deadline {
                match client.execute(&insert, &[&text]).await {
                    Ok(_) => {
                        shared.inserted.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(error) => shared.error(&error),
                }
            }
        });
    }
    while let Some(done) = inserting.join_next().await {
        done.expect("producer");
    }
    // Every inserted conversation completed, or the deadline.
    let inserted = shared.inserted.load(Ordering::Relaxed);
    while shared.completed.load(Ordering::Relaxed) < inserted && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let last = *shared.last_completion.lock().unwrap();
    let elapsed = last.map_or_else(|| started.elapsed(), |last| last - started);
    let cpu_seconds = tests::cpu::own_seconds() - cpu_before;
    shared.stop.store(true, Ordering::Relaxed);
    while let Some(done) = tasks.join_next().await {
        done.expect("claimer or worker");
    }

    let latencies = setup
        .query(
            "SELECT extract(epoch FROM completed_at - created_at)::float8 FROM loadgen_queue \
             WHERE status = 'completed'",
            &[],
        )
        .await
        .expect("read the latencies")
        .iter()
        .map(|row| Duration::from_secs_f64(row.get::<_, f64>(0).max(0.0)))
        .collect();
    Report {
        ok: shared.completed.load(Ordering::Relaxed),
        errors: std::mem::take(&mut *shared.errors.lock().unwrap()),
        elapsed,
        latencies,
        cpu_seconds,
    }
}

async fn connect(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| {
            eprintln!("error: cannot connect to {url}: {e}");
            std::process::exit(1)
        });
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// The claimer: takes every free slot, claims up to that many queued conversations in one
/// transaction, and hands them to the workers. Ends at `stop` or the deadline.
async fn claim(
    mut client: Client,
    claimed: mpsc::Sender<(i64, String)>,
    shared: Arc<Shared>,
    deadline: Instant,
) {
    let owner = format!("loadgen-{}", std::process::id());
    while !shared.stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        // Wait for one free slot (re-checking stop every 100 ms), then take all there are:
        // only the claimer takes slots, so they cannot go meanwhile.
        let Ok(Ok(first)) =
            tokio::time::timeout(Duration::from_millis(100), shared.free.acquire()).await
        else {
            continue;
        };
        first.forget();
        let more = shared.free.available_permits();
        if let Ok(permits) = shared.free.try_acquire_many(more as u32) {
            permits.forget();
        }
        let slots = 1 + more;
        let rows = match claim_batch(&mut client, &owner, slots).await {
            Ok(rows) => rows,
            Err(error) => {
                shared.error(&error);
                Vec::new()
            }
        };
        shared.free.add_permits(slots - rows.len());
        if rows.is_empty() {
            tokio::time::sleep(POLL).await;
        }
        for row in rows {
            if claimed.send(row).await.is_err() {
                return;
            }
        }
    }
}

/// One claim: up to `slots` queued conversations, oldest first, locked past those other
/// claimers hold, and marked processing by `owner` with a 30 s lease, in one transaction.
async fn claim_batch(
    client: &mut Client,
    owner: &str,
    slots: usize,
) -> Result<Vec<(i64, String)>, tokio_postgres::Error> {
    let transaction = client.transaction().await?;
    let rows: Vec<(i64, String)> = transaction
        .query(
            "SELECT id, payload FROM loadgen_queue WHERE status = 'queued' ORDER BY id \
             FOR UPDATE SKIP LOCKED LIMIT $1",
            &[&(slots as i64)],
        )
        .await?
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    if !rows.is_empty() {
        let ids: Vec<i64> = rows.iter().map(|(id, _)| *id).collect();
        transaction
            .execute(
                "UPDATE loadgen_queue SET status = 'processing', owner = $1, \
                 lease_expires_at = clock_timestamp() + interval '30 seconds' WHERE id = ANY($2)",
                &[&owner, &ids],
            )
            .await?;
    }
    transaction.commit().await?;
    Ok(rows)
}

/// A worker: completes claimed conversations one UPDATE each, until the claimer is gone.
async fn complete(
    client: Client,
    claimed: Arc<tokio::sync::Mutex<mpsc::Receiver<(i64, String)>>>,
    shared: Arc<Shared>,
) {
    let owner = format!("loadgen-{}", std::process::id());
    let update = client
        .prepare(
            "UPDATE loadgen_queue SET status = 'completed', result = $2, \
             completed_at = clock_timestamp(), lease_expires_at = NULL \
             WHERE id = $1 AND owner = $3",
        )
        .await
        .expect("prepare the completion");
    loop {
        let next = claimed.lock().await.recv().await;
        let Some((id, payload)) = next else {
            return;
        };
        let result = format!("{:<width$.width$}", payload, width = RESULT_BYTES);
        match client.execute(&update, &[&id, &result, &owner]).await {
            Ok(_) => {
                *shared.last_completion.lock().unwrap() = Some(Instant::now());
                shared.completed.fetch_add(1, Ordering::Relaxed);
            }
            Err(error) => shared.error(&error),
        }
        shared.free.add_permits(1);
    }
}
