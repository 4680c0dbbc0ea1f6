//! Identity in the store: users, API keys (digests only), project collaborators, the audit
//! trail and site settings.
//!
//! Like [`crate::store::Store`], callers see a synchronous trait ([`IdentityStore`], a supertrait
//! of `Store`) so another backend can implement it. The store never sees an API key's secret:
//! only its short public id and a SHA-256 digest of the whole key.

use rusqlite::{params, OptionalExtension};
use serde::Serialize;

use crate::store::{now, Result, SqliteStore, StoreError};

pub const SITE_ROLES: [&str; 2] = ["admin", "user"];
/// Project roles, weakest first.
pub const PROJECT_ROLES: [&str; 4] = ["viewer", "operator", "contributor", "admin"];

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct User {
    pub id: i64,
    pub username: String,
    /// `admin` or `user`.
    pub role: String,
    pub active: bool,
    /// How many API keys the user holds (expired ones included until deleted).
    pub api_keys: i64,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ApiKey {
    /// The short public part of the key, safe to list and log.
    pub key_id: String,
    pub user_id: i64,
    #[serde(skip_serializing)]
    pub digest: String,
    pub description: String,
    pub created_at: String,
    /// Unix seconds after which the key is refused.
    pub expires_at: i64,
}

pub struct NewApiKey<'a> {
    pub key_id: &'a str,
    pub user_id: i64,
    /// Hex SHA-256 of the whole key.
    pub digest: &'a str,
    pub description: &'a str,
    pub expires_at: i64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Collaborator {
    pub project_id: i64,
    pub user_id: i64,
    pub username: String,
    /// `viewer`, `operator`, `contributor` or `admin`.
    pub role: String,
    /// The project's owner: always an admin of it, and cannot be removed.
    pub owner: bool,
}

/// One audit record: who did what to what, when, from where, and how it ended.
#[derive(Debug, Clone, Serialize, PartialEq, Default)]
pub struct AuditEvent {
    /// Set by the store.
    pub id: i64,
    /// RFC 3339, UTC.
    pub at: String,
    pub actor_id: Option<i64>,
    /// The acting user's name, or a key id when the key did not authenticate.
    pub actor: String,
    /// e.g. `auth.failed`, `api_key.created`, `collaborator.set`.
    pub action: String,
    pub target: String,
    /// `ok` or `denied`.
    pub outcome: String,
    /// The client's address.
    pub remote: String,
    pub detail: String,
}

/// Everything the in-memory authentication index is built from.
#[derive(Debug, Clone, Default)]
pub struct AuthState {
    pub users: Vec<User>,
    pub keys: Vec<ApiKey>,
    pub collaborators: Vec<Collaborator>,
}

pub trait IdentityStore: Send + Sync {
    fn create_user(&self, username: &str, role: &str) -> Result<User>;
    fn user(&self, id: i64) -> Result<User>;
    fn user_by_name(&self, username: &str) -> Result<User>;
    fn users(&self) -> Result<Vec<User>>;
    fn user_count(&self) -> Result<i64>;
    /// Changes role and/or active flag; refuses to leave the site without an active admin.
    fn update_user(&self, id: i64, role: Option<&str>, active: Option<bool>) -> Result<User>;

    fn create_api_key(&self, new: NewApiKey<'_>) -> Result<ApiKey>;
    fn api_keys(&self, user_id: i64) -> Result<Vec<ApiKey>>;
    fn delete_api_key(&self, user_id: i64, key_id: &str) -> Result<()>;
    /// Deletes every key of a user; returns their ids.
    fn delete_api_keys(&self, user_id: i64) -> Result<Vec<String>>;
    /// Keys whose expiry passed at `now_unix` and was not yet reported; marks them reported.
    fn take_newly_expired(&self, now_unix: i64) -> Result<Vec<ApiKey>>;

    fn collaborators(&self, project_id: i64) -> Result<Vec<Collaborator>>;
    fn set_collaborator(&self, project_id: i64, user_id: i64, role: &str) -> Result<Collaborator>;
    fn remove_collaborator(&self, project_id: i64, user_id: i64) -> Result<()>;

    fn auth_state(&self) -> Result<AuthState>;

    fn append_audit(&self, events: &[AuditEvent]) -> Result<()>;
    /// Records with id greater than `after`, oldest first, at most `limit`.
    fn audit(&self, after: i64, limit: i64) -> Result<Vec<AuditEvent>>;
    /// Keeps only the newest `keep` records.
    fn prune_audit(&self, keep: i64) -> Result<()>;

    fn setting(&self, name: &str) -> Result<Option<String>>;
    fn set_setting(&self, name: &str, value: &str) -> Result<()>;
}

const USER_COLS: &str = "id, username, role, active, created_at, updated_at,
     (SELECT COUNT(*) FROM api_keys k WHERE k.user_id = users.id)";

fn user_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<User> {
    Ok(User {
        id: r.get(0)?,
        username: r.get(1)?,
        role: r.get(2)?,
        active: r.get(3)?,
        created_at: r.get(4)?,
        updated_at: r.get(5)?,
        api_keys: r.get(6)?,
    })
}

const KEY_COLS: &str = "key_id, user_id, digest, description, created_at, expires_at";

fn key_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ApiKey> {
    Ok(ApiKey {
        key_id: r.get(0)?,
        user_id: r.get(1)?,
        digest: r.get(2)?,
        description: r.get(3)?,
        created_at: r.get(4)?,
        expires_at: r.get(5)?,
    })
}

const COLLAB_SELECT: &str = "SELECT c.project_id, c.user_id, u.username, c.role,
            COALESCE(p.owner_id = c.user_id, 0)
     FROM collaborators c JOIN users u ON u.id = c.user_id JOIN projects p ON p.id = c.project_id";

fn collab_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Collaborator> {
    Ok(Collaborator {
        project_id: r.get(0)?,
        user_id: r.get(1)?,
        username: r.get(2)?,
        role: r.get(3)?,
        owner: r.get(4)?,
    })
}

const AUDIT_COLS: &str = "id, at, actor_id, actor, action, target, outcome, remote, detail";

fn audit_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<AuditEvent> {
    Ok(AuditEvent {
        id: r.get(0)?,
        at: r.get(1)?,
        actor_id: r.get(2)?,
        actor: r.get(3)?,
        action: r.get(4)?,
        target: r.get(5)?,
        outcome: r.get(6)?,
        remote: r.get(7)?,
        detail: r.get(8)?,
    })
}

fn check_role(role: &str, allowed: &[&str]) -> Result<()> {
    if allowed.contains(&role) {
        Ok(())
    } else {
        Err(StoreError::Conflict(format!(
            "role must be one of {allowed:?}, not {role:?}"
        )))
    }
}

impl IdentityStore for SqliteStore {
    fn create_user(&self, username: &str, role: &str) -> Result<User> {
        check_role(role, &SITE_ROLES)?;
        let id: i64 = self
            .conn()
            .query_row(
                "INSERT INTO users (username, role, active, created_at, updated_at)
                 VALUES (?1, ?2, 1, ?3, ?3) RETURNING id",
                params![username, role, now()],
                |r| r.get(0),
            )
            .map_err(|e| match StoreError::from(e) {
                StoreError::Conflict(_) => {
                    StoreError::Conflict(format!("a user named {username:?} exists"))
                }
                other => other,
            })?;
        self.user(id)
    }

    fn user(&self, id: i64) -> Result<User> {
        self.conn()
            .query_row(
                &format!("SELECT {USER_COLS} FROM users WHERE id = ?1"),
                [id],
                user_row,
            )
            .optional()?
            .ok_or(StoreError::NotFound("user"))
    }

    fn user_by_name(&self, username: &str) -> Result<User> {
        self.conn()
            .query_row(
                &format!("SELECT {USER_COLS} FROM users WHERE username = ?1"),
                [username],
                user_row,
            )
            .optional()?
            .ok_or(StoreError::NotFound("user"))
    }

    fn users(&self) -> Result<Vec<User>> {
        self.all(
            &format!("SELECT {USER_COLS} FROM users ORDER BY id"),
            [],
            user_row,
        )
    }

    fn user_count(&self) -> Result<i64> {
        Ok(self
            .conn()
            .query_row("SELECT COUNT(*) FROM users", [], |r| r.get(0))?)
    }

    fn update_user(&self, id: i64, role: Option<&str>, active: Option<bool>) -> Result<User> {
        if let Some(role) = role {
            check_role(role, &SITE_ROLES)?;
        }
        {
            let mut conn = self.conn();
            let tx = conn.transaction()?;
            let n = tx.execute(
                "UPDATE users SET role = COALESCE(?2, role), active = COALESCE(?3, active),
                        updated_at = ?4 WHERE id = ?1",
                params![id, role, active, now()],
            )?;
            if n == 0 {
                return Err(StoreError::NotFound("user"));
            }
            let admins: i64 = tx.query_row(
                "SELECT COUNT(*) FROM users WHERE role = 'admin' AND active = 1",
                [],
                |r| r.get(0),
            )?;
            if admins == 0 {
                // Dropping the transaction rolls the change back.
                return Err(StoreError::Conflict(
                    "this would leave no active site admin".into(),
                ));
            }
            tx.commit()?;
        }
        self.user(id)
    }

    fn create_api_key(&self, new: NewApiKey<'_>) -> Result<ApiKey> {
        self.user(new.user_id)?;
        self.conn().execute(
            "INSERT INTO api_keys (key_id, user_id, digest, description, created_at, expires_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                new.key_id,
                new.user_id,
                new.digest,
                new.description,
                now(),
                new.expires_at
            ],
        )?;
        self.conn()
            .query_row(
                &format!("SELECT {KEY_COLS} FROM api_keys WHERE key_id = ?1"),
                [new.key_id],
                key_row,
            )
            .map_err(StoreError::from)
    }

    fn api_keys(&self, user_id: i64) -> Result<Vec<ApiKey>> {
        self.user(user_id)?;
        self.all(
            &format!("SELECT {KEY_COLS} FROM api_keys WHERE user_id = ?1 ORDER BY id"),
            [user_id],
            key_row,
        )
    }

    fn delete_api_key(&self, user_id: i64, key_id: &str) -> Result<()> {
        let n = self.conn().execute(
            "DELETE FROM api_keys WHERE user_id = ?1 AND key_id = ?2",
            params![user_id, key_id],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound("api key"));
        }
        Ok(())
    }

    fn delete_api_keys(&self, user_id: i64) -> Result<Vec<String>> {
        self.user(user_id)?;
        self.all(
            "DELETE FROM api_keys WHERE user_id = ?1 RETURNING key_id",
            [user_id],
            |r| r.get(0),
        )
    }

    fn take_newly_expired(&self, now_unix: i64) -> Result<Vec<ApiKey>> {
        self.all(
            &format!(
                "UPDATE api_keys SET expiry_recorded = 1
             WHERE expires_at <= ?1 AND expiry_recorded = 0 RETURNING {KEY_COLS}"
            ),
            [now_unix],
            key_row,
        )
    }

    fn collaborators(&self, project_id: i64) -> Result<Vec<Collaborator>> {
        self.project_exists(project_id)?;
        self.all(
            &format!("{COLLAB_SELECT} WHERE c.project_id = ?1 ORDER BY c.user_id"),
            [project_id],
            collab_row,
        )
    }

    fn set_collaborator(&self, project_id: i64, user_id: i64, role: &str) -> Result<Collaborator> {
        check_role(role, &PROJECT_ROLES)?;
        self.project_exists(project_id)?;
        self.user(user_id)?;
        {
            let conn = self.conn();
            let owner: Option<i64> = conn.query_row(
                "SELECT owner_id FROM projects WHERE id = ?1",
                [project_id],
                |r| r.get(0),
            )?;
            if owner == Some(user_id) && role != "admin" {
                return Err(StoreError::Conflict(
                    "the project's owner is always one of its admins".into(),
                ));
            }
            conn.execute(
                "INSERT INTO collaborators (project_id, user_id, role, created_at)
                 VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (project_id, user_id) DO UPDATE SET role = excluded.role",
                params![project_id, user_id, role, now()],
            )?;
        }
        self.conn()
            .query_row(
                &format!("{COLLAB_SELECT} WHERE c.project_id = ?1 AND c.user_id = ?2"),
                [project_id, user_id],
                collab_row,
            )
            .map_err(StoreError::from)
    }

    fn remove_collaborator(&self, project_id: i64, user_id: i64) -> Result<()> {
        self.project_exists(project_id)?;
        let conn = self.conn();
        let owner: Option<i64> = conn.query_row(
            "SELECT owner_id FROM projects WHERE id = ?1",
            [project_id],
            |r| r.get(0),
        )?;
        if owner == Some(user_id) {
            return Err(StoreError::Conflict(
                "the project's owner cannot be removed from it".into(),
            ));
        }
        let n = conn.execute(
            "DELETE FROM collaborators WHERE project_id = ?1 AND user_id = ?2",
            [project_id, user_id],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound("collaborator"));
        }
        Ok(())
    }

    fn auth_state(&self) -> Result<AuthState> {
        let mut conn = self.conn();
        // One read transaction: the index never mixes two versions of the tables.
        let tx = conn.transaction()?;
        let users = {
            let mut stmt = tx.prepare(&format!("SELECT {USER_COLS} FROM users"))?;
            let rows = stmt.query_map([], user_row)?;
            rows.collect::<rusqlite::Result<Vec<_>>>()?
        };
        let keys = {
            let mut stmt = tx.prepare(&format!("SELECT {KEY_COLS} FROM api_keys"))?;
            let rows = stmt.query_map([], key_row)?;
            rows.collect::<rusqlite::Result<Vec<_>>>()?
        };
        let collaborators = {
            let mut stmt = tx.prepare(COLLAB_SELECT)?;
            let rows = stmt.query_map([], collab_row)?;
            rows.collect::<rusqlite::Result<Vec<_>>>()?
        };
        tx.commit()?;
        Ok(AuthState {
            users,
            keys,
            collaborators,
        })
    }

    fn append_audit(&self, events: &[AuditEvent]) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        {
            let mut stmt = tx.prepare(
                "INSERT INTO audit (at, actor_id, actor, action, target, outcome, remote, detail)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?;
            for e in events {
                stmt.execute(params![
                    e.at, e.actor_id, e.actor, e.action, e.target, e.outcome, e.remote, e.detail
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn audit(&self, after: i64, limit: i64) -> Result<Vec<AuditEvent>> {
        self.all(
            &format!("SELECT {AUDIT_COLS} FROM audit WHERE id > ?1 ORDER BY id LIMIT ?2"),
            [after, limit],
            audit_row,
        )
    }

    fn prune_audit(&self, keep: i64) -> Result<()> {
        self.conn().execute(
            "DELETE FROM audit WHERE id <= (SELECT MAX(id) FROM audit) - ?1",
            [keep],
        )?;
        Ok(())
    }

    fn setting(&self, name: &str) -> Result<Option<String>> {
        Ok(self
            .conn()
            .query_row("SELECT value FROM settings WHERE name = ?1", [name], |r| {
                r.get(0)
            })
            .optional()?)
    }

    fn set_setting(&self, name: &str, value: &str) -> Result<()> {
        self.conn().execute(
            "INSERT INTO settings (name, value) VALUES (?1, ?2)
             ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            [name, value],
        )?;
        Ok(())
    }
}

impl SqliteStore {
    fn project_exists(&self, id: i64) -> Result<()> {
        self.conn()
            .query_row("SELECT 1 FROM projects WHERE id = ?1", [id], |_| Ok(()))
            .optional()?
            .ok_or(StoreError::NotFound("project"))
    }
}

/// The identity tables (migration 4).
pub(crate) const MIGRATION: &str = "
    CREATE TABLE users (
        id INTEGER PRIMARY KEY,
        username TEXT NOT NULL UNIQUE,
        role TEXT NOT NULL CHECK (role IN ('admin', 'user')),
        active INTEGER NOT NULL DEFAULT 1,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE TABLE api_keys (
        id INTEGER PRIMARY KEY,
        key_id TEXT NOT NULL UNIQUE,
        user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        digest TEXT NOT NULL,
        description TEXT NOT NULL DEFAULT '',
        created_at TEXT NOT NULL,
        expires_at INTEGER NOT NULL,
        expiry_recorded INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX api_keys_by_user ON api_keys (user_id);
    CREATE TABLE collaborators (
        project_id INTEGER NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
        user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        role TEXT NOT NULL CHECK (role IN ('viewer', 'operator', 'contributor', 'admin')),
        created_at TEXT NOT NULL,
        PRIMARY KEY (project_id, user_id)
    );
    ALTER TABLE projects ADD COLUMN owner_id INTEGER REFERENCES users(id);
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY,
        at TEXT NOT NULL,
        actor_id INTEGER,
        actor TEXT NOT NULL DEFAULT '',
        action TEXT NOT NULL,
        target TEXT NOT NULL DEFAULT '',
        outcome TEXT NOT NULL,
        remote TEXT NOT NULL DEFAULT '',
        detail TEXT NOT NULL DEFAULT ''
    );
    CREATE TABLE settings (
        name TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{NewProject, Store};

    #[test]
    fn users_keys_collaborators_and_the_last_admin_guard() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&dir.path().join("m.db")).unwrap();
        let admin = s.create_user("root", "admin").unwrap();
        let bob = s.create_user("bob", "user").unwrap();
        assert!(matches!(
            s.create_user("bob", "user"),
            Err(StoreError::Conflict(_))
        ));
        assert!(s.create_user("eve", "superuser").is_err());
        // The only admin cannot be demoted or deactivated.
        assert!(matches!(
            s.update_user(admin.id, Some("user"), None),
            Err(StoreError::Conflict(_))
        ));
        assert!(s.user(admin.id).unwrap().role == "admin");
        assert!(!s.update_user(bob.id, None, Some(false)).unwrap().active);

        let key = |id: &'static str, exp| NewApiKey {
            key_id: id,
            user_id: bob.id,
            digest: "d",
            description: "",
            expires_at: exp,
        };
        s.create_api_key(key("k1", 100)).unwrap();
        s.create_api_key(key("k2", 200)).unwrap();
        assert_eq!(s.user(bob.id).unwrap().api_keys, 2);
        let expired = s.take_newly_expired(150).unwrap();
        assert_eq!(expired.len(), 1);
        assert!(s.take_newly_expired(150).unwrap().is_empty());
        s.delete_api_key(bob.id, "k1").unwrap();
        assert!(s.delete_api_key(bob.id, "k1").is_err());
        assert_eq!(s.delete_api_keys(bob.id).unwrap(), vec!["k2".to_string()]);

        let p = s
            .create_project(NewProject {
                name: "p",
                description: "",
                source_path: "/x",
                owner_id: Some(admin.id),
            })
            .unwrap();
        let c = s.collaborators(p.id).unwrap();
        assert_eq!(c.len(), 1);
        assert!(c[0].owner && c[0].role == "admin");
        assert!(s.set_collaborator(p.id, admin.id, "viewer").is_err());
        assert!(s.remove_collaborator(p.id, admin.id).is_err());
        assert_eq!(
            s.set_collaborator(p.id, bob.id, "viewer").unwrap().role,
            "viewer"
        );
        assert_eq!(
            s.set_collaborator(p.id, bob.id, "operator").unwrap().role,
            "operator"
        );
        assert!(s.set_collaborator(p.id, bob.id, "owner").is_err());
        s.remove_collaborator(p.id, bob.id).unwrap();
        assert_eq!(s.auth_state().unwrap().collaborators.len(), 1);

        s.append_audit(&[AuditEvent {
            at: now(),
            action: "x".into(),
            outcome: "ok".into(),
            ..Default::default()
        }])
        .unwrap();
        assert_eq!(s.audit(0, 10).unwrap().len(), 1);
        s.set_setting("a", "1").unwrap();
        s.set_setting("a", "2").unwrap();
        assert_eq!(s.setting("a").unwrap().as_deref(), Some("2"));
    }
}
