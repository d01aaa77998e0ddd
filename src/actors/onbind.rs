//! The onbind delivery queue: invites reach the invitee's homeserver once their address is
//! bound (`POST /_matrix/federation/v1/3pid/onbind`, what Synapse serves; the spec says PUT).
//!
//! Every delivery is a row of `onbind_deliveries`, committed by the association store in the
//! transaction of the bind that causes it (a local bind, or a binding replicated from a peer
//! for an address this node holds invites for), and handed to this actor after the commit.
//! The actor keeps one queue per homeserver: while the homeserver answers, up to
//! [`MAX_IN_FLIGHT`] deliveries are on their way at once; when it fails (no answer, or any
//! status but 200), the queue waits with exponential backoff capped at [`MAX_BACKOFF`] and then
//! sends one delivery as a probe before sending the rest again. A delivery the homeserver
//! refuses (a 4xx other than 408 and 429: it is up, and does not want this one) waits on its
//! own, with its own backoff up to [`MAX_REFUSED_BACKOFF`], and holds up nothing else. Only
//! after a 200 are the
//! invites marked delivered (`invite_tokens.sent_ts`, or deleted with `delete_tokens_on_bind`)
//! and the row removed; a restart loads the rows still queued and sends them again. A delivery
//! still failing [`GIVE_UP_AFTER_MS`] after it was queued, or addressed to something that is not
//! a server name, is given up: logged, counted, kept in the table with the reason, and its
//! invites released so that a later bind of the address delivers them.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use serde::Serialize;

use super::store::{QueuedDelivery, StoreQueue};
use crate::homeserver::{HomeserverClient, HomeserverError};
use crate::invite::{InviteWrite, PendingInviteKeys};

pub const ONBIND_PATH: &str = "/_matrix/federation/v1/3pid/onbind";
/// Deliveries on their way to one homeserver at once.
pub const MAX_IN_FLIGHT: usize = 32;
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// The longest wait between two attempts: a homeserver that comes back is noticed within it.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long a delivery is retried before it is given up: a week, so that a homeserver down for
/// a long weekend still gets its invites.
pub const GIVE_UP_AFTER_MS: i64 = 7 * 24 * 3600 * 1000;
/// Answers read up to this size (Sydent reads them whole).
const ANSWER_LIMIT: usize = 64 * 1024;
/// The longest wait before a delivery the homeserver refused (a 4xx) is tried again.
const MAX_REFUSED_BACKOFF: Duration = Duration::from_secs(600);

struct Destination {
    queue: VecDeque<QueuedDelivery>,
    in_flight: usize,
    /// Refused deliveries waiting to be tried again.
    refused: usize,
    /// Consecutive failures; 0 while the homeserver answers.
    failures: u32,
    /// While failing: no delivery before this.
    retry_at: Option<std::time::Instant>,
    retry_at_ms: Option<i64>,
    last_error: Option<String>,
    last_success_ms: Option<i64>,
}

impl Destination {
    fn new() -> Self {
        Self {
            queue: VecDeque::new(),
            in_flight: 0,
            refused: 0,
            failures: 0,
            retry_at: None,
            retry_at_ms: None,
            last_error: None,
            last_success_ms: None,
        }
    }

    /// How many more deliveries may start now.
    fn room(&self, now: std::time::Instant) -> usize {
        match self.retry_at {
            _ if self.failures == 0 => MAX_IN_FLIGHT.saturating_sub(self.in_flight),
            // Failing: one probe at a time, once the backoff is over.
            Some(at) if at > now => 0,
            _ => usize::from(self.in_flight == 0),
        }
    }
}

pub struct OnbindQueue {
    client: Arc<HomeserverClient>,
    store: StoreQueue,
    pending_invites: Arc<PendingInviteKeys>,
    delete_tokens_on_bind: bool,
    destinations: HashMap<String, Destination>,
    delivered: u64,
    given_up: u64,
    /// Given up on before this start (from the table).
    given_up_before: i64,
    /// [`GIVE_UP_AFTER_MS`], but in tests (`SYDENT_RS_TEST_ONBIND_GIVE_UP_MS`).
    give_up_after_ms: i64,
    /// Deliveries a homeserver refused (4xx), by id: how many times. Such a delivery waits
    /// on its own, so it never holds up the homeserver's other deliveries.
    refused: HashMap<i64, u32>,
    now_ms: fn() -> i64,
}

impl OnbindQueue {
    /// `queued`: the rows left from before the start; `incoming`: what the store commits from
    /// now on.
    pub fn new(
        client: Arc<HomeserverClient>,
        store: StoreQueue,
        pending_invites: Arc<PendingInviteKeys>,
        delete_tokens_on_bind: bool,
        given_up_before: i64,
    ) -> Self {
        Self {
            client,
            store,
            pending_invites,
            delete_tokens_on_bind,
            destinations: HashMap::new(),
            delivered: 0,
            given_up: 0,
            given_up_before,
            give_up_after_ms: std::env::var("SYDENT_RS_TEST_ONBIND_GIVE_UP_MS")
                .ok()
                .and_then(|ms| ms.parse().ok())
                .unwrap_or(GIVE_UP_AFTER_MS),
            refused: HashMap::new(),
            now_ms: crate::now_ms,
        }
    }

    fn enqueue(&mut self, delivery: QueuedDelivery, ctx: &mut Context<Self>) {
        let name = delivery.destination.clone();
        self.destinations
            .entry(name.clone())
            .or_insert_with(Destination::new)
            .queue
            .push_back(delivery);
        self.pump(&name, ctx);
    }

    /// Starts what `name`'s queue has room for.
    fn pump(&mut self, name: &str, ctx: &mut Context<Self>) {
        let now = std::time::Instant::now();
        let now_ms = (self.now_ms)();
        let Some(dest) = self.destinations.get_mut(name) else {
            return;
        };
        let mut room = dest.room(now);
        let mut expired = Vec::new();
        let mut starting = Vec::new();
        while room > 0 {
            let Some(delivery) = dest.queue.pop_front() else {
                break;
            };
            if now_ms - delivery.created_ts > self.give_up_after_ms {
                let why = format!(
                    "still undelivered after {} s; last error: {}",
                    self.give_up_after_ms / 1000,
                    dest.last_error.as_deref().unwrap_or("none")
                );
                expired.push((delivery, why));
                continue;
            }
            room -= 1;
            dest.in_flight += 1;
            starting.push(delivery);
        }
        for delivery in starting {
            let client = Arc::clone(&self.client);
            let (destination, body) = (delivery.destination.clone(), Arc::clone(&delivery.body));
            let fut = async move {
                client
                    .post_json(
                        &destination,
                        ONBIND_PATH,
                        body.as_bytes().to_vec(),
                        ANSWER_LIMIT,
                    )
                    .await
            };
            ctx.spawn(
                fut.into_actor(self)
                    .map(move |result, act, ctx| act.finished(delivery, result, ctx)),
            );
        }
        for (delivery, why) in expired {
            self.give_up(delivery, why);
        }
        if self.destinations.get(name).is_some_and(|d| {
            d.in_flight == 0 && d.queue.is_empty() && d.failures == 0 && d.refused == 0
        }) {
            self.destinations.remove(name);
        }
    }

    fn finished(
        &mut self,
        delivery: QueuedDelivery,
        result: Result<crate::homeserver::Answer, HomeserverError>,
        ctx: &mut Context<Self>,
    ) {
        let name = delivery.destination.clone();
        let Some(dest) = self.destinations.get_mut(&name) else {
            return;
        };
        dest.in_flight -= 1;
        let described = |answer: &crate::homeserver::Answer| {
            format!(
                "{name} answered {}: {}",
                answer.status,
                String::from_utf8_lossy(&answer.body[..answer.body.len().min(200)])
            )
        };
        let failure = match result {
            Ok(answer) if answer.status == 200 => None,
            // The homeserver is up and refuses this delivery: it waits on its own.
            Ok(answer)
                if (400..500).contains(&answer.status)
                    && answer.status != 408
                    && answer.status != 429 =>
            {
                let error = described(&answer);
                dest.failures = 0;
                dest.retry_at = None;
                dest.retry_at_ms = None;
                dest.last_error = Some(error.clone());
                dest.refused += 1;
                let times = self.refused.entry(delivery.id).or_default();
                *times += 1;
                let wait = FIRST_BACKOFF
                    .saturating_mul(1 << (*times).min(16).saturating_sub(1))
                    .min(MAX_REFUSED_BACKOFF);
                log::warn!(
                    "onbind: {error} (delivery {}, refused {times} times); trying it again in {} s",
                    delivery.id,
                    wait.as_secs()
                );
                ctx.run_later(wait, move |act, ctx| {
                    if let Some(dest) = act.destinations.get_mut(&delivery.destination) {
                        dest.refused -= 1;
                    }
                    act.enqueue(delivery, ctx);
                });
                self.pump(&name, ctx);
                return;
            }
            Ok(answer) => Some(described(&answer)),
            Err(HomeserverError::InvalidServerName(server)) => {
                self.give_up(
                    delivery,
                    format!("'{server}' (the Matrix ID's server) is not a server name"),
                );
                self.pump(&name, ctx);
                return;
            }
            Err(e) => Some(e.to_string()),
        };
        match failure {
            None => {
                let recovered = dest.failures > 0;
                dest.failures = 0;
                dest.retry_at = None;
                dest.retry_at_ms = None;
                dest.last_success_ms = Some((self.now_ms)());
                if recovered {
                    log::info!("onbind: {name} is reachable again");
                }
                self.delivered += 1;
                self.refused.remove(&delivery.id);
                let write = InviteWrite::Delivered {
                    delivery_id: delivery.id,
                    delete_tokens: self.delete_tokens_on_bind,
                    now_s: (self.now_ms)() / 1000,
                };
                let id = delivery.id;
                let done = self.store.write_invite(write);
                actix::spawn(async move {
                    if let Err(e) = done.await {
                        // Delivered but not recorded: sent again at the next start.
                        log::error!("onbind: delivery {id} could not be marked done: {e}");
                    }
                });
            }
            Some(error) => {
                dest.failures += 1;
                let backoff = FIRST_BACKOFF
                    .saturating_mul(1 << dest.failures.min(16).saturating_sub(1))
                    .min(MAX_BACKOFF);
                if dest.failures == 1 {
                    log::warn!("onbind: delivery to {name} failed ({error}); retrying");
                } else {
                    log::debug!("onbind: delivery to {name} failed again ({error})");
                }
                dest.last_error = Some(error);
                dest.retry_at = Some(std::time::Instant::now() + backoff);
                dest.retry_at_ms = Some((self.now_ms)() + backoff.as_millis() as i64);
                dest.queue.push_front(delivery);
                let retry = name.clone();
                ctx.run_later(backoff, move |act, ctx| act.pump(&retry, ctx));
                return;
            }
        }
        self.pump(&name, ctx);
    }

    fn give_up(&mut self, delivery: QueuedDelivery, reason: String) {
        log::warn!(
            "onbind: gave up delivering invites for a binding to {} (delivery {}): {reason}",
            delivery.destination,
            delivery.id
        );
        self.given_up += 1;
        self.refused.remove(&delivery.id);
        let write = InviteWrite::GaveUp {
            delivery_id: delivery.id,
            reason,
            now_ms: (self.now_ms)(),
        };
        let done = self.store.write_invite(write);
        let keys = Arc::clone(&self.pending_invites);
        actix::spawn(async move {
            match done.await {
                // Its invites are waiting again: a later bind of the address delivers them.
                Ok(()) => keys.insert(&delivery.medium, &delivery.address),
                Err(e) => log::error!(
                    "onbind: delivery {} could not be marked given up: {e}",
                    delivery.id
                ),
            }
        });
    }
}

impl Actor for OnbindQueue {
    type Context = Context<Self>;
}

/// A committed delivery (from the store), or one loaded at start.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Deliver(pub QueuedDelivery);

impl Handler<Deliver> for OnbindQueue {
    type Result = ();

    fn handle(&mut self, msg: Deliver, ctx: &mut Context<Self>) {
        self.enqueue(msg.0, ctx);
    }
}

impl StreamHandler<QueuedDelivery> for OnbindQueue {
    fn handle(&mut self, delivery: QueuedDelivery, ctx: &mut Context<Self>) {
        self.enqueue(delivery, ctx);
    }

    fn finished(&mut self, _: &mut Context<Self>) {
        // The store stopped: keep running for what is in flight; the node is stopping.
    }
}

/// What the internal status endpoint shows.
#[derive(Debug, Serialize)]
pub struct OnbindStatus {
    pub queued: usize,
    pub in_flight: usize,
    pub delivered: u64,
    pub given_up: u64,
    pub given_up_before_start: i64,
    pub destinations: std::collections::BTreeMap<String, DestinationStatus>,
}

#[derive(Debug, Serialize)]
pub struct DestinationStatus {
    pub queued: usize,
    pub in_flight: usize,
    /// Deliveries it refused (4xx), each waiting to be tried again.
    pub refused: usize,
    pub state: &'static str,
    pub last_error: Option<String>,
    pub next_attempt_ts: Option<i64>,
    pub last_success_ts: Option<i64>,
}

#[derive(Message)]
#[rtype(result = "OnbindStatus")]
pub struct GetStatus;

impl Handler<GetStatus> for OnbindQueue {
    type Result = MessageResult<GetStatus>;

    fn handle(&mut self, _: GetStatus, _: &mut Context<Self>) -> Self::Result {
        let destinations: std::collections::BTreeMap<_, _> = self
            .destinations
            .iter()
            .map(|(name, d)| {
                (
                    name.clone(),
                    DestinationStatus {
                        queued: d.queue.len(),
                        in_flight: d.in_flight,
                        refused: d.refused,
                        state: if d.failures > 0 {
                            "retrying"
                        } else if d.in_flight > 0 {
                            "delivering"
                        } else {
                            "idle"
                        },
                        last_error: d.last_error.clone(),
                        next_attempt_ts: d.retry_at_ms,
                        last_success_ts: d.last_success_ms,
                    },
                )
            })
            .collect();
        MessageResult(OnbindStatus {
            queued: destinations.values().map(|d| d.queued).sum(),
            in_flight: destinations.values().map(|d| d.in_flight).sum(),
            delivered: self.delivered,
            given_up: self.given_up,
            given_up_before_start: self.given_up_before,
            destinations,
        })
    }
}
