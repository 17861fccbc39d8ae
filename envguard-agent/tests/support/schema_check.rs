//! Checks envguard event records against their JSON Schemas
//! (`docs/schemas/<kind>.schema.json`, draft 2020-12).
//!
//! Self-contained, so any test crate can use it: it needs `serde_json` and
//! `jsonschema = { version = "0.61", default-features = false }`, and is
//! included by path, e.g. from `tests/src/lib.rs` of the root-only suite:
//!
//! ```text
//! #[path = "../../envguard-agent/tests/support/schema_check.rs"]
//! pub mod schema_check;
//!
//! // for every line the agent prints:
//! schema_check::validate_line(&line).unwrap_or_else(|e| panic!("{e}"));
//! // and once for a whole run's output:
//! schema_check::check_stream(&lines).unwrap_or_else(|e| panic!("{e}"));
//! ```
//!
//! Besides the schema itself, [`validate_line`] requires every field of a
//! record (at the top level and inside its objects) to be documented in the
//! schema: the published schemas accept unknown fields (the contract lets
//! fields be added), but the project's own tests should fail when a field
//! appears that the schema does not describe yet.
#![allow(dead_code)]

use std::{collections::HashMap, sync::OnceLock};

use serde_json::Value;

macro_rules! schemas {
    ($($kind:literal),* $(,)?) => {
        /// Every record kind with a schema, and the schema's text.
        pub const SCHEMAS: &[(&str, &str)] = &[
            $(($kind, include_str!(concat!("../../../docs/schemas/", $kind, ".schema.json"))),)*
        ];
    };
}

schemas!(
    "violation",
    "violation_rollup",
    "lost_events",
    "map_full",
    "socket_shared",
    "unparsable_packets",
    "agent_gap",
    "policy_loaded",
    "policy_rejected",
    "mode_change",
    "oversized_record",
    "violations_suppressed",
    "endpoint_conflict",
);

/// The header every record starts with, in this order.
pub const HEADER: &[&str] = &["kind", "time", "seq", "boot_id", "host"];

pub struct Schemas {
    by_kind: HashMap<&'static str, (jsonschema::Validator, Value)>,
}

impl Schemas {
    /// Compiles every schema; panics if one is not a valid draft 2020-12 schema.
    pub fn new() -> Schemas {
        let by_kind = SCHEMAS
            .iter()
            .map(|(kind, text)| {
                let schema: Value = serde_json::from_str(text)
                    .unwrap_or_else(|e| panic!("docs/schemas/{kind}.schema.json: {e}"));
                jsonschema::draft202012::meta::validate(&schema)
                    .unwrap_or_else(|e| panic!("docs/schemas/{kind}.schema.json: {e}"));
                let validator = jsonschema::draft202012::options()
                    .should_validate_formats(true)
                    .build(&schema)
                    .unwrap_or_else(|e| panic!("docs/schemas/{kind}.schema.json: {e}"));
                (*kind, (validator, schema))
            })
            .collect();
        Schemas { by_kind }
    }

    /// The schema of `kind`, if there is one.
    pub fn schema(&self, kind: &str) -> Option<&Value> {
        self.by_kind.get(kind).map(|(_, s)| s)
    }

    /// Checks one record: its kind has a schema, it validates, its header
    /// fields come first, and every field it has is documented.
    pub fn validate(&self, record: &Value) -> Result<(), String> {
        let kind = record
            .get("kind")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("record without a string `kind`: {record}"))?;
        let (validator, schema) = self
            .by_kind
            .get(kind)
            .ok_or_else(|| format!("no schema for kind {kind:?} in docs/schemas: {record}"))?;
        let errors: Vec<String> = validator
            .iter_errors(record)
            .map(|e| format!("  at {:?}: {e}", e.instance_path().as_str()))
            .collect();
        if !errors.is_empty() {
            return Err(format!(
                "{kind} record does not match docs/schemas/{kind}.schema.json:\n{}\nrecord: {record}",
                errors.join("\n")
            ));
        }
        let keys: Vec<&str> = record
            .as_object()
            .map(|o| o.keys().map(String::as_str).take(HEADER.len()).collect())
            .unwrap_or_default();
        if keys != HEADER {
            return Err(format!(
                "{kind} record must start with {HEADER:?}, starts with {keys:?}: {record}"
            ));
        }
        let mut undocumented = Vec::new();
        documented(schema, schema, record, "", &mut undocumented);
        if !undocumented.is_empty() {
            return Err(format!(
                "{kind} record has fields docs/schemas/{kind}.schema.json does not describe: {}\nrecord: {record}",
                undocumented.join(", ")
            ));
        }
        Ok(())
    }
}

/// Collects the paths of fields of `value` that `schema` does not list.
fn documented(root: &Value, schema: &Value, value: &Value, at: &str, out: &mut Vec<String>) {
    let schema = resolve(root, schema);
    let Some(obj) = value.as_object() else {
        return;
    };
    let Some(props) = schema.get("properties").and_then(Value::as_object) else {
        return;
    };
    for (k, v) in obj {
        match props.get(k) {
            Some(sub) => documented(root, sub, v, &format!("{at}/{k}"), out),
            None => out.push(format!("{at}/{k}")),
        }
    }
}

/// Follows a local `$ref` (`#/$defs/...`).
fn resolve<'a>(root: &'a Value, schema: &'a Value) -> &'a Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(r) => r
            .strip_prefix('#')
            .and_then(|ptr| root.pointer(ptr))
            .unwrap_or(schema),
        None => schema,
    }
}

/// The compiled schemas, made once per process.
pub fn schemas() -> &'static Schemas {
    static SCHEMAS_ONCE: OnceLock<Schemas> = OnceLock::new();
    SCHEMAS_ONCE.get_or_init(Schemas::new)
}

/// Parses one JSON line and checks it (see [`Schemas::validate`]).
pub fn validate_line(line: &str) -> Result<Value, String> {
    let record: Value =
        serde_json::from_str(line).map_err(|e| format!("not a JSON record ({e}): {line}"))?;
    schemas().validate(&record)?;
    Ok(record)
}

/// Checks a whole run's output: every line is a valid record, and `seq`
/// starts at 0 and has no gap or repeat within each `boot_id`.
pub fn check_stream<S: AsRef<str>>(lines: &[S]) -> Result<(), String> {
    let mut next: HashMap<String, u64> = HashMap::new();
    for line in lines {
        let line = line.as_ref();
        let record = validate_line(line)?;
        let boot = record["boot_id"].as_str().unwrap_or_default().to_owned();
        let seq = record["seq"].as_u64().unwrap_or_default();
        let want = next.entry(boot.clone()).or_insert(0);
        if seq != *want {
            return Err(format!(
                "seq {seq} where {want} was due (boot_id {boot}): {line}"
            ));
        }
        *want += 1;
    }
    Ok(())
}
