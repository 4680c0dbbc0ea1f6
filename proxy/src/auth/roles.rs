//! Who may do what: the one table of permissions, enforced here and only here.
//!
//! `docs/ACCESS.md` shows the same table; a unit test keeps the two in step.

use std::fmt;

/// A user's role on the whole site.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SiteRole {
    Admin,
    User,
}

impl SiteRole {
    pub fn parse(s: &str) -> Option<SiteRole> {
        match s {
            "admin" => Some(SiteRole::Admin),
            "user" => Some(SiteRole::User),
            _ => None,
        }
    }
}

/// A collaborator's role on one project, weakest first: each role may do all that the roles
/// before it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ProjectRole {
    Viewer,
    Operator,
    Contributor,
    Admin,
}

impl ProjectRole {
    pub fn parse(s: &str) -> Option<ProjectRole> {
        match s {
            "viewer" => Some(ProjectRole::Viewer),
            "operator" => Some(ProjectRole::Operator),
            "contributor" => Some(ProjectRole::Contributor),
            "admin" => Some(ProjectRole::Admin),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ProjectRole::Viewer => "viewer",
            ProjectRole::Operator => "operator",
            ProjectRole::Contributor => "contributor",
            ProjectRole::Admin => "admin",
        }
    }
}

impl fmt::Display for ProjectRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything a caller can ask to do on a project or below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Read the project, its models, builds, build logs, deployments and replica list.
    View,
    /// `POST /model` on a model with authentication enabled.
    Predict,
    /// Read replicas' stdout/stderr, which can hold prediction data.
    ReadReplicaLogs,
    StopDeployment,
    RestartDeployment,
    UploadFiles,
    EditProject,
    CreateModel,
    EditModel,
    Build,
    /// Create a deployment: a new build, or an older one (rollback).
    Deploy,
    RegenerateAccessKey,
    SetModelAuthentication,
    DeleteModel,
    ManageCollaborators,
}

/// The table: each action and the weakest project role allowed to do it. Site admins may do
/// everything on every project.
pub const PROJECT_TABLE: &[(Action, ProjectRole)] = &[
    (Action::View, ProjectRole::Viewer),
    (Action::Predict, ProjectRole::Viewer),
    (Action::ReadReplicaLogs, ProjectRole::Operator),
    (Action::StopDeployment, ProjectRole::Operator),
    (Action::RestartDeployment, ProjectRole::Operator),
    (Action::UploadFiles, ProjectRole::Contributor),
    (Action::EditProject, ProjectRole::Contributor),
    (Action::CreateModel, ProjectRole::Contributor),
    (Action::EditModel, ProjectRole::Contributor),
    (Action::Build, ProjectRole::Contributor),
    (Action::Deploy, ProjectRole::Contributor),
    (Action::RegenerateAccessKey, ProjectRole::Admin),
    (Action::SetModelAuthentication, ProjectRole::Admin),
    (Action::DeleteModel, ProjectRole::Admin),
    (Action::ManageCollaborators, ProjectRole::Admin),
];

impl Action {
    pub fn min_role(self) -> ProjectRole {
        PROJECT_TABLE
            .iter()
            .find(|(a, _)| *a == self)
            .map(|(_, r)| *r)
            // Unreachable while every action is in the table (a unit test checks); deny if not.
            .unwrap_or(ProjectRole::Admin)
    }

    /// Whether `site` / `project` (the caller's roles) may do this.
    pub fn allowed(self, site: SiteRole, project: Option<ProjectRole>) -> bool {
        site == SiteRole::Admin || project.is_some_and(|r| r >= self.min_role())
    }
}

/// Site-wide actions and who may do them (documented with the table above).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SiteAction {
    /// Any active user; they become the project's owner.
    CreateProject,
    /// A project reading a directory on the server: anything modelgate can read could be
    /// snapshotted into a build, so site admins only.
    CreateProjectFromPath,
    /// Read another user's account.
    ReadUsers,
    /// Create, list and delete API keys: one's own, or anyone's for a site admin.
    ManageKeys {
        own: bool,
    },
    /// Create, list, change and deactivate users; delete all keys of a user.
    ManageUsers,
    ReadAudit,
    ManageSettings,
}

impl SiteAction {
    pub fn allowed(self, site: SiteRole) -> bool {
        match self {
            SiteAction::CreateProject => true,
            SiteAction::ManageKeys { own } => own || site == SiteRole::Admin,
            SiteAction::CreateProjectFromPath
            | SiteAction::ReadUsers
            | SiteAction::ManageUsers
            | SiteAction::ReadAudit
            | SiteAction::ManageSettings => site == SiteRole::Admin,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The docs table lists every action with the role the code enforces.
    #[test]
    fn the_documented_table_is_the_enforced_one() {
        let doc = include_str!("../../../docs/ACCESS.md");
        for (action, role) in PROJECT_TABLE {
            let name = format!("`{action:?}`");
            let row = doc
                .lines()
                .find(|l| l.starts_with('|') && l.contains(&name))
                .unwrap_or_else(|| panic!("docs/ACCESS.md has no row for {name}"));
            // The last column is the weakest role.
            let cells: Vec<&str> = row.split('|').map(str::trim).collect();
            assert_eq!(
                cells.iter().rev().find(|c| !c.is_empty()),
                Some(&role.as_str()),
                "docs/ACCESS.md row for {name} does not end in {role}: {row}"
            );
        }
        let rows = doc.lines().filter(|l| l.starts_with("| `")).count();
        assert_eq!(
            rows,
            PROJECT_TABLE.len(),
            "docs list actions the code does not"
        );
    }

    #[test]
    fn roles_are_ordered_and_site_admins_may_do_everything() {
        assert!(Action::View.allowed(SiteRole::User, Some(ProjectRole::Viewer)));
        assert!(!Action::Deploy.allowed(SiteRole::User, Some(ProjectRole::Viewer)));
        assert!(!Action::Deploy.allowed(SiteRole::User, Some(ProjectRole::Operator)));
        assert!(Action::Deploy.allowed(SiteRole::User, Some(ProjectRole::Contributor)));
        assert!(Action::StopDeployment.allowed(SiteRole::User, Some(ProjectRole::Operator)));
        assert!(
            !Action::ManageCollaborators.allowed(SiteRole::User, Some(ProjectRole::Contributor))
        );
        assert!(!Action::View.allowed(SiteRole::User, None));
        assert!(Action::ManageCollaborators.allowed(SiteRole::Admin, None));
        assert!(!SiteAction::ManageKeys { own: false }.allowed(SiteRole::User));
        assert!(SiteAction::ManageKeys { own: true }.allowed(SiteRole::User));
        assert!(!SiteAction::ReadAudit.allowed(SiteRole::User));
    }
}
