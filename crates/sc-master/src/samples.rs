//! The cluster's figures over time, behind the admin page's charts.
//!
//! Every second the [`Sampler`] scrapes every registered member (`sc.metrics.v1.Metrics/Scrape`,
//! see [`scrape`]: all members in parallel, each within a short deadline, with the cluster
//! secret) and derives one [`Sample`] of the whole cluster: the connections open on the workers
//! and on the balancers (sums of `sc_connections_open`), the WebSocket messages in and out per
//! second (rates of the workers' `sc_messages_received_total` and `sc_messages_sent_total`),
//! and the brokers' publishes and deliveries per second. A member that does not serve `Scrape`
//! (UNIMPLEMENTED), does not answer in time or has just started adds nothing to a sample: its
//! figures are missing, not an error.
//!
//! Memory is bounded: [`Samples`] keeps the last [`WINDOW`] (15 minutes) in a ring of
//! [`RING_LEN`] samples (one a second, 64 bytes each: about 56 KiB), and the [`Deriver`] one
//! counter record per live member process. The admin page's event stream (`GET /events`) sends
//! the ring once, then each new sample as it comes ([`Samples::subscribe`]). The last figures of
//! each member are kept too ([`Samples::member`]): `/status` shows a broker's link to Redis
//! from them.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sc_common::Role;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::health::Instance;
use crate::registry::Registry;

pub(crate) mod scrape;

pub(crate) use scrape::Figures;

/// How often the cluster is sampled.
pub(crate) const INTERVAL: Duration = Duration::from_secs(1);

/// How far back the charts go.
pub(crate) const WINDOW: Duration = Duration::from_secs(15 * 60);

/// Samples kept: [`WINDOW`] at one per [`INTERVAL`].
pub(crate) const RING_LEN: usize = (WINDOW.as_secs() / INTERVAL.as_secs()) as usize;

/// How long one member's scrape may take: well within [`INTERVAL`], so that a hung member
/// delays no sample.
const SCRAPE_DEADLINE: Duration = Duration::from_millis(700);

/// The whole cluster at one moment. Rates are per second since the previous sample of each
/// member; sums over the members that gave figures.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Sample {
    /// Wall-clock time, milliseconds since the Unix epoch.
    pub(crate) time_ms: u64,
    /// Members registered (asked for figures).
    pub(crate) members: u32,
    /// Members that answered with figures.
    pub(crate) scraped: u32,
    /// Sum of the workers' `sc_connections_open`.
    pub(crate) worker_connections: f64,
    /// Sum of the balancers' `sc_connections_open`.
    pub(crate) balancer_connections: f64,
    /// WebSocket messages from clients per second (workers' `sc_messages_received_total`).
    pub(crate) messages_in: f64,
    /// WebSocket messages to clients per second (workers' `sc_messages_sent_total`).
    pub(crate) messages_out: f64,
    /// Publishes per second (brokers' `sc_broker_publishes_total`).
    pub(crate) publishes: f64,
    /// Deliveries per second (brokers' `sc_broker_deliveries_total`).
    pub(crate) deliveries: f64,
}

/// The ring of the last [`RING_LEN`] samples and the signal of each new one.
#[derive(Debug)]
pub(crate) struct Samples {
    /// std Mutex: a push or a copy, never held across await.
    ring: Mutex<VecDeque<Sample>>,
    /// The newest sample, for the event streams (a watch: a slow reader skips to the newest).
    latest: watch::Sender<Option<Sample>>,
    /// The newest figures of each member process (for `/status`: a broker's link to Redis).
    /// std Mutex: a swap or a copy.
    members: Mutex<HashMap<Instance, Figures>>,
}

/// Turns each member's figures into cluster-wide sums and rates: keeps, per member process,
/// its counters at its previous scrape.
#[derive(Debug, Default)]
pub(crate) struct Deriver {
    last: HashMap<Instance, (Instant, Figures)>,
}

/// What one round of scrapes gave for one member process: `None` when it gave no figures.
pub(crate) type Scraped = (Instance, Role, Option<Figures>);

/// The task that samples the cluster every [`INTERVAL`].
#[derive(Debug)]
pub(crate) struct Sampler {
    pub(crate) registry: Arc<Registry>,
    pub(crate) samples: Arc<Samples>,
    /// The cluster secret, sent with every scrape.
    pub(crate) secret: String,
}

impl Default for Samples {
    fn default() -> Self {
        Self {
            ring: Mutex::new(VecDeque::with_capacity(RING_LEN)),
            latest: watch::channel(None).0,
            members: Mutex::default(),
        }
    }
}

impl Samples {
    /// Adds `sample`, dropping the oldest beyond [`RING_LEN`], and tells the subscribers.
    pub(crate) fn push(&self, sample: Sample) {
        {
            let mut ring = self.ring.lock().unwrap_or_else(PoisonError::into_inner);
            if ring.len() == RING_LEN {
                ring.pop_front();
            }
            ring.push_back(sample);
        }
        self.latest.send_replace(Some(sample));
    }

    /// Every kept sample, oldest first.
    pub(crate) fn history(&self) -> Vec<Sample> {
        self.ring.lock().unwrap_or_else(PoisonError::into_inner).iter().copied().collect()
    }

    /// Keeps each member's figures from `round`: a member that gave none this time (a scrape
    /// late once) keeps its previous ones; a member no longer in the round is forgotten.
    pub(crate) fn set_members(&self, round: &[Scraped]) {
        let mut members = self.members.lock().unwrap_or_else(PoisonError::into_inner);
        let mut next = HashMap::with_capacity(round.len());
        for (instance, _, figures) in round {
            if let Some(figures) = figures.or_else(|| members.get(instance).copied()) {
                next.insert(instance.clone(), figures);
            }
        }
        *members = next;
    }

    /// The newest figures of the member process `instance`, if it gave any.
    pub(crate) fn member(&self, instance: &Instance) -> Option<Figures> {
        self.members.lock().unwrap_or_else(PoisonError::into_inner).get(instance).copied()
    }

    /// A receiver that sees each new sample (or, if it reads slowly, the newest).
    pub(crate) fn subscribe(&self) -> watch::Receiver<Option<Sample>> {
        self.latest.subscribe()
    }
}

impl Deriver {
    /// One cluster sample from one round of scrapes taken at `now` (`time_ms` on the wall
    /// clock). Counters give rates from each member's previous scrape: a member seen for the
    /// first time (or a new process of it) gives its gauges but no rates yet, and a counter that
    /// went down (the member's counters were reset) counts from zero. Members no longer in the
    /// round are forgotten.
    pub(crate) fn sample(&mut self, now: Instant, time_ms: u64, round: &[Scraped]) -> Sample {
        let mut sample = Sample { time_ms, members: round.len() as u32, ..Sample::default() };
        self.last.retain(|instance, _| round.iter().any(|(i, _, _)| i == instance));
        for (instance, role, figures) in round {
            let Some(figures) = figures else { continue };
            sample.scraped += 1;
            match role {
                Role::Worker => sample.worker_connections += figures.connections_open,
                Role::Balancer => sample.balancer_connections += figures.connections_open,
                Role::Broker => {}
            }
            if let Some((then, before)) = self.last.get(instance) {
                let seconds = now.duration_since(*then).as_secs_f64();
                if seconds > 0.0 {
                    let rate =
                        |now: f64, before: f64| if now >= before { now - before } else { now } / seconds;
                    sample.messages_in += rate(figures.messages_received, before.messages_received);
                    sample.messages_out += rate(figures.messages_sent, before.messages_sent);
                    sample.publishes += rate(figures.publishes, before.publishes);
                    sample.deliveries += rate(figures.deliveries, before.deliveries);
                }
            }
            self.last.insert(instance.clone(), (now, *figures));
        }
        sample
    }
}

impl Sampler {
    /// Samples every [`INTERVAL`] until `shutdown`.
    pub(crate) async fn run(self, shutdown: CancellationToken) {
        let mut clients = scrape::Clients::new(&self.secret, SCRAPE_DEADLINE);
        let mut deriver = Deriver::default();
        let mut tick = tokio::time::interval(INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let membership = self.registry.snapshot();
            let round = tokio::select! {
                _ = shutdown.cancelled() => return,
                round = clients.scrape_all(&membership.members) => round,
            };
            let time_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
            self.samples.push(deriver.sample(Instant::now(), time_ms, &round));
            self.samples.set_members(&round);
        }
    }
}

#[cfg(test)]
mod tests {
    use sc_proto::metrics::v1 as pb;

    use super::*;

    fn family(name: &str, kind: pb::Kind, values: &[(&[(&str, &str)], f64)]) -> pb::Family {
        pb::Family {
            name: name.into(),
            help: String::new(),
            kind: kind as i32,
            samples: values
                .iter()
                .map(|(labels, value)| pb::Sample {
                    labels: labels
                        .iter()
                        .map(|(n, v)| pb::Label { name: (*n).into(), value: (*v).into() })
                        .collect(),
                    value: *value,
                    ..pb::Sample::default()
                })
                .collect(),
        }
    }

    /// What a worker's Scrape answers: plain and TLS connections, messages in and out, and a
    /// family the page does not use.
    fn worker(open: (f64, f64), received: f64, sent: f64) -> pb::ScrapeResponse {
        pb::ScrapeResponse {
            families: vec![
                family(
                    "sc_connections_open",
                    pb::Kind::Gauge,
                    &[
                        (&[("role", "worker"), ("transport", "plain")], open.0),
                        (&[("role", "worker"), ("transport", "tls")], open.1),
                    ],
                ),
                family("sc_messages_received_total", pb::Kind::Counter, &[(&[("role", "worker")], received)]),
                family("sc_messages_sent_total", pb::Kind::Counter, &[(&[("role", "worker")], sent)]),
                family("sc_handshakes_total", pb::Kind::Counter, &[(&[], 1000.0)]),
            ],
        }
    }

    fn balancer(open: f64) -> pb::ScrapeResponse {
        pb::ScrapeResponse {
            families: vec![family(
                "sc_connections_open",
                pb::Kind::Gauge,
                &[(&[("role", "balancer"), ("transport", "plain")], open)],
            )],
        }
    }

    fn broker(publishes: f64, deliveries: f64) -> pb::ScrapeResponse {
        pb::ScrapeResponse {
            families: vec![
                family("sc_broker_publishes_total", pb::Kind::Counter, &[(&[], publishes)]),
                family("sc_broker_deliveries_total", pb::Kind::Counter, &[(&[], deliveries)]),
            ],
        }
    }

    fn scraped(id: &str, pid: u32, role: Role, response: Option<pb::ScrapeResponse>) -> Scraped {
        ((id.into(), pid), role, response.map(|r| Figures::from_scrape(&r)))
    }

    #[test]
    fn a_scrape_sums_the_families_the_page_uses() {
        let figures = Figures::from_scrape(&worker((3.0, 2.0), 40.0, 70.0));
        assert_eq!(figures.connections_open, 5.0, "plain and TLS");
        assert_eq!((figures.messages_received, figures.messages_sent), (40.0, 70.0));
        assert_eq!((figures.publishes, figures.deliveries), (0.0, 0.0));
        let figures = Figures::from_scrape(&broker(12.0, 36.0));
        assert_eq!((figures.publishes, figures.deliveries, figures.connections_open), (12.0, 36.0, 0.0));
    }

    #[test]
    fn a_brokers_link_to_redis_is_kept_per_member() {
        let mut on_redis = broker(1.0, 2.0);
        on_redis.families.push(family("sc_broker_redis_up", pb::Kind::Gauge, &[(&[], 0.0)]));
        on_redis.families.push(family(
            "sc_broker_redis_down_since_seconds",
            pb::Kind::Gauge,
            &[(&[], 1_700_000_000.5)],
        ));
        let figures = Figures::from_scrape(&on_redis);
        assert_eq!((figures.redis_up, figures.redis_down_since), (Some(0.0), 1_700_000_000.5));
        assert_eq!(Figures::from_scrape(&broker(1.0, 2.0)).redis_up, None, "memory backend: no link");

        let samples = Samples::default();
        let id = ("broker-0".to_owned(), 4);
        samples.set_members(&[(id.clone(), Role::Broker, Some(figures))]);
        // A scrape late once keeps the last figures; a member gone is forgotten.
        samples.set_members(&[(id.clone(), Role::Broker, None)]);
        assert_eq!(samples.member(&id).and_then(|f| f.redis_up), Some(0.0));
        samples.set_members(&[]);
        assert_eq!(samples.member(&id), None);
    }

    #[tokio::test(start_paused = true)]
    async fn rates_come_from_each_members_previous_scrape() {
        let mut deriver = Deriver::default();
        let t0 = Instant::now();
        let first = deriver.sample(
            t0,
            1_000,
            &[
                scraped("balancer-0", 1, Role::Balancer, Some(balancer(9.0))),
                scraped("worker-0", 2, Role::Worker, Some(worker((4.0, 0.0), 100.0, 1_000.0))),
                scraped("worker-1", 3, Role::Worker, Some(worker((5.0, 0.0), 50.0, 500.0))),
                scraped("broker-0", 4, Role::Broker, Some(broker(10.0, 90.0))),
            ],
        );
        assert_eq!((first.time_ms, first.members, first.scraped), (1_000, 4, 4));
        assert_eq!((first.worker_connections, first.balancer_connections), (9.0, 9.0));
        assert_eq!((first.messages_in, first.publishes), (0.0, 0.0), "no rate from a first scrape");

        // Two seconds later: worker-0 received 40 and sent 400 more, worker-1 20 and 200, the
        // broker took 60 publishes and made 180 deliveries.
        let second = deriver.sample(
            t0 + Duration::from_secs(2),
            3_000,
            &[
                scraped("balancer-0", 1, Role::Balancer, Some(balancer(11.0))),
                scraped("worker-0", 2, Role::Worker, Some(worker((6.0, 1.0), 140.0, 1_400.0))),
                scraped("worker-1", 3, Role::Worker, Some(worker((4.0, 0.0), 70.0, 700.0))),
                scraped("broker-0", 4, Role::Broker, Some(broker(70.0, 270.0))),
            ],
        );
        assert_eq!((second.worker_connections, second.balancer_connections), (11.0, 11.0));
        assert_eq!((second.messages_in, second.messages_out), (30.0, 300.0));
        assert_eq!((second.publishes, second.deliveries), (30.0, 90.0));
    }

    #[tokio::test(start_paused = true)]
    async fn missing_figures_new_processes_and_resets() {
        let mut deriver = Deriver::default();
        let t0 = Instant::now();
        deriver.sample(
            t0,
            0,
            &[
                scraped("worker-0", 2, Role::Worker, Some(worker((1.0, 0.0), 100.0, 100.0))),
                scraped("worker-1", 3, Role::Worker, Some(worker((1.0, 0.0), 100.0, 100.0))),
            ],
        );
        // worker-0 does not answer this round; worker-1 was replaced (new pid).
        let second = deriver.sample(
            t0 + Duration::from_secs(1),
            0,
            &[
                scraped("worker-0", 2, Role::Worker, None),
                scraped("worker-1", 9, Role::Worker, Some(worker((2.0, 0.0), 5.0, 5.0))),
            ],
        );
        assert_eq!((second.members, second.scraped), (2, 1));
        assert_eq!(second.worker_connections, 2.0);
        assert_eq!(second.messages_in, 0.0, "a new process gives no rate yet");
        // worker-0 answers again: its rate spans the two seconds since its last answer; the
        // new worker-1 went from 5 to 25; then worker-1's counters go down (a reset).
        let third = deriver.sample(
            t0 + Duration::from_secs(2),
            0,
            &[
                scraped("worker-0", 2, Role::Worker, Some(worker((1.0, 0.0), 160.0, 100.0))),
                scraped("worker-1", 9, Role::Worker, Some(worker((2.0, 0.0), 25.0, 5.0))),
            ],
        );
        assert_eq!(third.messages_in, 30.0 + 20.0);
        let fourth = deriver.sample(
            t0 + Duration::from_secs(3),
            0,
            &[scraped("worker-1", 9, Role::Worker, Some(worker((2.0, 0.0), 4.0, 5.0)))],
        );
        assert_eq!(fourth.messages_in, 4.0, "counted from zero after a reset");
        assert_eq!(deriver.last.len(), 1, "worker-0 left the membership: forgotten");
        // No member serves Scrape (before the metrics exist): flat zeros, no error.
        let none =
            deriver.sample(t0 + Duration::from_secs(4), 0, &[scraped("worker-1", 9, Role::Worker, None)]);
        assert_eq!(none, Sample { members: 1, ..Sample::default() });
    }

    #[test]
    fn the_ring_keeps_fifteen_minutes() {
        let samples = Samples::default();
        let mut rx = samples.subscribe();
        for n in 0..(RING_LEN as u64 + 10) {
            samples.push(Sample { time_ms: n, ..Sample::default() });
        }
        let history = samples.history();
        assert_eq!(history.len(), 900);
        assert_eq!((history[0].time_ms, history[899].time_ms), (10, 909));
        assert!(rx.has_changed().unwrap());
        assert_eq!(rx.borrow_and_update().map(|s| s.time_ms), Some(909));
    }
}
