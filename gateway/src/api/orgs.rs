//! Organizations, BDKs (key sources) and KEKs: the key owner's routes. The key ceremonies are in
//! [`crate::service::keys`]; here the clear components are parsed into zeroizing strings.

use super::*;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateOrg {
    name: String,
}

pub(super) async fn create_org(State(state): St, caller: Caller, body: Bytes) -> ApiResult<Response> {
    caller.key_owner()?;
    let req: CreateOrg = json_body(&body)?;
    let created = state.service.create_org(&req.name, &caller.actor()).await?;
    Ok((StatusCode::CREATED, Json(json!({"org": created.org, "admin_token": created.admin_token}))).into_response())
}

pub(super) async fn list_orgs(State(state): St, caller: Caller) -> ApiResult<Json<Value>> {
    caller.key_owner()?;
    let orgs = blocking(&state, |s| s.list_orgs()).await?;
    Ok(Json(json!({ "orgs": orgs })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Component {
    /// Clear component, hex. Entered by one custodian; zeroized when the request is dropped.
    #[serde(deserialize_with = "zeroizing_string")]
    key: Zeroizing<String>,
    /// The component's own check value, hex.
    kcv: String,
}

impl Component {
    /// The request's components as the key service takes them (moved, not copied).
    pub(super) fn for_ceremony(components: Vec<Component>) -> Vec<CeremonyComponent> {
        components.into_iter().map(|c| CeremonyComponent::new(c.key, c.kcv)).collect()
    }
}

pub(super) fn zeroizing_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Zeroizing<String>, D::Error> {
    String::deserialize(d).map(Zeroizing::new)
}

/// A BDK for an organization: as 2 or 3 clear `components`, or as a TR-31 `key_block` under one
/// of the organization's KEKs (`kek`, by name).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AuthorizeKeySource {
    name: String,
    /// `tdes` or `aes`.
    algorithm: String,
    /// 2 or 3 components, XORed into the BDK.
    #[serde(default)]
    components: Vec<Component>,
    /// The KEK the key block is wrapped under.
    kek: Option<String>,
    /// The BDK as a TR-31 key block under `kek`.
    key_block: Option<String>,
    /// The KCV of the BDK, if the key owner wants it checked.
    kcv: Option<String>,
}

pub(super) async fn authorize_key_source(
    State(state): St,
    caller: Caller,
    Path(org_name): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    caller.key_owner()?;
    let req: AuthorizeKeySource = json_body(&body)?;
    let family = key_family(&req.algorithm)?;
    let material = match (req.components, req.kek, req.key_block) {
        (components, None, None) => BdkMaterial::Components(Component::for_ceremony(components)),
        (components, Some(kek), Some(key_block)) if components.is_empty() => BdkMaterial::KeyBlock { kek, key_block },
        _ => {
            return Err(ApiError::bad(
                "bad_key_source",
                "a BDK comes either as components, or as a key_block under a kek (both fields)",
            ))
        }
    };
    let request = NewKeySource { name: req.name, family, material, kcv: req.kcv };
    let row = state.service.authorize_key_source(&org_name, request, &caller.actor()).await?;
    Ok((StatusCode::CREATED, Json(json!({"key_source": row}))).into_response())
}

pub(super) async fn list_key_sources(State(state): St, caller: Caller) -> ApiResult<Json<Value>> {
    let org = caller.org()?;
    let rows = blocking(&state, move |s| s.list_key_sources(org)).await?;
    Ok(Json(json!({ "key_sources": rows })))
}

/// A key-encryption key for an organization, entered once as 2 or 3 clear components.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateKek {
    name: String,
    /// `tdes` or `aes`.
    algorithm: String,
    components: Vec<Component>,
    /// The KCV of the combined KEK, if the key owner wants it checked.
    kcv: Option<String>,
}

pub(super) async fn create_kek(
    State(state): St,
    caller: Caller,
    Path(org_name): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    caller.key_owner()?;
    let req: CreateKek = json_body(&body)?;
    let family = key_family(&req.algorithm)?;
    let request = NewKek { name: req.name, family, components: Component::for_ceremony(req.components), kcv: req.kcv };
    let (row, org) = state.service.create_kek(&org_name, request, &caller.actor()).await?;
    Ok((StatusCode::CREATED, Json(json!({"kek": kek_json(&row, &org)}))).into_response())
}

pub(super) fn kek_json(k: &KekRow, org: &str) -> Value {
    json!({"org": org, "name": k.name, "algorithm": k.algorithm, "kcv": k.kcv, "created_at": k.created_at})
}

/// Every organization's KEKs, for the key owner: name, algorithm, KCV, created; never the key.
pub(super) async fn list_keks(State(state): St, caller: Caller) -> ApiResult<Json<Value>> {
    caller.key_owner()?;
    let (keks, orgs) = blocking(&state, |s| Ok((s.list_keks(None)?, s.list_orgs()?))).await?;
    let orgs: std::collections::HashMap<i64, String> = orgs.into_iter().map(|o| (o.id, o.name)).collect();
    let keks: Vec<Value> =
        keks.iter().map(|k| kek_json(k, orgs.get(&k.org_id).map(String::as_str).unwrap_or_default())).collect();
    Ok(Json(json!({ "keks": keks })))
}
