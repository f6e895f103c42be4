//! The device registry: the key owner uploads an organization's SNs; the organization groups its
//! devices and assigns them a key source.

use std::collections::{HashMap, HashSet};

use serde_json::json;

use super::*;
use crate::engine::Target;
use crate::store::{GroupRow, ImportRow};

/// Where devices come from: the key owner uploads them to an organization.
pub const UPLOAD_ROUTE: &str = "POST /v1/orgs/{org}/devices/import";

/// What an upload did (or, with `dry_run`, would do).
#[derive(Debug, Clone, serde::Serialize)]
pub struct UploadReport {
    pub org: String,
    pub valid: usize,
    pub imported: usize,
    pub already_registered: usize,
    pub dry_run: bool,
    /// With `dry_run`: the SNs that would be added.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub new: Option<usize>,
}

/// Parses a device CSV: one SN per line, optionally `sn,model`; a header line `sn[,model]`, blank
/// lines and `#` comments are skipped. Every bad line is reported; nothing is imported if any is bad.
pub fn parse_device_csv(text: &str) -> Result<Vec<ImportRow>, Vec<Value>> {
    let (rows, errors) = check_device_csv(text);
    if errors.is_empty() {
        Ok(rows)
    } else {
        Err(errors)
    }
}

/// The good lines of a device CSV and the problem of each bad one (`line`, `sn` when there is
/// one, `reason`), in line order; an empty file is one problem, at line 0.
fn check_device_csv(text: &str) -> (Vec<ImportRow>, Vec<Value>) {
    let mut rows = Vec::new();
    let mut errors = Vec::new();
    let mut seen = HashSet::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let trimmed = raw.trim().trim_start_matches('\u{feff}');
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = trimmed.split(',').map(|f| f.trim().trim_matches('"')).collect();
        if line == 1 && fields[0].eq_ignore_ascii_case("sn") {
            continue;
        }
        if fields.len() > 2 {
            errors.push(json!({"line": line, "reason": "expected `sn` or `sn,model`"}));
            continue;
        }
        let sn = fields[0];
        if let Err(e) = rki_protocol::topic::validate_name(sn) {
            errors.push(json!({"line": line, "sn": sn, "reason": format!("invalid SN: {e}")}));
            continue;
        }
        if !seen.insert(sn.to_string()) {
            errors.push(json!({"line": line, "sn": sn, "reason": "duplicate SN in this file"}));
            continue;
        }
        let model = fields.get(1).filter(|m| !m.is_empty()).map(|m| m.to_string());
        if let Some(model) = &model {
            if rki_protocol::terminal::Model::parse(model).is_none() {
                errors.push(json!({"line": line, "sn": sn, "reason": format!("unknown model {model:?}")}));
                continue;
            }
        }
        rows.push(ImportRow { line, sn: sn.to_string(), model });
    }
    if rows.is_empty() && errors.is_empty() {
        errors.push(json!({"line": 0, "reason": "no device in the file"}));
    }
    (rows, errors)
}

/// A whole upload refused: every problem line, and nothing stored.
fn refused(mut errors: Vec<Value>, org: &str) -> ServiceError {
    errors.sort_by_key(|e| e["line"].as_u64().unwrap_or(0));
    ServiceError::Unprocessable {
        code: "invalid_csv",
        detail: format!("{} problem line(s); nothing was uploaded to {org}", errors.len()),
        extra: Some(json!({ "org": org, "errors": errors })),
    }
}

impl Service {
    /// Uploads a CSV of SNs to the organization (`devices.upload`), all or nothing. Every bad
    /// line and every SN that another organization holds is listed, line by line, and then
    /// nothing is stored; the key owner is platform-level and may know which SNs are held
    /// elsewhere. SNs the organization already holds are counted, not added twice. `dry_run`
    /// checks exactly as the upload does and stores nothing.
    pub async fn upload_devices(
        &self,
        org_name: &str,
        csv: &str,
        dry_run: bool,
        actor: &Actor,
    ) -> ServiceResult<UploadReport> {
        let org = self.org_named(org_name).await?;
        let (rows, mut errors) = check_device_csv(csv);
        let sns: Vec<String> = rows.iter().map(|r| r.sn.clone()).collect();
        let (owners, orgs) = self.blocking(move |s| Ok((s.sn_owners(&sns)?, s.list_orgs()?))).await?;
        let owners: HashMap<String, i64> = owners.into_iter().collect();
        let names: HashMap<i64, String> = orgs.into_iter().map(|o| (o.id, o.name)).collect();
        let mut already = 0;
        for row in &rows {
            match owners.get(&row.sn) {
                Some(&owner) if owner == org.id => already += 1,
                Some(owner) => {
                    let holder = names.get(owner).map(String::as_str).unwrap_or("?");
                    errors.push(json!({
                        "line": row.line,
                        "sn": row.sn,
                        "reason": format!("SN is held by another organization ({holder})"),
                    }));
                }
                None => {}
            }
        }
        if !errors.is_empty() {
            return Err(refused(errors, &org.name));
        }
        if dry_run {
            return Ok(UploadReport {
                org: org.name,
                valid: rows.len(),
                imported: 0,
                already_registered: already,
                dry_run: true,
                new: Some(rows.len() - already),
            });
        }
        let now = self.now();
        let details = json!({"org": org.name, "lines": rows.len()});
        let audit = self.audit(actor, Some(org.id), "devices.upload", format!("devices:{}", rows.len()), details);
        let (org_id, rows_for_store) = (org.id, rows.clone());
        // The store checks the owners again inside its transaction: an SN taken since the check
        // above refuses the whole upload too.
        let imported = match self.blocking(move |s| s.import_devices(org_id, &rows_for_store, now, &audit)).await {
            Ok(n) => n,
            Err(ServiceError::Engine(EngineError::Conflict(detail))) => {
                return Err(refused(detail.split("; ").map(|d| json!({"reason": d})).collect(), &org.name))
            }
            Err(e) => return Err(e),
        };
        self.engine.notify_registry_changed();
        Ok(UploadReport {
            org: org.name,
            valid: rows.len(),
            imported,
            already_registered: rows.len() - imported,
            dry_run: false,
            new: None,
        })
    }

    /// Creates a group (`group.create`).
    pub async fn create_group(
        &self,
        org: i64,
        name: &str,
        description: &str,
        actor: &Actor,
    ) -> ServiceResult<GroupRow> {
        check_name("name", name)?;
        if description.len() > 256 {
            return Err(ServiceError::invalid("invalid", "description is longer than 256 characters"));
        }
        let audit = self.audit(actor, Some(org), "group.create", format!("group:{name}"), json!({}));
        let (name, description) = (name.to_string(), description.to_string());
        self.blocking(move |s| s.create_group(org, &name, &description, &audit)).await
    }

    /// Adds the organization's devices `sns` to its group `name` (`group.add_devices`); returns
    /// how many were not members yet.
    pub async fn add_group_devices(
        &self,
        org: i64,
        name: &str,
        sns: Vec<String>,
        actor: &Actor,
    ) -> ServiceResult<usize> {
        let owned = name.to_string();
        let group = self.blocking(move |s| s.group_by_name(org, &owned)).await?;
        let count = sns.len();
        let ids = self.engine.resolve_target(org, &Target::Devices(sns)).await?;
        let audit = self.audit(actor, Some(org), "group.add_devices", format!("group:{name}"), json!({"sns": count}));
        self.blocking(move |s| s.add_group_members(group.id, &ids, &audit)).await
    }

    /// Assigns a key source to the target's devices, or clears their assignment with `None`
    /// (`assignment.set`); returns how many devices it concerned.
    pub async fn assign(
        &self,
        org: i64,
        target: Target,
        key_source: Option<String>,
        actor: &Actor,
    ) -> ServiceResult<usize> {
        let key_source_id = match &key_source {
            Some(name) => {
                let name = name.clone();
                Some(self.blocking(move |s| s.key_source_by_name(org, &name)).await?.id)
            }
            None => None,
        };
        let ids = self.engine.resolve_target(org, &target).await?;
        // The same object names as the other audit entries: `group:NAME`, or `devices:N` with the SNs.
        let (object, sns) = match &target {
            Target::Group(name) => (format!("group:{name}"), None),
            Target::Devices(sns) => (format!("devices:{}", sns.len()), Some(sns)),
        };
        let details = json!({"key_source": key_source, "devices": ids.len(), "sns": sns});
        let audit = self.audit(actor, Some(org), "assignment.set", object, details);
        self.blocking(move |s| s.assign(org, &ids, key_source_id, &audit)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_csv_with_one_bad_line_is_refused_whole_with_its_line_number() {
        let errors = parse_device_csv("sn,model\nSN1,P3\nbad/sn,P3\nSN1,P3\nSN4,P9\n").expect_err("bad");
        let lines: Vec<i64> = errors.iter().filter_map(|e| e["line"].as_i64()).collect();
        assert_eq!(lines, vec![3, 4, 5]);
    }

    #[test]
    fn a_clean_csv_parses() {
        let rows = parse_device_csv("SN1\n\n# comment\nSN2,P3\n").expect("ok");
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1].model.as_deref(), Some("P3"));
        assert!(parse_device_csv("").is_err());
    }
}
