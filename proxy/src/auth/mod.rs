//! Authentication and authorization, answered from memory.
//!
//! The control plane builds an [`AuthIndex`] (users, API key digests, collaborator roles) from
//! the store and publishes it with one atomic swap after every change, before it answers the
//! change's request. Both the model path and the REST API check callers against the index, so a
//! check costs no store access, and a deleted key, a removed collaborator or a deactivated user
//! fails on the very next request. Expiry is compared with the clock on every check.
//!
//! Nothing here logs or returns key material: failures name at most the key's public id.

pub mod key;
pub mod roles;

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use foldhash::HashMap;
use http::HeaderValue;
use modelgate_control::identity::{AuditEvent, AuthState};
use subtle::ConstantTimeEq;
use tokio::sync::{mpsc, oneshot};

use crate::error::ApiError;
pub use roles::{Action, ProjectRole, SiteAction, SiteRole};

struct KeyEntry {
    digest: [u8; 32],
    user_id: i64,
    expires_at: i64,
}

struct UserEntry {
    username: Arc<str>,
    site: SiteRole,
    active: bool,
}

/// An immutable view of who holds which key and which role. The maps hash with foldhash, as
/// the routing snapshot's does: callers pick only what is looked up, never what is inserted.
#[derive(Default)]
pub struct AuthIndex {
    keys: HashMap<Box<str>, KeyEntry>,
    users: HashMap<i64, UserEntry>,
    roles: HashMap<(i64, i64), ProjectRole>,
}

/// The public id of a key, inline so a check allocates nothing for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyId([u8; key::ID_LEN]);

impl KeyId {
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or("")
    }
}

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Principal {
    pub user_id: i64,
    pub username: Arc<str>,
    pub site: SiteRole,
    pub key_id: KeyId,
}

/// Why a caller was not authenticated; all of these answer 401.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    Missing,
    Malformed,
    BadChecksum,
    Unknown,
    Expired,
    Deactivated,
}

impl Denied {
    pub fn reason(self) -> &'static str {
        match self {
            Denied::Missing => "no API key (send Authorization: Bearer <key>)",
            Denied::Malformed => "the API key is malformed",
            Denied::BadChecksum => "the API key's checksum does not match",
            Denied::Unknown => "the API key is unknown or was deleted",
            Denied::Expired => "the API key has expired",
            Denied::Deactivated => "the API key's user is deactivated",
        }
    }
}

impl AuthIndex {
    pub fn from_state(state: &AuthState) -> AuthIndex {
        let users = state
            .users
            .iter()
            .map(|u| {
                let entry = UserEntry {
                    username: u.username.as_str().into(),
                    // An unknown role in the store grants nothing beyond a user's.
                    site: SiteRole::parse(&u.role).unwrap_or(SiteRole::User),
                    active: u.active,
                };
                (u.id, entry)
            })
            .collect();
        let keys = state
            .keys
            .iter()
            .filter_map(|k| {
                let digest = key::parse_digest_hex(&k.digest)?;
                let entry = KeyEntry {
                    digest,
                    user_id: k.user_id,
                    expires_at: k.expires_at,
                };
                Some((k.key_id.as_str().into(), entry))
            })
            .collect();
        let roles = state
            .collaborators
            .iter()
            .filter_map(|c| Some(((c.project_id, c.user_id), ProjectRole::parse(&c.role)?)))
            .collect();
        AuthIndex { keys, users, roles }
    }

    /// Checks an `Authorization` header at `now` (unix seconds). On failure, also returns the
    /// key's public id when the key was well formed.
    pub fn authenticate(
        &self,
        authorization: Option<&HeaderValue>,
        now: i64,
    ) -> Result<Principal, (Denied, Option<KeyId>)> {
        let header = authorization.ok_or((Denied::Missing, None))?;
        let value = header.to_str().map_err(|_| (Denied::Malformed, None))?;
        let token = bearer(value).ok_or((Denied::Malformed, None))?;
        let parsed = key::parse(token).map_err(|e| match e {
            key::FormatError::Malformed => (Denied::Malformed, None),
            key::FormatError::BadChecksum => (Denied::BadChecksum, None),
        })?;
        let mut id = [0u8; key::ID_LEN];
        id.copy_from_slice(parsed.id.as_bytes());
        let id = KeyId(id);
        let entry = self
            .keys
            .get(parsed.id)
            .ok_or((Denied::Unknown, Some(id)))?;
        let presented = key::digest(parsed.full);
        if !bool::from(presented.ct_eq(&entry.digest)) {
            return Err((Denied::Unknown, Some(id)));
        }
        if now >= entry.expires_at {
            return Err((Denied::Expired, Some(id)));
        }
        let user = self
            .users
            .get(&entry.user_id)
            .ok_or((Denied::Unknown, Some(id)))?;
        if !user.active {
            return Err((Denied::Deactivated, Some(id)));
        }
        Ok(Principal {
            user_id: entry.user_id,
            username: user.username.clone(),
            site: user.site,
            key_id: id,
        })
    }

    /// The caller's role on a project (site admins count as project admins everywhere).
    pub fn project_role(&self, who: &Principal, project_id: i64) -> Option<ProjectRole> {
        if who.site == SiteRole::Admin {
            return Some(ProjectRole::Admin);
        }
        self.roles.get(&(project_id, who.user_id)).copied()
    }

    pub fn allowed(&self, who: &Principal, project_id: i64, action: Action) -> bool {
        action.allowed(who.site, self.project_role(who, project_id))
    }
}

/// The token of `Bearer <token>` (scheme case-insensitive, as RFC 9110 says).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim_matches(' '))
}

pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

enum AuditMsg {
    Event(AuditEvent),
    Flush(oneshot::Sender<()>),
}

/// The published index and the audit trail's writer queue.
pub struct Auth {
    index: ArcSwap<AuthIndex>,
    audit: mpsc::Sender<AuditMsg>,
}

/// Records waiting for the audit writer; past this, failures are counted and dropped rather
/// than letting a flood of bad requests grow memory.
const AUDIT_QUEUE: usize = 16 * 1024;

impl Auth {
    /// The index starts empty (nobody authenticates) until the first publish. Returns the
    /// receiving end for [`run_audit_writer`].
    pub fn new() -> (Arc<Auth>, AuditReceiver) {
        let (tx, rx) = mpsc::channel(AUDIT_QUEUE);
        let auth = Auth {
            index: ArcSwap::from_pointee(AuthIndex::default()),
            audit: tx,
        };
        (Arc::new(auth), AuditReceiver(rx))
    }

    pub fn load(&self) -> arc_swap::Guard<Arc<AuthIndex>> {
        self.index.load()
    }

    pub fn publish(&self, index: AuthIndex) {
        self.index.store(Arc::new(index));
    }

    /// Queues an audit record without waiting.
    pub fn record(&self, event: AuditEvent) {
        if self.audit.try_send(AuditMsg::Event(event)).is_err() {
            metrics::counter!(crate::metrics::AUDIT_DROPPED).increment(1);
        }
    }

    /// Waits until every record queued so far is in the store.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.audit.send(AuditMsg::Flush(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// Whether a request with this `Authorization` may do `action` on a project, recording
    /// nothing: for work done ahead of the checks that count ([`crate::early`]).
    pub fn permits(
        &self,
        authorization: Option<&HeaderValue>,
        project_id: i64,
        action: Action,
    ) -> bool {
        let index = self.load();
        index
            .authenticate(authorization, now_unix())
            .is_ok_and(|who| index.allowed(&who, project_id, action))
    }

    /// Authenticates a request, recording a failure in the audit trail.
    pub fn authenticate(
        &self,
        authorization: Option<&HeaderValue>,
        remote: Option<SocketAddr>,
        target: &dyn Fn() -> String,
    ) -> Result<Principal, ApiError> {
        self.load()
            .authenticate(authorization, now_unix())
            .map_err(|(denied, key_id)| {
                self.record(AuditEvent {
                    at: crate::now_rfc3339(),
                    actor: key_id
                        .map(|k| format!("key:{}", k.as_str()))
                        .unwrap_or_default(),
                    action: "auth.failed".into(),
                    target: target(),
                    outcome: "denied".into(),
                    remote: remote.map(|a| a.to_string()).unwrap_or_default(),
                    detail: denied.reason().into(),
                    ..Default::default()
                });
                ApiError::Unauthorized(denied.reason())
            })
    }

    /// Checks that `who` may do `action` on a project, recording a refusal.
    pub fn authorize(
        &self,
        who: &Principal,
        project_id: i64,
        action: Action,
        remote: Option<SocketAddr>,
        target: &dyn Fn() -> String,
    ) -> Result<(), ApiError> {
        if self.load().allowed(who, project_id, action) {
            return Ok(());
        }
        self.record(denial(who, &format!("{action:?}"), target(), remote));
        Err(ApiError::Forbidden(format!(
            "{action:?} on project {project_id} needs the {} role or higher",
            action.min_role()
        )))
    }

    /// Checks a site-wide action, recording a refusal.
    pub fn authorize_site(
        &self,
        who: &Principal,
        action: SiteAction,
        remote: Option<SocketAddr>,
    ) -> Result<(), ApiError> {
        if action.allowed(who.site) {
            return Ok(());
        }
        self.record(denial(who, &format!("{action:?}"), String::new(), remote));
        Err(ApiError::Forbidden(format!(
            "{action:?} needs the site admin role"
        )))
    }
}

pub fn denial(
    who: &Principal,
    action: &str,
    target: String,
    remote: Option<SocketAddr>,
) -> AuditEvent {
    AuditEvent {
        at: crate::now_rfc3339(),
        actor_id: Some(who.user_id),
        actor: who.username.to_string(),
        action: "authz.denied".into(),
        target,
        outcome: "denied".into(),
        remote: remote.map(|a| a.to_string()).unwrap_or_default(),
        detail: format!("{action} refused (key {})", who.key_id.as_str()),
        ..Default::default()
    }
}

pub struct AuditReceiver(mpsc::Receiver<AuditMsg>);

/// How many audit records to keep; older ones are pruned.
const AUDIT_KEEP: i64 = 1_000_000;

/// Writes queued audit records to the store in batches, until every sender is gone.
pub async fn run_audit_writer(
    store: Arc<dyn modelgate_control::store::Store>,
    mut rx: AuditReceiver,
) {
    let mut written: u64 = 0;
    while let Some(first) = rx.0.recv().await {
        let mut events = Vec::new();
        let mut flushes = Vec::new();
        let mut next = Some(first);
        while let Some(msg) = next {
            match msg {
                AuditMsg::Event(e) => events.push(e),
                AuditMsg::Flush(tx) => flushes.push(tx),
            }
            next = if events.len() < 512 {
                rx.0.try_recv().ok()
            } else {
                None
            };
        }
        if !events.is_empty() {
            let s = store.clone();
            let n = events.len() as u64;
            let prune = (written + n) / 10_000 > written / 10_000;
            written += n;
            let result = tokio::task::spawn_blocking(move || {
                s.append_audit(&events)?;
                if prune {
                    s.prune_audit(AUDIT_KEEP)?;
                }
                Ok::<_, modelgate_control::store::StoreError>(())
            })
            .await;
            if !matches!(result, Ok(Ok(()))) {
                tracing::error!("could not write {n} audit records");
            }
        }
        for tx in flushes {
            let _ = tx.send(());
        }
    }
}

/// Site settings for API key lifetimes, in days.
pub const DEFAULT_EXPIRY_SETTING: &str = "api_key_default_expiry_days";
pub const MAX_EXPIRY_SETTING: &str = "api_key_max_expiry_days";
pub const DEFAULT_EXPIRY_DAYS: i64 = 365;
pub const DEFAULT_MAX_EXPIRY_DAYS: i64 = 365;

/// Where the first admin's API key is handed over.
pub const ADMIN_KEY_FILE: &str = "admin-api-key";

/// Creates the first admin on a store without users. Its API key comes from `provided` (the
/// `MODELGATE_ADMIN_API_KEY` environment variable) when set, otherwise it is generated and
/// written to `data_dir/admin-api-key` (mode 0600), never to a log. Returns the id of the
/// oldest active admin, who owns the projects of configured models.
pub fn bootstrap_admin(
    store: &dyn modelgate_control::store::Store,
    data_dir: &std::path::Path,
    provided: Option<&str>,
) -> anyhow::Result<i64> {
    if store.user_count()? > 0 {
        if provided.is_some() {
            tracing::warn!(
                "MODELGATE_ADMIN_API_KEY is only read on the first start (the store has users); \
                 use `modelgate recover-admin` for a new admin key"
            );
        }
        return oldest_admin(store);
    }
    // Everything that can fail is checked before the user exists: a half-made first admin
    // would lock the site out (later starts see users and skip this).
    match provided {
        Some(k) => {
            let parsed = key::parse(k).map_err(|_| {
                anyhow::anyhow!(
                    "MODELGATE_ADMIN_API_KEY is not a well-formed modelgate API key \
                     (mgk_..., as `modelgate keys create` prints)"
                )
            })?;
            let user = store.create_user("admin", "admin")?;
            store_admin_key(store, user.id, k, parsed.id, "first admin")?;
            tracing::info!(
                "created the first admin user with the key from MODELGATE_ADMIN_API_KEY (id {})",
                parsed.id
            );
        }
        None => {
            let path = data_dir.join(ADMIN_KEY_FILE);
            if path.exists() {
                anyhow::bail!(
                    "{} exists but the store has no users; move it away and start again",
                    path.display()
                );
            }
            let user = store.create_user("admin", "admin")?;
            let path = issue_admin_key(store, user.id, data_dir, "first admin")?;
            tracing::warn!(
                "created the first admin user; its API key is in {} - keep it, then delete the file",
                path.display()
            );
            eprintln!(
                "modelgate: created user \"admin\"; its API key is in {} (readable by you only)",
                path.display()
            );
        }
    }
    oldest_admin(store)
}

fn oldest_admin(store: &dyn modelgate_control::store::Store) -> anyhow::Result<i64> {
    store
        .users()?
        .into_iter()
        .find(|u| u.role == "admin" && u.active)
        .map(|u| u.id)
        .ok_or_else(|| anyhow::anyhow!("the store has users but no active admin"))
}

fn store_admin_key(
    store: &dyn modelgate_control::store::Store,
    user_id: i64,
    full: &str,
    id: &str,
    why: &str,
) -> anyhow::Result<()> {
    store.create_api_key(modelgate_control::identity::NewApiKey {
        key_id: id,
        user_id,
        digest: &key::digest_hex(full),
        description: why,
        expires_at: now_unix() + DEFAULT_EXPIRY_DAYS * 86_400,
    })?;
    store.append_audit(&[AuditEvent {
        at: crate::now_rfc3339(),
        actor: "modelgate (local)".into(),
        action: "api_key.created".into(),
        target: format!("user:{user_id} key:{id}"),
        outcome: "ok".into(),
        detail: why.into(),
        ..Default::default()
    }])?;
    Ok(())
}

/// Generates a key for an admin and writes it to a new 0600 file `data_dir/admin-api-key`
/// (refusing to overwrite one); returns the file's path.
fn issue_admin_key(
    store: &dyn modelgate_control::store::Store,
    user_id: i64,
    data_dir: &std::path::Path,
    why: &str,
) -> anyhow::Result<std::path::PathBuf> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = data_dir.join(ADMIN_KEY_FILE);
    // The file first: a key nobody can read must not exist.
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", path.display()))?;
    let (full, id) = key::generate();
    let written = writeln!(file, "{full}").and_then(|_| file.sync_all());
    if let Err(e) = written
        .map_err(anyhow::Error::from)
        .and_then(|_| store_admin_key(store, user_id, &full, &id, why))
    {
        let _ = std::fs::remove_file(&path);
        return Err(e);
    }
    Ok(path)
}

/// For an operator locked out of the API (the admin key lost or expired): gives the oldest
/// active admin a new key in `data_dir/admin-api-key`. Needs only the data directory; a running
/// modelgate picks the key up within a few seconds.
pub fn recover_admin(
    store: &dyn modelgate_control::store::Store,
    data_dir: &std::path::Path,
) -> anyhow::Result<std::path::PathBuf> {
    let admin = oldest_admin(store)?;
    issue_admin_key(store, admin, data_dir, "recover-admin")
}

/// Once a second: records, once per key, that it expired; and rebuilds the auth index
/// (`refresh(true)`) when another process changed the store, and every 30 s regardless
/// (`refresh(false)`). Runs until the process ends.
pub async fn run_sweeper<F, Fut>(
    store: Arc<dyn modelgate_control::store::Store>,
    auth: Arc<Auth>,
    refresh: F,
) where
    F: Fn(bool) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    let mut seen = None;
    let mut ticks: u64 = 0;
    loop {
        tick.tick().await;
        ticks += 1;
        let s = store.clone();
        let Ok(Ok((expired, changes))) = tokio::task::spawn_blocking(move || {
            Ok::<_, modelgate_control::store::StoreError>((
                s.take_newly_expired(now_unix())?,
                s.external_changes()?,
            ))
        })
        .await
        else {
            continue;
        };
        // Also every 30 s, in case a publish after a change failed (the change is in the
        // store; the index must not stay behind it).
        let changed = seen.is_some_and(|v| v != changes);
        if changed || ticks.is_multiple_of(30) {
            refresh(changed).await;
        }
        seen = Some(changes);
        for k in expired {
            auth.record(AuditEvent {
                at: crate::now_rfc3339(),
                actor: "modelgate".into(),
                action: "api_key.expired".into(),
                target: format!("user:{} key:{}", k.user_id, k.key_id),
                outcome: "ok".into(),
                ..Default::default()
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use modelgate_control::identity::{ApiKey, Collaborator, User};

    fn state(key: &str, expires_at: i64, active: bool) -> AuthState {
        let user = |id, name: &str, role: &str, active| User {
            id,
            username: name.into(),
            role: role.into(),
            active,
            api_keys: 0,
            created_at: String::new(),
            updated_at: String::new(),
        };
        AuthState {
            users: vec![
                user(1, "root", "admin", true),
                user(2, "bob", "user", active),
            ],
            keys: vec![ApiKey {
                key_id: key::parse(key).unwrap().id.into(),
                user_id: 2,
                digest: key::digest_hex(key),
                description: String::new(),
                created_at: String::new(),
                expires_at,
            }],
            collaborators: vec![Collaborator {
                project_id: 7,
                user_id: 2,
                username: "bob".into(),
                role: "viewer".into(),
                owner: false,
            }],
        }
    }

    #[test]
    fn every_way_to_fail_is_told_apart() {
        let (k, _) = key::generate();
        let idx = AuthIndex::from_state(&state(&k, 100, true));
        let h = |s: &str| HeaderValue::from_str(s).unwrap();
        let who = idx
            .authenticate(Some(&h(&format!("Bearer {k}"))), 50)
            .unwrap();
        assert_eq!(&*who.username, "bob");
        assert!(idx.allowed(&who, 7, Action::Predict));
        assert!(!idx.allowed(&who, 7, Action::Deploy));
        assert!(!idx.allowed(&who, 8, Action::View));
        assert!(idx
            .authenticate(Some(&h(&format!("bearer  {k}"))), 50)
            .is_ok());
        let fail = |hv: Option<&HeaderValue>, now| idx.authenticate(hv, now).unwrap_err().0;
        assert_eq!(fail(None, 50), Denied::Missing);
        assert_eq!(fail(Some(&h(&k)), 50), Denied::Malformed);
        assert_eq!(fail(Some(&h("Bearer mgk_nope")), 50), Denied::Malformed);
        let mut bad = k.clone().into_bytes();
        bad[20] = if bad[20] == b'a' { b'b' } else { b'a' };
        let bad = String::from_utf8(bad).unwrap();
        assert_eq!(
            fail(Some(&h(&format!("Bearer {bad}"))), 50),
            Denied::BadChecksum
        );
        let (other, _) = key::generate();
        assert_eq!(
            fail(Some(&h(&format!("Bearer {other}"))), 50),
            Denied::Unknown
        );
        assert_eq!(fail(Some(&h(&format!("Bearer {k}"))), 100), Denied::Expired);
        let idx = AuthIndex::from_state(&state(&k, 100, false));
        assert_eq!(
            idx.authenticate(Some(&h(&format!("Bearer {k}"))), 50)
                .unwrap_err()
                .0,
            Denied::Deactivated
        );
    }
}
