//! docs/KERNEL.md derives the oldest kernel envguard runs on from the helpers
//! its programs call. These tests keep that inventory true to the kernel
//! object: every function's helper calls are the ones its row lists, and every
//! helper called has a row saying since when its program types may call it —
//! so a new helper cannot land without its kernel version being looked up.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

/// `BPF_JMP | BPF_CALL`; a helper call has source register 0 (1 is a
/// BPF-to-BPF call, 2 a kfunc).
const CALL: u8 = 0x85;

fn kernel_md() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/KERNEL.md");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The rows of the markdown table whose header line starts with `header`:
/// each row's cells, trimmed.
fn table(doc: &str, header: &str) -> Vec<Vec<String>> {
    doc.lines()
        .skip_while(|l| !l.starts_with(header))
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .map(|l| {
            l.trim_matches('|')
                .split('|')
                .map(|c| c.trim().to_owned())
                .collect()
        })
        .collect()
}

/// The `code`-quoted words of a cell.
fn quoted(cell: &str) -> Vec<String> {
    cell.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

/// Helper ids each function of the object calls (functions that call none
/// are left out).
fn object_calls() -> BTreeMap<String, BTreeSet<u32>> {
    let object = aya_obj::Object::parse(envguard_agent::loader::object()).expect("object parses");
    let mut calls = BTreeMap::new();
    for f in object.functions.values() {
        let ids: BTreeSet<u32> = f
            .instructions
            .iter()
            .filter(|i| i.code == CALL && i.src_reg() == 0)
            .map(|i| i.imm as u32)
            .collect();
        if !ids.is_empty() {
            calls.insert(f.name.clone(), ids);
        }
    }
    assert!(!calls.is_empty(), "no helper calls found in the object");
    calls
}

#[test]
fn each_function_calls_the_helpers_its_row_lists() {
    let doc = kernel_md();
    let mut listed = BTreeMap::new();
    for row in table(&doc, "| function | helpers called |") {
        let ids: BTreeSet<u32> = row[1]
            .split(',')
            .map(|n| {
                n.trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("KERNEL.md: not a helper id: {n:?}"))
            })
            .collect();
        for name in quoted(&row[0]) {
            listed.insert(name, ids.clone());
        }
    }
    assert_eq!(
        object_calls(),
        listed,
        "the kernel object's helper calls vs docs/KERNEL.md's \"helpers called\" table \
         (a helper added or dropped: update the table, and the helper rows and the minimum)"
    );
}

#[test]
fn every_helper_called_has_a_version_row() {
    let doc = kernel_md();
    let mut rows = BTreeSet::new();
    for row in table(&doc, "| helper (id) |") {
        for part in row[0].split('(').skip(1) {
            if let Some(Ok(id)) = part.split(')').next().map(str::parse::<u32>) {
                rows.insert(id);
            }
        }
    }
    let called: BTreeSet<u32> = object_calls().into_values().flatten().collect();
    let missing: Vec<u32> = called.difference(&rows).copied().collect();
    assert!(
        missing.is_empty(),
        "helpers {missing:?} are called but docs/KERNEL.md's \"Helpers, per program type\" \
         table has no row saying since when"
    );
}
