//! `/api/v2/users`, `/users/{u}/keys`, `/projects/{p}/collaborators`, `/audit`, `/settings`.
//!
//! Every change to users, keys or collaborators is written to the store, recorded in the audit
//! trail and published to the auth index before the call answers, so it holds from the very
//! next request. A key's secret appears once, in the answer to its creation, and nowhere else.

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use modelgate_control::identity::NewApiKey;
use serde::Deserialize;
use serde_json::json;

use super::{blocking, ok, read_json, Ctx};
use crate::auth::{self, key, Action, SiteAction};
use crate::error::{ApiError, Body};

fn no_content() -> Result<Response<Body>, ApiError> {
    Ok(Response::builder()
        .status(StatusCode::NO_CONTENT)
        .body(crate::body::full(Bytes::new()))
        .expect("static response"))
}

/// Whether a path segment names the caller (`me`, their id or their name), decided before any
/// lookup so a refusal says nothing about which other users exist.
fn is_self(ctx: &Ctx<'_>, segment: &str) -> bool {
    segment == "me" || segment == ctx.who.user_id.to_string() || segment == &*ctx.who.username
}

/// Resolves `me`, a numeric id or a username to a user id.
async fn user_id(ctx: &Ctx<'_>, segment: &str) -> Result<i64, ApiError> {
    if segment == "me" {
        return Ok(ctx.who.user_id);
    }
    if let Ok(id) = segment.parse::<i64>() {
        return Ok(id);
    }
    let store = ctx.cp.store.clone();
    let name = segment.to_owned();
    Ok(blocking(move || store.user_by_name(&name)).await?.id)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateUser {
    username: String,
    #[serde(default = "user_role")]
    role: String,
}

fn user_role() -> String {
    "user".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateUser {
    role: Option<String>,
    active: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateKey {
    #[serde(default)]
    description: String,
    expires_in_days: Option<i64>,
    expires_in_seconds: Option<i64>,
}

pub(super) async fn users(
    ctx: &Ctx<'_>,
    method: Method,
    rest: &[&str],
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let cp = ctx.cp;
    match (method, rest) {
        (Method::GET, []) => {
            ctx.allow_site(SiteAction::ManageUsers)?;
            let store = cp.store.clone();
            ok(
                StatusCode::OK,
                json!({ "users": blocking(move || store.users()).await? }),
            )
        }
        (Method::POST, []) => {
            ctx.allow_site(SiteAction::ManageUsers)?;
            let body: CreateUser = read_json(req).await?;
            // All-digit names would read as user ids in paths.
            if !crate::config::valid_name(&body.username)
                || body.username == "me"
                || body.username.bytes().all(|b| b.is_ascii_digit())
            {
                return Err(ApiError::InvalidRequest(
                    "username must be 1-64 letters, digits, '-', '_' or '.', not only digits, and not \"me\""
                        .into(),
                ));
            }
            if auth::SiteRole::parse(&body.role).is_none() {
                return Err(ApiError::InvalidRequest(
                    "role must be \"admin\" or \"user\"".into(),
                ));
            }
            let store = cp.store.clone();
            let user = blocking(move || store.create_user(&body.username, &body.role)).await?;
            cp.publish_auth().await?;
            ctx.audit(
                "user.created",
                format!("user:{}", user.id),
                format!("username {:?}, role {}", user.username, user.role),
            )
            .await?;
            ok(StatusCode::CREATED, json!(user))
        }
        (Method::GET, [u]) => {
            if !is_self(ctx, u) {
                ctx.allow_site(SiteAction::ReadUsers)?;
            }
            let uid = user_id(ctx, u).await?;
            let store = cp.store.clone();
            ok(
                StatusCode::OK,
                json!(blocking(move || store.user(uid)).await?),
            )
        }
        (Method::PATCH, [u]) => {
            ctx.allow_site(SiteAction::ManageUsers)?;
            let uid = user_id(ctx, u).await?;
            let body: UpdateUser = read_json(req).await?;
            if body
                .role
                .as_deref()
                .is_some_and(|r| auth::SiteRole::parse(r).is_none())
            {
                return Err(ApiError::InvalidRequest(
                    "role must be \"admin\" or \"user\"".into(),
                ));
            }
            let store = cp.store.clone();
            let (before, after) = blocking(move || {
                let before = store.user(uid)?;
                let after = store.update_user(uid, body.role.as_deref(), body.active)?;
                Ok((before, after))
            })
            .await?;
            cp.publish_auth().await?;
            let mut changes = Vec::new();
            if before.role != after.role {
                changes.push(format!("role: {} -> {}", before.role, after.role));
            }
            if before.active != after.active {
                changes.push(format!("active: {} -> {}", before.active, after.active));
            }
            if !changes.is_empty() {
                ctx.audit("user.updated", format!("user:{uid}"), changes.join("; "))
                    .await?;
            }
            ok(StatusCode::OK, json!(after))
        }
        (method, [u, "keys", rest @ ..]) => {
            let own = is_self(ctx, u);
            // Checked before the name is looked up, for every key route.
            if method == Method::DELETE && rest.is_empty() {
                ctx.allow_site(SiteAction::ManageUsers)?;
            } else {
                ctx.allow_site(SiteAction::ManageKeys { own })?;
            }
            let uid = user_id(ctx, u).await?;
            keys(ctx, method, uid, rest, req).await
        }
        _ => Err(ApiError::NotFound(format!("users/{}", rest.join("/")))),
    }
}

async fn keys(
    ctx: &Ctx<'_>,
    method: Method,
    uid: i64,
    rest: &[&str],
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    // Authorized by the caller (`users`), before the user was looked up.
    let cp = ctx.cp;
    match (method, rest) {
        (Method::GET, []) => {
            let store = cp.store.clone();
            let keys = blocking(move || store.api_keys(uid)).await?;
            let now = auth::now_unix();
            let list: Vec<_> = keys
                .iter()
                .map(|k| {
                    json!({
                        "key_id": k.key_id,
                        "user_id": k.user_id,
                        "description": k.description,
                        "created_at": k.created_at,
                        "expires_at": k.expires_at,
                        "expired": now >= k.expires_at,
                    })
                })
                .collect();
            ok(StatusCode::OK, json!({ "keys": list }))
        }
        (Method::POST, []) => {
            let body: CreateKey = read_json(req).await?;
            if body.description.len() > 200 {
                return Err(ApiError::InvalidRequest(
                    "description is limited to 200 bytes".into(),
                ));
            }
            let (default_days, max_days) = expiry_settings(ctx).await?;
            let secs = match (body.expires_in_days, body.expires_in_seconds) {
                (Some(_), Some(_)) => {
                    return Err(ApiError::InvalidRequest(
                        "give expires_in_days or expires_in_seconds, not both".into(),
                    ))
                }
                (Some(d), None) => d.checked_mul(86_400),
                (None, Some(s)) => Some(s),
                (None, None) => Some(default_days * 86_400),
            };
            let secs = match secs {
                Some(s) if s > 0 => s,
                _ => {
                    return Err(ApiError::InvalidRequest(
                        "the expiry must be a positive duration".into(),
                    ))
                }
            };
            if secs > max_days * 86_400 {
                return Err(ApiError::ExpiryTooLong { max_days });
            }
            let (secret, key_id) = key::generate();
            let digest = key::digest_hex(&secret);
            let expires_at = auth::now_unix() + secs;
            let store = cp.store.clone();
            let kid = key_id.clone();
            let created = blocking(move || {
                store.create_api_key(NewApiKey {
                    key_id: &kid,
                    user_id: uid,
                    digest: &digest,
                    description: &body.description,
                    expires_at,
                })
            })
            .await?;
            cp.publish_auth().await?;
            ctx.audit(
                "api_key.created",
                format!("user:{uid} key:{key_id}"),
                format!("expires_at {expires_at}"),
            )
            .await?;
            ok(
                StatusCode::CREATED,
                json!({
                    "key_id": created.key_id,
                    "user_id": uid,
                    "description": created.description,
                    "created_at": created.created_at,
                    "expires_at": created.expires_at,
                    // Shown this once; the store keeps only its digest.
                    "key": secret,
                }),
            )
        }
        (Method::DELETE, []) => {
            // Deleting all keys of a user is an admin's tool (e.g. when a laptop is lost).
            let store = cp.store.clone();
            let deleted = blocking(move || store.delete_api_keys(uid)).await?;
            cp.publish_auth().await?;
            ctx.audit(
                "api_key.deleted_all",
                format!("user:{uid}"),
                format!("{} key(s): {}", deleted.len(), deleted.join(", ")),
            )
            .await?;
            ok(StatusCode::OK, json!({ "deleted": deleted.len() }))
        }
        (Method::DELETE, [key_id]) => {
            let store = cp.store.clone();
            let kid = key_id.to_string();
            blocking(move || store.delete_api_key(uid, &kid)).await?;
            cp.publish_auth().await?;
            ctx.audit(
                "api_key.deleted",
                format!("user:{uid} key:{key_id}"),
                String::new(),
            )
            .await?;
            no_content()
        }
        _ => Err(ApiError::NotFound(format!("keys/{}", rest.join("/")))),
    }
}

async fn expiry_settings(ctx: &Ctx<'_>) -> Result<(i64, i64), ApiError> {
    let store = ctx.cp.store.clone();
    blocking(move || {
        let get = |name, default| -> modelgate_control::store::Result<i64> {
            Ok(store
                .setting(name)?
                .and_then(|v| v.parse().ok())
                .unwrap_or(default))
        };
        Ok((
            get(auth::DEFAULT_EXPIRY_SETTING, auth::DEFAULT_EXPIRY_DAYS)?,
            get(auth::MAX_EXPIRY_SETTING, auth::DEFAULT_MAX_EXPIRY_DAYS)?,
        ))
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateSettings {
    api_key_default_expiry_days: Option<i64>,
    api_key_max_expiry_days: Option<i64>,
}

pub(super) async fn settings(
    ctx: &Ctx<'_>,
    method: Method,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let show = |(default, max): (i64, i64)| {
        ok(
            StatusCode::OK,
            json!({ "api_key_default_expiry_days": default, "api_key_max_expiry_days": max }),
        )
    };
    match method {
        // Anyone may read the limits their keys are held to.
        Method::GET => show(expiry_settings(ctx).await?),
        Method::PATCH => {
            ctx.allow_site(SiteAction::ManageSettings)?;
            let body: UpdateSettings = read_json(req).await?;
            let (cur_default, cur_max) = expiry_settings(ctx).await?;
            let default = body.api_key_default_expiry_days.unwrap_or(cur_default);
            let max = body.api_key_max_expiry_days.unwrap_or(cur_max);
            if !(1..=3650).contains(&max) || !(1..=max).contains(&default) {
                return Err(ApiError::InvalidRequest(
                    "expiry days must satisfy 1 <= default <= max <= 3650".into(),
                ));
            }
            let store = ctx.cp.store.clone();
            blocking(move || {
                store.set_setting(auth::DEFAULT_EXPIRY_SETTING, &default.to_string())?;
                store.set_setting(auth::MAX_EXPIRY_SETTING, &max.to_string())
            })
            .await?;
            ctx.audit(
                "settings.updated",
                "site".into(),
                format!("api key expiry: default {default} days, max {max} days"),
            )
            .await?;
            show((default, max))
        }
        _ => Err(ApiError::MethodNotAllowed {
            allowed: "GET, PATCH",
        }),
    }
}

pub(super) async fn audit(
    ctx: &Ctx<'_>,
    req: &Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    ctx.allow_site(SiteAction::ReadAudit)?;
    let query = |name: &str| {
        req.uri()
            .query()
            .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix(name)))
            .and_then(|v| v.parse::<i64>().ok())
    };
    let after = query("after=").unwrap_or(0);
    let limit = query("limit=").unwrap_or(100).clamp(1, 1000);
    // Records queued by the request path reach the store first.
    ctx.cp.auth.flush().await;
    let store = ctx.cp.store.clone();
    let events = blocking(move || store.audit(after, limit)).await?;
    ok(StatusCode::OK, json!({ "events": events }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetCollaborator {
    role: String,
}

pub(super) async fn collaborators(
    ctx: &Ctx<'_>,
    method: Method,
    pid: i64,
    rest: &[&str],
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let cp = ctx.cp;
    match (method, rest) {
        (Method::GET, []) => {
            ctx.allow(pid, Action::View)?;
            let store = cp.store.clone();
            let list = blocking(move || store.collaborators(pid)).await?;
            ok(StatusCode::OK, json!({ "collaborators": list }))
        }
        (Method::PUT, [u]) => {
            ctx.allow(pid, Action::ManageCollaborators)?;
            let uid = user_id(ctx, u).await?;
            let body: SetCollaborator = read_json(req).await?;
            if auth::ProjectRole::parse(&body.role).is_none() {
                return Err(ApiError::InvalidRequest(
                    "role must be viewer, operator, contributor or admin".into(),
                ));
            }
            let store = cp.store.clone();
            let c = blocking(move || store.set_collaborator(pid, uid, &body.role)).await?;
            cp.publish_auth().await?;
            ctx.audit(
                "collaborator.set",
                format!("project:{pid} user:{uid}"),
                format!("role {}", c.role),
            )
            .await?;
            ok(StatusCode::OK, json!(c))
        }
        (Method::DELETE, [u]) => {
            ctx.allow(pid, Action::ManageCollaborators)?;
            let uid = user_id(ctx, u).await?;
            let store = cp.store.clone();
            blocking(move || store.remove_collaborator(pid, uid)).await?;
            cp.publish_auth().await?;
            ctx.audit(
                "collaborator.removed",
                format!("project:{pid} user:{uid}"),
                String::new(),
            )
            .await?;
            no_content()
        }
        _ => Err(ApiError::NotFound(format!(
            "collaborators/{}",
            rest.join("/")
        ))),
    }
}
