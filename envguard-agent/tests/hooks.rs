//! The hook table (`envguard_common::programs::HOOKS`) is the one description
//! of the kernel programs: the kernel object, the schemas' `hook` and `hooks`
//! enums and the README's tables must all say what it says.
use std::{collections::BTreeSet, path::Path};

use envguard_common::programs::{CGROUP_PROGRAMS, HOOKS};
use serde_json::Value;

fn repo_file(rel: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn schema(kind: &str) -> Value {
    serde_json::from_str(&repo_file(&format!("docs/schemas/{kind}.schema.json"))).unwrap()
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect()
}

/// The programs whose records carry a `hook`, in table order.
fn reporting() -> Vec<&'static str> {
    HOOKS
        .iter()
        .filter(|h| h.event_id != 0)
        .map(|h| h.name)
        .collect()
}

#[test]
fn schemas_list_the_table() {
    for kind in ["violation", "violation_rollup"] {
        let s = schema(kind);
        assert_eq!(
            strings(&s["properties"]["hook"]["enum"])
                .into_iter()
                .collect::<BTreeSet<_>>(),
            reporting().into_iter().collect(),
            "{kind}.schema.json: hook"
        );
    }
    let s = schema("policy_loaded");
    assert_eq!(
        strings(&s["properties"]["hooks"]["items"]["enum"]),
        CGROUP_PROGRAMS.to_vec(),
        "policy_loaded.schema.json: hooks"
    );
}

#[test]
fn readme_lists_the_table() {
    let readme = repo_file("README.md");
    // "How it works": | `a`, `b` | label | job |, one row per label.
    let section = readme
        .split("## How it works")
        .nth(1)
        .expect("README has a \"How it works\" section");
    let mut rows = BTreeSet::new();
    for line in section
        .lines()
        .skip_while(|l| !l.starts_with("| program"))
        .skip(2)
    {
        if !line.starts_with('|') {
            break;
        }
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        for name in cells[1].split(',') {
            rows.insert((
                name.trim().trim_matches('`').to_owned(),
                cells[2].to_owned(),
            ));
        }
    }
    let table: BTreeSet<_> = HOOKS
        .iter()
        .map(|h| (h.name.to_owned(), h.label.to_owned()))
        .collect();
    assert_eq!(
        rows, table,
        "README \"How it works\" table vs the hook table"
    );
    // The `hook` field of violation records.
    let want = format!(
        "| `hook` | {} |",
        reporting()
            .iter()
            .map(|n| format!("`{n}`"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let got = readme
        .lines()
        .find(|l| l.starts_with("| `hook` |"))
        .expect("README documents the hook field");
    let set = |l: &str| {
        l.split(['|', ','])
            .map(|c| c.trim().trim_matches('`').to_owned())
            .filter(|c| !c.is_empty())
            .collect::<BTreeSet<_>>()
    };
    assert_eq!(set(got), set(&want), "README `hook` field");
}

#[test]
fn the_object_holds_exactly_the_table() {
    let object = aya_obj::Object::parse(envguard_agent::loader::object()).expect("object parses");
    let programs: BTreeSet<&str> = object.programs.keys().map(String::as_str).collect();
    let table: BTreeSet<&str> = HOOKS.iter().map(|h| h.name).collect();
    assert_eq!(programs, table);
}
