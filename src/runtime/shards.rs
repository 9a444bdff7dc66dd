//! Sharing ResourceGraphs among replicas (`--shards`): each graph belongs to one shard, by a
//! hash of its namespace and name, and each shard to the replica holding its Lease.
//!
//! Every replica renews a Lease of its own (`<id>-replica-<hash>`) so that replicas can count
//! each other. Shard `i` goes to the `i mod n`-th live replica in the order of their
//! identities: a replica takes the shards that fall to it when they are free or expired, and
//! hands over those that no longer do, after the reconciles running on them have finished.
//! Expiry is judged as the leader election judges it ([`leader::judge`]): by this process's
//! own clock, so clocks of different nodes need not agree.
//!
//! A replica that cannot renew a shard it holds for a whole renew deadline exits, as a leader
//! does, and its writes stop before that ([`Fence`]): no graph is ever worked on by two
//! replicas at once.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, DeleteParams, ListParams, PostParams, Preconditions};
use tokio::sync::{RwLock, RwLockReadGuard, watch};

use super::leader::{self, Holder, Observed, Timing};
use crate::runtime::shutdown::Shutdown;

/// On a replica's own Lease: the number of shards it splits graphs in.
const SHARDS_ANNOTATION: &str = "pequod.io/shards";

/// Most shards: each costs a Lease renewed every retry period.
pub const MAX_SHARDS: u32 = 64;

/// The shard of the object `name` in `namespace` among `count` (FNV-1a, stable across
/// releases and processes).
pub fn shard_of(namespace: &str, name: &str, count: u32) -> u32 {
    (fnv(&format!("{namespace}/{name}")) % u64::from(count.max(1))) as u32
}

/// What a replica does with one shard's Lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Move {
    /// It holds the shard and the shard falls to it.
    Renew,
    /// The shard falls to it and is free or expired.
    Take,
    /// It holds a shard that falls to another live replica.
    Release,
    /// Another replica holds it, or it falls to another.
    Leave,
}

/// Decides every shard's move for replica `me`, from each shard's holder (a missing Lease is
/// [`Holder::Nobody`]) and the live replicas (`me` among them).
///
/// Each live replica ends up with between `floor(count / n)` and `ceil(count / n)` shards, and
/// shards move only when they must: a replica keeps what it holds up to the ceiling, free
/// shards go to replicas below it (to those below the floor first), and while a replica is
/// below the floor the one holding most hands one over.
pub fn plan(count: u32, holders: &BTreeMap<u32, Holder>, live: &BTreeSet<String>, me: &str) -> BTreeMap<u32, Move> {
    let n = live.len().max(1) as u32;
    let (floor, cap) = (count / n, count.div_ceil(n));
    let holder_of = |shard: u32| holders.get(&shard).unwrap_or(&Holder::Nobody);
    let held_by = |replica: &str| {
        (0..count)
            .filter(|s| matches!(holder_of(*s), Holder::Live(h) if h == replica))
            .count() as u32
    };
    let counts: Vec<(u32, &String)> = live.iter().map(|r| (held_by(r), r)).collect();
    let needy = counts.iter().any(|(held, _)| *held < floor);
    let donor = counts.iter().max().map(|(_, r)| r.as_str());
    let mine: Vec<u32> = (0..count)
        .filter(|s| matches!(holder_of(*s), Holder::Live(h) if h == me))
        .collect();
    let mut keep = mine.len() as u32;
    if keep > cap {
        keep = cap;
    } else if needy && donor == Some(me) && keep > floor {
        keep -= 1;
    }
    let mut moves: BTreeMap<u32, Move> = (0..count).map(|s| (s, Move::Leave)).collect();
    for (i, shard) in mine.iter().enumerate() {
        let decision = if (i as u32) < keep { Move::Renew } else { Move::Release };
        moves.insert(*shard, decision);
    }
    // While some replica is below the floor, free shards are left to those below it.
    let limit = if needy { floor } else { cap };
    let free = (0..count).filter(|s| matches!(holder_of(*s), Holder::Nobody | Holder::Expired));
    for shard in free.take(limit.saturating_sub(keep) as usize) {
        moves.insert(shard, Move::Take);
    }
    moves
}

/// Stops a replica's writes once its shard Leases have gone a whole renew deadline without
/// renewal: a process that was paused (or cut off) resumes with its Leases possibly taken.
pub struct Fence {
    start: Instant,
    /// Milliseconds from `start` of the last renewal of every shard held.
    renewed_ms: AtomicU64,
    deadline: Duration,
}

impl Fence {
    fn new(deadline: Duration) -> Self {
        Self {
            start: Instant::now(),
            renewed_ms: AtomicU64::new(0),
            deadline,
        }
    }

    fn renewed(&self, at: Instant) {
        let ms = at.duration_since(self.start).as_millis() as u64;
        self.renewed_ms.store(ms, Ordering::Release);
    }

    /// Whether this replica may still write for the shards it holds.
    pub fn open(&self) -> bool {
        let renewed = self.start + Duration::from_millis(self.renewed_ms.load(Ordering::Acquire));
        renewed.elapsed() < self.deadline
    }
}

/// The shards this replica holds. A reconcile works on a graph only inside [`Shards::enter`],
/// and a shard is handed over only once the reconciles inside it have left.
pub struct Shards {
    count: u32,
    held: Vec<RwLock<bool>>,
    /// Shards being handed over: no reconcile enters them while those inside finish.
    closing: Vec<AtomicBool>,
    /// How many times each shard was taken: a graph queued under an earlier take may have
    /// had its retries with another replica since.
    takes: Vec<AtomicU64>,
    changed: watch::Sender<BTreeSet<u32>>,
    fence: Fence,
}

impl Shards {
    fn new(count: u32, renew_deadline: Duration) -> Self {
        Self {
            count,
            held: (0..count).map(|_| RwLock::new(false)).collect(),
            closing: (0..count).map(|_| AtomicBool::new(false)).collect(),
            takes: (0..count).map(|_| AtomicU64::new(0)).collect(),
            changed: watch::Sender::new(BTreeSet::new()),
            fence: Fence::new(renew_deadline),
        }
    }

    pub fn count(&self) -> u32 {
        self.count
    }

    pub fn shard_of(&self, namespace: &str, name: &str) -> u32 {
        shard_of(namespace, name, self.count)
    }

    /// Enters the shard of `namespace/name`; None when this replica does not hold it. The
    /// shard is not handed over while the guard lives.
    pub async fn enter(&self, namespace: &str, name: &str) -> Option<RwLockReadGuard<'_, bool>> {
        let shard = self.shard_of(namespace, name) as usize;
        let guard = self.held.get(shard)?.read().await;
        let closing = self.closing.get(shard).is_some_and(|c| c.load(Ordering::Acquire));
        (*guard && !closing && self.fence.open()).then_some(guard)
    }

    /// Whether this replica holds the shard of `namespace/name` but may not write for it: its
    /// Leases went unrenewed for a renew deadline.
    pub fn fenced(&self, namespace: &str, name: &str) -> bool {
        self.holds(namespace, name) && !self.fence.open()
    }

    /// Whether this replica holds the shard of `namespace/name` now.
    pub fn holds(&self, namespace: &str, name: &str) -> bool {
        self.changed.borrow().contains(&self.shard_of(namespace, name))
    }

    /// The shards held, as they change.
    pub fn subscribe(&self) -> watch::Receiver<BTreeSet<u32>> {
        self.changed.subscribe()
    }

    pub fn fence(&self) -> &Fence {
        &self.fence
    }

    async fn set(&self, shard: u32, held: bool) {
        if let Some(lock) = self.held.get(shard as usize) {
            // Waits for the reconciles inside the shard to leave.
            *lock.write().await = held;
        }
        self.reopen(shard);
        if held && let Some(takes) = self.takes.get(shard as usize) {
            takes.fetch_add(1, Ordering::AcqRel);
        }
        self.publish(shard, held);
    }

    /// The shards held now, each with how many times it was taken.
    pub fn held_takes(&self) -> BTreeMap<u32, u64> {
        let held = self.changed.borrow().clone();
        held.into_iter()
            .map(|s| (s, self.takes.get(s as usize).map_or(0, |t| t.load(Ordering::Acquire))))
            .collect()
    }

    /// Starts handing `shard` over: true once no reconcile is inside it (it is no longer held
    /// then); until then no new one enters.
    fn try_release(&self, shard: u32) -> bool {
        let (Some(lock), Some(closing)) = (self.held.get(shard as usize), self.closing.get(shard as usize)) else {
            return true;
        };
        closing.store(true, Ordering::Release);
        let Ok(mut held) = lock.try_write() else {
            return false;
        };
        *held = false;
        drop(held);
        closing.store(false, Ordering::Release);
        self.publish(shard, false);
        true
    }

    /// Keeps a shard whose hand-over started (it falls to this replica again).
    fn reopen(&self, shard: u32) {
        if let Some(closing) = self.closing.get(shard as usize) {
            closing.store(false, Ordering::Release);
        }
    }

    fn publish(&self, shard: u32, held: bool) {
        self.changed.send_modify(|set| {
            if held {
                set.insert(shard);
            } else {
                set.remove(&shard);
            }
        });
    }
}

/// Where the Leases are and whose they are.
pub struct LeaseConfig {
    pub api: Api<Lease>,
    /// The leader-election id, which prefixes the Leases' names.
    pub prefix: String,
    pub identity: String,
    pub timing: Timing,
}

/// Keeps this replica's Leases: its own, and the shards that fall to it.
pub struct Keeper {
    config: LeaseConfig,
    shards: Arc<Shards>,
    observed: HashMap<String, Observed>,
    /// When each shard held was last renewed.
    renewed: BTreeMap<u32, Instant>,
    /// A shard held whose Lease another replica wrote: it was taken.
    lost: Option<u32>,
}

/// Why a keeper stopped.
#[derive(Debug, PartialEq, Eq)]
pub enum Stopped {
    /// Shutdown: its shards were handed over.
    ShutDown,
    /// A shard held could not be renewed for a whole renew deadline.
    Lost(u32),
}

impl Keeper {
    pub fn new(config: LeaseConfig, count: u32) -> (Self, Arc<Shards>) {
        let shards = Arc::new(Shards::new(count, config.timing.renew_deadline));
        (
            Self {
                config,
                shards: shards.clone(),
                observed: HashMap::new(),
                renewed: BTreeMap::new(),
                lost: None,
            },
            shards,
        )
    }

    fn shard_lease(&self, shard: u32) -> String {
        format!("{}-shard-{shard}", self.config.prefix)
    }

    fn replica_lease(&self) -> String {
        format!("{}-replica-{:016x}", self.config.prefix, fnv(&self.config.identity))
    }

    /// Keeps the Leases until shutdown (hands every shard over) or a shard is lost.
    pub async fn run(mut self, shutdown: Shutdown) -> Stopped {
        loop {
            // Each round is time-boxed by what is left of the renew deadline: a request that
            // hangs must not keep this replica working after another may have taken its shards.
            let deadline = self.config.timing.renew_deadline;
            let left = self
                .renewed
                .values()
                .map(|at| deadline.saturating_sub(at.elapsed()))
                .min()
                .unwrap_or(deadline);
            match tokio::time::timeout(left, self.round()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "shards: reading or writing the shard leases failed"),
                Err(_) => tracing::warn!("shards: renewing the shard leases timed out"),
            }
            if let Some(shard) = self.lost {
                return Stopped::Lost(shard);
            }
            if let Some((&shard, _)) = self.renewed.iter().find(|(_, at)| at.elapsed() >= deadline) {
                return Stopped::Lost(shard);
            }
            tokio::select! {
                _ = shutdown.wait() => break,
                _ = tokio::time::sleep(self.config.timing.retry_period) => {}
            }
        }
        // The others stop counting this replica first, so that none hands it a shard.
        let _ = self
            .config
            .api
            .delete(&self.replica_lease(), &DeleteParams::default())
            .await;
        for shard in self.renewed.keys().copied().collect::<Vec<_>>() {
            self.release(shard).await;
        }
        Stopped::ShutDown
    }

    /// One look at the Leases: renews this replica's own, then moves each shard as [`plan`]
    /// says.
    async fn round(&mut self) -> Result<(), kube::Error> {
        let leases = self.config.api.list(&ListParams::default()).await?;
        let own = self.replica_lease();
        // Failing to renew its own Lease only makes this replica look gone to the others for a
        // while; its shards are renewed all the same.
        let listed_own = leases
            .items
            .iter()
            .find(|l| l.metadata.name.as_deref() == Some(own.as_str()));
        if let Err(e) = self.renew_replica(listed_own.cloned()).await {
            tracing::warn!(error = %e, "shards: renewing this replica's lease failed");
        }
        let now = Instant::now();
        let timing = self.config.timing;
        let replica_prefix = format!("{}-replica-", self.config.prefix);
        let mut live = BTreeSet::from([self.config.identity.clone()]);
        let mut holders = BTreeMap::new();
        let mut by_shard = HashMap::new();
        let mut gone = Vec::new();
        // A live replica that splits graphs in another number of shards hashes them otherwise.
        let mut counted_otherwise = None;
        for lease in leases.items {
            let name = lease.metadata.name.clone().unwrap_or_default();
            let shard = self.shard_named(&name);
            if name == own || (shard.is_none() && !name.starts_with(&replica_prefix)) {
                continue;
            }
            let spec = lease.spec.clone().unwrap_or_default();
            let observed = self.observed.entry(name).or_default();
            let holder = if spec.holder_identity.as_deref() == Some(self.config.identity.as_str()) {
                match shard {
                    // A shard Lease naming this replica that it did not take was written by
                    // someone else: the shard is nobody's until a replica takes it.
                    Some(s) if !self.renewed.contains_key(&s) => Holder::Expired,
                    _ => Holder::Live(self.config.identity.clone()),
                }
            } else {
                leader::judge(&spec, observed, now, &timing)
            };
            match (shard, holder) {
                (Some(shard), holder) => {
                    holders.insert(shard, holder);
                    by_shard.insert(shard, lease);
                }
                (None, Holder::Live(identity)) => {
                    let theirs = lease
                        .metadata
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get(SHARDS_ANNOTATION));
                    if theirs != Some(&self.shards.count.to_string()) {
                        counted_otherwise = Some(identity.clone());
                    }
                    live.insert(identity);
                }
                // A replica gone for good leaves its Lease behind.
                (None, Holder::Expired | Holder::Nobody) => gone.push(lease),
            }
        }
        for lease in &gone {
            if self.forget_replica(lease).await
                && let Some(name) = &lease.metadata.name
            {
                self.observed.remove(name);
            }
        }
        // A shard held whose Lease now names another replica (or none) was taken.
        let me = Holder::Live(self.config.identity.clone());
        if let Some(&shard) = self.renewed.keys().find(|s| holders.get(s) != Some(&me)) {
            self.lost = Some(shard);
            return Ok(());
        }
        let moves = plan(self.shards.count, &holders, &live, &self.config.identity);
        let of = |wanted: Move| moves.iter().filter(move |(_, m)| **m == wanted).map(|(s, _)| *s);
        // A shard whose reconciles have not finished yet is renewed until they have: the
        // hand-over never waits inside a round, which must renew in time.
        let mut renew: Vec<u32> = of(Move::Renew).collect();
        for shard in of(Move::Release).collect::<Vec<_>>() {
            if self.shards.try_release(shard) {
                self.free(shard, by_shard.remove(&shard)).await;
            } else {
                renew.push(shard);
            }
        }
        let mut renewed_all = true;
        for shard in renew {
            if of(Move::Renew).any(|s| s == shard) {
                self.shards.reopen(shard);
            }
            renewed_all &= self.write(shard, by_shard.remove(&shard), false).await?;
        }
        if renewed_all {
            self.shards.fence.renewed(now);
        }
        if let Some(other) = counted_otherwise {
            tracing::warn!(replica = %other, shards = self.shards.count, "shards: a live replica runs with another --shards; taking no shard until it is gone");
            return Ok(());
        }
        for shard in of(Move::Take).collect::<Vec<_>>() {
            match self.write(shard, by_shard.remove(&shard), true).await {
                Ok(true) => {
                    tracing::info!(shard, "shards: took the shard");
                    self.shards.set(shard, true).await;
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, shard, "shards: taking the shard failed"),
            }
        }
        Ok(())
    }

    fn shard_named(&self, name: &str) -> Option<u32> {
        let shard: u32 = name
            .strip_prefix(&format!("{}-shard-", self.config.prefix))?
            .parse()
            .ok()?;
        (shard < self.shards.count).then_some(shard)
    }

    /// Renews this replica's own Lease, as listed (None: absent).
    async fn renew_replica(&mut self, lease: Option<Lease>) -> Result<(), kube::Error> {
        let name = self.replica_lease();
        let exists = lease.is_some();
        let mut lease = self.stamped(&name, lease, true);
        lease
            .metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert(SHARDS_ANNOTATION.to_string(), self.shards.count.to_string());
        if exists {
            self.config.api.replace(&name, &PostParams::default(), &lease).await?;
        } else {
            self.config.api.create(&PostParams::default(), &lease).await?;
        }
        Ok(())
    }

    /// Deletes another replica's expired Lease, unless it changed since it was read; true when
    /// deleted.
    async fn forget_replica(&self, lease: &Lease) -> bool {
        let name = lease.metadata.name.clone().unwrap_or_default();
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                resource_version: lease.metadata.resource_version.clone(),
                uid: lease.metadata.uid.clone(),
            }),
            ..Default::default()
        };
        let deleted = self.config.api.delete(&name, &params).await.is_ok();
        if deleted {
            tracing::info!(lease = %name, "shards: removed the lease of a replica gone");
        }
        deleted
    }

    /// `lease` (or a new one) held by this replica and renewed now.
    fn stamped(&self, name: &str, lease: Option<Lease>, take: bool) -> Lease {
        let now = MicroTime(jiff::Timestamp::now());
        let mut lease = lease.unwrap_or_else(|| Lease {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                ..Default::default()
            },
            spec: Some(LeaseSpec::default()),
        });
        let spec = lease.spec.get_or_insert_with(Default::default);
        if take && spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            spec.holder_identity = Some(self.config.identity.clone());
            spec.acquire_time = Some(now.clone());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.lease_duration_seconds =
            Some(i32::try_from(self.config.timing.lease_duration.as_secs()).unwrap_or(i32::MAX));
        spec.renew_time = Some(now);
        lease
    }

    /// Renews or takes a shard's Lease; false when another replica wrote it first. The
    /// resourceVersion makes a concurrent writer lose instead of both holding it.
    async fn write(&mut self, shard: u32, lease: Option<Lease>, take: bool) -> Result<bool, kube::Error> {
        let name = self.shard_lease(shard);
        let started = Instant::now();
        let result = match lease {
            Some(lease) => {
                let lease = self.stamped(&name, Some(lease), take);
                self.config.api.replace(&name, &PostParams::default(), &lease).await
            }
            None => {
                let lease = self.stamped(&name, None, true);
                self.config.api.create(&PostParams::default(), &lease).await
            }
        };
        match result {
            Ok(_) => {
                self.renewed.insert(shard, started);
                Ok(true)
            }
            Err(kube::Error::Api(s)) if s.code == 409 => {
                // A write of this replica's that outlived a round cut short also conflicts:
                // the shard is lost only if the Lease names another holder.
                if self.renewed.contains_key(&shard) {
                    let holder = self
                        .config
                        .api
                        .get_opt(&name)
                        .await?
                        .and_then(|l| l.spec?.holder_identity);
                    if holder.as_deref() != Some(self.config.identity.as_str()) {
                        self.lost = Some(shard);
                    }
                }
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Hands a shard over at shutdown: waits for its reconciles to leave, then frees its Lease.
    async fn release(&mut self, shard: u32) {
        self.shards.set(shard, false).await;
        self.free(shard, None).await;
    }

    /// Frees the Lease of a shard no longer held.
    /// `listed`: the Lease as this round read it; None reads it.
    async fn free(&mut self, shard: u32, listed: Option<Lease>) {
        self.renewed.remove(&shard);
        let name = self.shard_lease(shard);
        let lease = match listed {
            Some(lease) => Some(lease),
            None => self.config.api.get_opt(&name).await.ok().flatten(),
        };
        let Some(mut lease) = lease else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        match self.config.api.replace(&name, &PostParams::default(), &lease).await {
            Ok(_) => tracing::info!(shard, "shards: handed the shard over"),
            Err(e) => tracing::warn!(error = %e, shard, "shards: freeing the shard's lease failed"),
        }
    }
}

fn fnv(text: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    fn held(pairs: &[(u32, &str)]) -> BTreeMap<u32, Holder> {
        pairs.iter().map(|(s, h)| (*s, Holder::Live(h.to_string()))).collect()
    }

    fn moves_of(moves: &BTreeMap<u32, Move>, wanted: Move) -> Vec<u32> {
        moves.iter().filter(|(_, m)| **m == wanted).map(|(s, _)| *s).collect()
    }

    /// Plays the replicas' rounds in turn until nothing moves; each round's moves succeed.
    fn settle(count: u32, holders: &mut BTreeMap<u32, Holder>, replicas: &[&str]) {
        let alive = live(replicas);
        for _ in 0..20 {
            let mut moved = false;
            for me in replicas {
                for (shard, m) in plan(count, holders, &alive, me) {
                    match m {
                        Move::Take => {
                            holders.insert(shard, Holder::Live(me.to_string()));
                            moved = true;
                        }
                        Move::Release => {
                            holders.insert(shard, Holder::Nobody);
                            moved = true;
                        }
                        Move::Renew | Move::Leave => {}
                    }
                }
            }
            if !moved {
                return;
            }
        }
        panic!("the shards kept moving: {holders:?}");
    }

    fn counts(holders: &BTreeMap<u32, Holder>) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for h in holders.values() {
            if let Holder::Live(h) = h {
                *counts.entry(h.clone()).or_default() += 1;
            }
        }
        counts
    }

    #[test]
    fn replicas_starting_one_after_another_end_up_with_even_shares() {
        let mut holders = BTreeMap::new();
        settle(6, &mut holders, &["a"]);
        assert_eq!(counts(&holders)["a"], 6);
        settle(6, &mut holders, &["a", "b"]);
        assert_eq!(counts(&holders), BTreeMap::from([("a".into(), 3), ("b".into(), 3)]));
        settle(6, &mut holders, &["a", "b", "c"]);
        assert!(counts(&holders).values().all(|c| *c == 2), "{holders:?}");
        settle(7, &mut holders, &["a", "b", "c"]);
        let shares: Vec<usize> = counts(&holders).into_values().collect();
        assert_eq!(shares.iter().sum::<usize>(), 7);
        assert!(shares.iter().all(|c| (2..=3).contains(c)), "{shares:?}");
    }

    #[test]
    fn a_replica_gone_leaves_its_shards_to_the_rest_once_they_expire_and_nothing_else_moves() {
        let mut holders = BTreeMap::new();
        settle(6, &mut holders, &["a", "b", "c"]);
        let before = holders.clone();
        let alive = live(&["a", "c"]);
        // b's leases still run: nothing moves.
        assert!(
            plan(6, &holders, &alive, "a")
                .values()
                .all(|m| matches!(m, Move::Renew | Move::Leave))
        );
        for h in holders.values_mut() {
            if *h == Holder::Live("b".into()) {
                *h = Holder::Expired;
            }
        }
        settle(6, &mut holders, &["a", "c"]);
        assert_eq!(counts(&holders), BTreeMap::from([("a".into(), 3), ("c".into(), 3)]));
        for (shard, holder) in &before {
            if *holder != Holder::Live("b".into()) {
                assert_eq!(&holders[shard], holder, "shard {shard} of a survivor moved");
            }
        }
    }

    #[test]
    fn a_replica_joining_is_handed_its_share_and_waits_for_the_hand_over() {
        let holders = held(&[(0, "a"), (1, "a"), (2, "a"), (3, "a")]);
        let replicas = live(&["a", "b"]);
        let for_a = plan(4, &holders, &replicas, "a");
        assert_eq!(moves_of(&for_a, Move::Renew), vec![0, 1], "a keeps its share");
        assert_eq!(moves_of(&for_a, Move::Release), vec![2, 3]);
        let for_b = plan(4, &holders, &replicas, "b");
        assert!(for_b.values().all(|m| *m == Move::Leave), "b waits for a to hand over");
        let handed = held(&[(0, "a"), (1, "a"), (2, "a")]);
        assert_eq!(moves_of(&plan(4, &handed, &replicas, "b"), Move::Take), vec![3]);
        assert_eq!(
            moves_of(&plan(4, &handed, &replicas, "a"), Move::Release),
            vec![2],
            "a, holding most while b is below its share, hands one over"
        );
        assert_eq!(
            moves_of(&plan(4, &handed, &replicas, "a"), Move::Take),
            Vec::<u32>::new(),
            "a leaves the free shard to b, below its share"
        );
    }

    #[test]
    fn a_lone_replica_takes_every_free_or_expired_shard_and_leaves_live_ones() {
        let mut holders = held(&[(0, "gone")]);
        holders.insert(1, Holder::Expired);
        let moves = plan(3, &holders, &live(&["a"]), "a");
        assert_eq!(moves[&0], Move::Leave, "held by a replica whose lease still runs");
        assert_eq!(moves_of(&moves, Move::Take), vec![1, 2]);
    }

    #[test]
    fn the_shard_of_an_object_is_stable_and_spread() {
        assert_eq!(shard_of("team-a", "web", 1), 0);
        assert_eq!(shard_of("team-a", "web", 7), shard_of("team-a", "web", 7));
        assert_ne!(
            (0..8)
                .map(|i| shard_of("team-a", &format!("web-{i}"), 4))
                .collect::<BTreeSet<_>>()
                .len(),
            1
        );
        let mut counts = [0u32; 4];
        for i in 0..4000 {
            counts[shard_of("team-a", &format!("web-{i}"), 4) as usize] += 1;
        }
        assert!(counts.iter().all(|c| (900..1100).contains(c)), "{counts:?}");
    }

    #[tokio::test]
    async fn a_shard_is_handed_over_only_once_the_reconciles_inside_it_have_left() {
        let shards = Shards::new(1, Duration::from_secs(10));
        shards.fence.renewed(Instant::now());
        shards.set(0, true).await;
        let inside = shards.enter("team-a", "web").await.expect("held");
        assert!(!shards.try_release(0), "a reconcile is inside");
        assert!(
            shards.enter("team-a", "other").await.is_none(),
            "no new one enters a closing shard"
        );
        assert!(shards.holds("team-a", "web"));
        drop(inside);
        assert!(shards.try_release(0));
        assert!(!shards.holds("team-a", "web"));
        assert!(shards.enter("team-a", "web").await.is_none());
        // Taken again: open to reconciles.
        shards.set(0, true).await;
        assert!(shards.enter("team-a", "web").await.is_some());
    }

    #[tokio::test]
    async fn a_held_shard_behind_a_closed_fence_is_fenced_not_elsewhere() {
        let shards = Shards::new(1, Duration::from_millis(20));
        shards.fence.renewed(Instant::now());
        shards.set(0, true).await;
        assert!(!shards.fenced("team-a", "web"));
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(shards.enter("team-a", "web").await.is_none());
        assert!(shards.fenced("team-a", "web"));
    }

    #[test]
    fn the_fence_closes_a_renew_deadline_after_the_last_renewal() {
        let fence = Fence::new(Duration::from_millis(50));
        fence.renewed(Instant::now());
        assert!(fence.open());
        std::thread::sleep(Duration::from_millis(60));
        assert!(!fence.open());
        fence.renewed(Instant::now());
        assert!(fence.open());
    }
}
