//! The store: projects → models → builds → deployments, in SQLite by default.
//!
//! Callers see only [`Store`], a synchronous trait (call it from `spawn_blocking`), so a Postgres
//! implementation can replace [`SqliteStore`] without touching them. Every write is one
//! transaction committed before it returns, in WAL mode with `synchronous = FULL`, so an
//! acknowledged write survives `kill -9` and power loss alike.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};
use rusqlite_migration::{Migrations, M};
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("{0}")]
    Conflict(String),
    #[error("store: {0}")]
    Backend(String),
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        if let rusqlite::Error::SqliteFailure(f, msg) = &e {
            if f.code == rusqlite::ErrorCode::ConstraintViolation {
                return StoreError::Conflict(
                    msg.clone().unwrap_or_else(|| "constraint violated".into()),
                );
            }
        }
        StoreError::Backend(e.to_string())
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Project {
    pub id: i64,
    pub name: String,
    pub description: String,
    /// Directory holding the project's files.
    pub source_path: String,
    /// Environment of the project's replicas; a deployment's own variables take precedence.
    pub environment: std::collections::BTreeMap<String, String>,
    /// The user who created the project (always one of its admins); none for older projects.
    pub owner_id: Option<i64>,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Model {
    pub id: i64,
    pub project_id: i64,
    pub name: String,
    pub description: String,
    pub owner: String,
    #[serde(skip_serializing)]
    pub access_key: String,
    pub enable_authentication: bool,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub enum BuildStatus {
    #[serde(rename = "pending")]
    Pending,
    #[serde(rename = "building")]
    Building,
    #[serde(rename = "built")]
    Built,
    #[serde(rename = "build failed")]
    Failed,
}

impl BuildStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            BuildStatus::Pending => "pending",
            BuildStatus::Building => "building",
            BuildStatus::Built => "built",
            BuildStatus::Failed => "build failed",
        }
    }
    fn parse(s: &str) -> BuildStatus {
        match s {
            "pending" => BuildStatus::Pending,
            "building" => BuildStatus::Building,
            "built" => BuildStatus::Built,
            _ => BuildStatus::Failed,
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Build {
    pub id: i64,
    pub model_id: i64,
    pub build_number: i64,
    pub status: BuildStatus,
    pub file_path: String,
    pub function_name: String,
    /// sha256 of the artifact's manifest, set once built.
    pub sha256: Option<String>,
    /// Fingerprint of the inputs the build started from (`builds::fingerprint`), when known.
    pub source_sha256: Option<String>,
    pub created_at: String,
    pub finished_at: Option<String>,
}

/// Deployment states: `pending` → `deploying` → `deployed`; `stopping` → `stopped`; `failed`.
pub mod deployment_status {
    pub const PENDING: &str = "pending";
    pub const DEPLOYING: &str = "deploying";
    pub const DEPLOYED: &str = "deployed";
    pub const STOPPING: &str = "stopping";
    pub const STOPPED: &str = "stopped";
    pub const FAILED: &str = "failed";
    /// States in which a deployment should be running (and is restored at start-up).
    pub const ACTIVE: [&str; 3] = [PENDING, DEPLOYING, DEPLOYED];
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Deployment {
    pub id: i64,
    pub model_id: i64,
    pub build_id: i64,
    pub status: String,
    pub replicas: i64,
    pub cpu: f64,
    pub memory_mb: i64,
    pub environment: std::collections::BTreeMap<String, String>,
    pub created_at: String,
    pub updated_at: String,
}

pub struct NewDeployment<'a> {
    pub model_id: i64,
    pub build_id: i64,
    pub replicas: i64,
    pub cpu: f64,
    pub memory_mb: i64,
    pub environment: &'a std::collections::BTreeMap<String, String>,
}

pub struct NewProject<'a> {
    pub name: &'a str,
    pub description: &'a str,
    pub source_path: &'a str,
    /// Becomes the project's owner and first admin collaborator.
    pub owner_id: Option<i64>,
}

pub struct NewModel<'a> {
    pub project_id: i64,
    pub name: &'a str,
    pub description: &'a str,
    pub owner: &'a str,
    pub access_key: &'a str,
    pub enable_authentication: bool,
}

/// The operations the rest of modelgate needs from a store.
pub trait Store: crate::identity::IdentityStore + Send + Sync {
    fn create_project(&self, new: NewProject<'_>) -> Result<Project>;
    fn project(&self, id: i64) -> Result<Project>;
    fn projects(&self) -> Result<Vec<Project>>;
    fn set_project_source(&self, id: i64, source_path: &str) -> Result<Project>;
    fn set_project_environment(
        &self,
        id: i64,
        environment: &std::collections::BTreeMap<String, String>,
    ) -> Result<Project>;

    fn create_model(&self, new: NewModel<'_>) -> Result<Model>;
    fn model(&self, id: i64) -> Result<Model>;
    fn models(&self, project_id: i64) -> Result<Vec<Model>>;
    fn delete_model(&self, id: i64) -> Result<()>;
    fn set_access_key(&self, id: i64, access_key: &str) -> Result<Model>;
    /// Changes what is given; leaves the rest.
    fn update_model(
        &self,
        id: i64,
        description: Option<&str>,
        enable_authentication: Option<bool>,
    ) -> Result<Model>;

    /// Creates a build with the next build number of its model, status `pending`.
    fn create_build(&self, model_id: i64, file_path: &str, function_name: &str) -> Result<Build>;
    fn build(&self, id: i64) -> Result<Build>;
    fn builds(&self, model_id: i64) -> Result<Vec<Build>>;
    fn set_build_status(&self, id: i64, status: BuildStatus, sha256: Option<&str>)
        -> Result<Build>;
    fn set_build_source(&self, id: i64, source_sha256: &str) -> Result<()>;

    fn create_deployment(&self, new: NewDeployment<'_>) -> Result<Deployment>;
    fn deployment(&self, id: i64) -> Result<Deployment>;
    fn deployments(&self, model_id: i64) -> Result<Vec<Deployment>>;
    fn set_deployment_status(&self, id: i64, status: &str) -> Result<Deployment>;
    /// Deployments that should be running, oldest first.
    fn active_deployments(&self) -> Result<Vec<Deployment>>;
    /// Every model, across projects (for building routing snapshots).
    fn all_models(&self) -> Result<Vec<Model>>;
    /// A number that changes when another process (or connection) commits to the store, so a
    /// server can notice changes it did not make (e.g. `modelgate recover-admin`).
    fn external_changes(&self) -> Result<i64>;
}

fn migrations() -> Migrations<'static> {
    Migrations::new(vec![
        M::up(
            "CREATE TABLE projects (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            description TEXT NOT NULL DEFAULT '',
            source_path TEXT NOT NULL,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL
        );
        CREATE TABLE models (
            id INTEGER PRIMARY KEY,
            project_id INTEGER NOT NULL REFERENCES projects(id) ON DELETE RESTRICT,
            name TEXT NOT NULL,
            description TEXT NOT NULL DEFAULT '',
            owner TEXT NOT NULL DEFAULT '',
            access_key TEXT NOT NULL UNIQUE,
            enable_authentication INTEGER NOT NULL DEFAULT 1,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            UNIQUE (project_id, name)
        );
        CREATE TABLE builds (
            id INTEGER PRIMARY KEY,
            model_id INTEGER NOT NULL REFERENCES models(id) ON DELETE CASCADE,
            build_number INTEGER NOT NULL,
            status TEXT NOT NULL,
            file_path TEXT NOT NULL,
            function_name TEXT NOT NULL,
            sha256 TEXT,
            created_at TEXT NOT NULL,
            finished_at TEXT,
            UNIQUE (model_id, build_number)
        );",
        ),
        M::up(
            "CREATE TABLE deployments (
            id INTEGER PRIMARY KEY,
            model_id INTEGER NOT NULL REFERENCES models(id) ON DELETE CASCADE,
            build_id INTEGER NOT NULL REFERENCES builds(id) ON DELETE CASCADE,
            status TEXT NOT NULL,
            replicas INTEGER NOT NULL,
            cpu REAL NOT NULL,
            memory_mb INTEGER NOT NULL,
            environment TEXT NOT NULL DEFAULT '{}',
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL
        );
        CREATE INDEX deployments_by_model ON deployments (model_id, id);",
        ),
        M::up("ALTER TABLE projects ADD COLUMN environment TEXT NOT NULL DEFAULT '{}';"),
        M::up(crate::identity::MIGRATION),
        M::up("ALTER TABLE builds ADD COLUMN source_sha256 TEXT;"),
    ])
}

pub fn now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// The embedded SQLite store: one connection behind a mutex (SQLite serialises writers anyway).
pub struct SqliteStore {
    conn: Mutex<Connection>,
}

impl SqliteStore {
    /// Opens (creating and migrating as needed) the database file at `path`.
    pub fn open(path: &Path) -> Result<SqliteStore> {
        let mut conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        migrations()
            .to_latest(&mut conn)
            .map_err(|e| StoreError::Backend(format!("migration failed: {e}")))?;
        Ok(SqliteStore {
            conn: Mutex::new(conn),
        })
    }

    pub(crate) fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs a query and maps every row it returns.
    pub(crate) fn all<T, P: rusqlite::Params>(
        &self,
        sql: &str,
        params: P,
        row: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    ) -> Result<Vec<T>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(sql)?;
        let rows = stmt.query_map(params, row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// `PRAGMA integrity_check`, for tests and operators.
    pub fn integrity_check(&self) -> Result<String> {
        Ok(self
            .conn()
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))?)
    }
}

const DEPLOYMENT_COLS: &str =
    "id, model_id, build_id, status, replicas, cpu, memory_mb, environment, created_at, updated_at";

fn deployment_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Deployment> {
    let env: String = r.get(7)?;
    Ok(Deployment {
        id: r.get(0)?,
        model_id: r.get(1)?,
        build_id: r.get(2)?,
        status: r.get(3)?,
        replicas: r.get(4)?,
        cpu: r.get(5)?,
        memory_mb: r.get(6)?,
        environment: serde_json::from_str(&env).unwrap_or_default(),
        created_at: r.get(8)?,
        updated_at: r.get(9)?,
    })
}

const PROJECT_COLS: &str =
    "id, name, description, source_path, created_at, updated_at, environment, owner_id";
const MODEL_COLS: &str =
    "id, project_id, name, description, owner, access_key, enable_authentication, created_at, updated_at";
const BUILD_COLS: &str =
    "id, model_id, build_number, status, file_path, function_name, sha256, created_at, finished_at, source_sha256";

fn project_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Project> {
    Ok(Project {
        id: r.get(0)?,
        name: r.get(1)?,
        description: r.get(2)?,
        source_path: r.get(3)?,
        created_at: r.get(4)?,
        updated_at: r.get(5)?,
        environment: serde_json::from_str(&r.get::<_, String>(6)?).unwrap_or_default(),
        owner_id: r.get(7)?,
    })
}

fn model_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Model> {
    Ok(Model {
        id: r.get(0)?,
        project_id: r.get(1)?,
        name: r.get(2)?,
        description: r.get(3)?,
        owner: r.get(4)?,
        access_key: r.get(5)?,
        enable_authentication: r.get(6)?,
        created_at: r.get(7)?,
        updated_at: r.get(8)?,
    })
}

fn build_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Build> {
    Ok(Build {
        id: r.get(0)?,
        model_id: r.get(1)?,
        build_number: r.get(2)?,
        status: BuildStatus::parse(&r.get::<_, String>(3)?),
        file_path: r.get(4)?,
        function_name: r.get(5)?,
        sha256: r.get(6)?,
        created_at: r.get(7)?,
        finished_at: r.get(8)?,
        source_sha256: r.get(9)?,
    })
}

impl Store for SqliteStore {
    fn create_project(&self, new: NewProject<'_>) -> Result<Project> {
        let mut conn = self.conn();
        let ts = now();
        let tx = conn.transaction()?;
        let id: i64 = tx
            .query_row(
                "INSERT INTO projects (name, description, source_path, created_at, updated_at, owner_id)
                 VALUES (?1, ?2, ?3, ?4, ?4, ?5) RETURNING id",
                params![new.name, new.description, new.source_path, ts, new.owner_id],
                |r| r.get(0),
            )
            .map_err(|e| match StoreError::from(e) {
                StoreError::Conflict(_) => {
                    StoreError::Conflict(format!("a project named {:?} exists", new.name))
                }
                other => other,
            })?;
        if let Some(owner) = new.owner_id {
            tx.execute(
                "INSERT INTO collaborators (project_id, user_id, role, created_at)
                 VALUES (?1, ?2, 'admin', ?3)",
                params![id, owner, ts],
            )?;
        }
        tx.commit()?;
        drop(conn);
        self.project(id)
    }

    fn project(&self, id: i64) -> Result<Project> {
        self.conn()
            .query_row(
                &format!("SELECT {PROJECT_COLS} FROM projects WHERE id = ?1"),
                [id],
                project_row,
            )
            .optional()?
            .ok_or(StoreError::NotFound("project"))
    }

    fn projects(&self) -> Result<Vec<Project>> {
        self.all(
            &format!("SELECT {PROJECT_COLS} FROM projects ORDER BY id"),
            [],
            project_row,
        )
    }

    fn set_project_source(&self, id: i64, source_path: &str) -> Result<Project> {
        let n = self.conn().execute(
            "UPDATE projects SET source_path = ?2, updated_at = ?3 WHERE id = ?1",
            params![id, source_path, now()],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound("project"));
        }
        self.project(id)
    }

    fn set_project_environment(
        &self,
        id: i64,
        environment: &std::collections::BTreeMap<String, String>,
    ) -> Result<Project> {
        let env = serde_json::to_string(environment).unwrap_or_else(|_| "{}".into());
        let n = self.conn().execute(
            "UPDATE projects SET environment = ?2, updated_at = ?3 WHERE id = ?1",
            params![id, env, now()],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound("project"));
        }
        self.project(id)
    }

    fn create_model(&self, new: NewModel<'_>) -> Result<Model> {
        self.project(new.project_id)?;
        let ts = now();
        let id = self
            .conn()
            .query_row(
                "INSERT INTO models (project_id, name, description, owner, access_key,
                                     enable_authentication, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7) RETURNING id",
                params![
                    new.project_id,
                    new.name,
                    new.description,
                    new.owner,
                    new.access_key,
                    new.enable_authentication,
                    ts
                ],
                |r| r.get(0),
            )
            .map_err(|e| match StoreError::from(e) {
                StoreError::Conflict(_) => StoreError::Conflict(format!(
                    "a model named {:?} exists in this project",
                    new.name
                )),
                other => other,
            })?;
        self.model(id)
    }

    fn model(&self, id: i64) -> Result<Model> {
        self.conn()
            .query_row(
                &format!("SELECT {MODEL_COLS} FROM models WHERE id = ?1"),
                [id],
                model_row,
            )
            .optional()?
            .ok_or(StoreError::NotFound("model"))
    }

    fn models(&self, project_id: i64) -> Result<Vec<Model>> {
        self.all(
            &format!("SELECT {MODEL_COLS} FROM models WHERE project_id = ?1 ORDER BY id"),
            [project_id],
            model_row,
        )
    }

    fn delete_model(&self, id: i64) -> Result<()> {
        let n = self
            .conn()
            .execute("DELETE FROM models WHERE id = ?1", [id])?;
        if n == 0 {
            return Err(StoreError::NotFound("model"));
        }
        Ok(())
    }

    fn set_access_key(&self, id: i64, access_key: &str) -> Result<Model> {
        let n = self.conn().execute(
            "UPDATE models SET access_key = ?2, updated_at = ?3 WHERE id = ?1",
            params![id, access_key, now()],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound("model"));
        }
        self.model(id)
    }

    fn update_model(
        &self,
        id: i64,
        description: Option<&str>,
        enable_authentication: Option<bool>,
    ) -> Result<Model> {
        let n = self.conn().execute(
            "UPDATE models SET description = COALESCE(?2, description),
                    enable_authentication = COALESCE(?3, enable_authentication),
                    updated_at = ?4 WHERE id = ?1",
            params![id, description, enable_authentication, now()],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound("model"));
        }
        self.model(id)
    }

    fn create_build(&self, model_id: i64, file_path: &str, function_name: &str) -> Result<Build> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let exists: Option<i64> = tx
            .query_row("SELECT id FROM models WHERE id = ?1", [model_id], |r| {
                r.get(0)
            })
            .optional()?;
        if exists.is_none() {
            return Err(StoreError::NotFound("model"));
        }
        let id: i64 = tx.query_row(
            "INSERT INTO builds (model_id, build_number, status, file_path, function_name, created_at)
             VALUES (?1, (SELECT COALESCE(MAX(build_number), 0) + 1 FROM builds WHERE model_id = ?1),
                     'pending', ?2, ?3, ?4) RETURNING id",
            params![model_id, file_path, function_name, now()],
            |r| r.get(0),
        )?;
        tx.commit()?;
        drop(conn);
        self.build(id)
    }

    fn build(&self, id: i64) -> Result<Build> {
        self.conn()
            .query_row(
                &format!("SELECT {BUILD_COLS} FROM builds WHERE id = ?1"),
                [id],
                build_row,
            )
            .optional()?
            .ok_or(StoreError::NotFound("build"))
    }

    fn builds(&self, model_id: i64) -> Result<Vec<Build>> {
        self.all(
            &format!("SELECT {BUILD_COLS} FROM builds WHERE model_id = ?1 ORDER BY build_number"),
            [model_id],
            build_row,
        )
    }

    fn set_build_status(
        &self,
        id: i64,
        status: BuildStatus,
        sha256: Option<&str>,
    ) -> Result<Build> {
        let finished = matches!(status, BuildStatus::Built | BuildStatus::Failed).then(now);
        let n = self.conn().execute(
            "UPDATE builds SET status = ?2, sha256 = COALESCE(?3, sha256),
                    finished_at = COALESCE(?4, finished_at) WHERE id = ?1",
            params![id, status.as_str(), sha256, finished],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound("build"));
        }
        self.build(id)
    }

    fn set_build_source(&self, id: i64, source_sha256: &str) -> Result<()> {
        let n = self.conn().execute(
            "UPDATE builds SET source_sha256 = ?2 WHERE id = ?1",
            params![id, source_sha256],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound("build"));
        }
        Ok(())
    }

    fn create_deployment(&self, new: NewDeployment<'_>) -> Result<Deployment> {
        let env = serde_json::to_string(new.environment).unwrap_or_else(|_| "{}".into());
        let id: i64 = self.conn().query_row(
            "INSERT INTO deployments (model_id, build_id, status, replicas, cpu, memory_mb,
                                      environment, created_at, updated_at)
             VALUES (?1, ?2, 'pending', ?3, ?4, ?5, ?6, ?7, ?7) RETURNING id",
            params![
                new.model_id,
                new.build_id,
                new.replicas,
                new.cpu,
                new.memory_mb,
                env,
                now()
            ],
            |r| r.get(0),
        )?;
        self.deployment(id)
    }

    fn deployment(&self, id: i64) -> Result<Deployment> {
        self.deployments_where("id = ?1", &[&id])?
            .pop()
            .ok_or(StoreError::NotFound("deployment"))
    }

    fn deployments(&self, model_id: i64) -> Result<Vec<Deployment>> {
        self.deployments_where("model_id = ?1", &[&model_id])
    }

    fn set_deployment_status(&self, id: i64, status: &str) -> Result<Deployment> {
        let n = self.conn().execute(
            "UPDATE deployments SET status = ?2, updated_at = ?3 WHERE id = ?1",
            params![id, status, now()],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound("deployment"));
        }
        self.deployment(id)
    }

    fn active_deployments(&self) -> Result<Vec<Deployment>> {
        self.deployments_where("status IN ('pending', 'deploying', 'deployed')", &[])
    }

    fn external_changes(&self) -> Result<i64> {
        Ok(self
            .conn()
            .query_row("PRAGMA data_version", [], |r| r.get(0))?)
    }

    fn all_models(&self) -> Result<Vec<Model>> {
        self.all(
            &format!("SELECT {MODEL_COLS} FROM models ORDER BY id"),
            [],
            model_row,
        )
    }
}

impl SqliteStore {
    fn deployments_where(
        &self,
        clause: &str,
        args: &[&dyn rusqlite::ToSql],
    ) -> Result<Vec<Deployment>> {
        self.all(
            &format!("SELECT {DEPLOYMENT_COLS} FROM deployments WHERE {clause} ORDER BY id"),
            args,
            deployment_row,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&dir.path().join("modelgate.db")).unwrap();
        (dir, s)
    }

    #[test]
    fn projects_models_builds_round_trip_and_survive_reopen() {
        let (dir, s) = store();
        let p = s
            .create_project(NewProject {
                name: "iris",
                description: "d",
                source_path: "/x",
                owner_id: None,
            })
            .unwrap();
        let m = s
            .create_model(NewModel {
                project_id: p.id,
                name: "predict",
                description: "",
                owner: "admin",
                access_key: "k1",
                enable_authentication: true,
            })
            .unwrap();
        let b1 = s.create_build(m.id, "predict.py", "predict").unwrap();
        let b2 = s.create_build(m.id, "predict.py", "predict").unwrap();
        assert_eq!((b1.build_number, b2.build_number), (1, 2));
        assert_eq!(b1.status, BuildStatus::Pending);
        let done = s
            .set_build_status(b1.id, BuildStatus::Built, Some("abc"))
            .unwrap();
        assert_eq!(done.sha256.as_deref(), Some("abc"));
        assert!(done.finished_at.is_some());
        drop(s);
        let s = SqliteStore::open(&dir.path().join("modelgate.db")).unwrap();
        assert_eq!(s.builds(m.id).unwrap().len(), 2);
        assert_eq!(s.model(m.id).unwrap().access_key, "k1");
        assert_eq!(s.integrity_check().unwrap(), "ok");
    }

    #[test]
    fn a_database_of_the_previous_schema_version_is_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        {
            let mut conn = Connection::open(&path).unwrap();
            migrations().to_version(&mut conn, 2).unwrap();
            conn.execute(
                "INSERT INTO projects (name, source_path, created_at, updated_at) VALUES ('old', '/x', 't', 't')",
                [],
            )
            .unwrap();
        }
        let s = SqliteStore::open(&path).unwrap();
        let projects = s.projects().unwrap();
        assert_eq!(projects.len(), 1);
        assert_eq!(projects[0].name, "old");
        assert!(projects[0].environment.is_empty());
        let env = [("K".to_string(), "v".to_string())].into_iter().collect();
        assert_eq!(
            s.set_project_environment(projects[0].id, &env)
                .unwrap()
                .environment,
            env
        );
    }

    #[test]
    fn names_are_unique_where_they_must_be_and_deletes_cascade() {
        let (_dir, s) = store();
        let p = s
            .create_project(NewProject {
                name: "p",
                description: "",
                source_path: "/x",
                owner_id: None,
            })
            .unwrap();
        assert!(matches!(
            s.create_project(NewProject {
                name: "p",
                description: "",
                source_path: "/y",
                owner_id: None,
            }),
            Err(StoreError::Conflict(_))
        ));
        let new = |name, key| NewModel {
            project_id: p.id,
            name,
            description: "",
            owner: "",
            access_key: key,
            enable_authentication: false,
        };
        let m = s.create_model(new("m", "k1")).unwrap();
        assert!(matches!(
            s.create_model(new("m", "k2")),
            Err(StoreError::Conflict(_))
        ));
        s.create_build(m.id, "f.py", "f").unwrap();
        s.delete_model(m.id).unwrap();
        assert!(matches!(s.model(m.id), Err(StoreError::NotFound("model"))));
        assert!(s.builds(m.id).unwrap().is_empty());
        assert!(matches!(
            s.create_build(m.id, "f.py", "f"),
            Err(StoreError::NotFound("model"))
        ));
    }
}
