//! The panic boundary: what a caught panic returns, and that every export's whole body runs
//! inside it (checked on the source text of every file of src/ffi/).

use std::ffi::c_char;

use super::llmproxy_status::{self, *};
use super::{boundary, boundary_or};

/// Every file of src/ffi/ but this one.
const SOURCES: [(&str, &str); 6] = [
    ("mod.rs", include_str!("mod.rs")),
    ("router.rs", include_str!("router.rs")),
    ("shared.rs", include_str!("shared.rs")),
    ("pick.rs", include_str!("pick.rs")),
    ("request.rs", include_str!("request.rs")),
    ("errors.rs", include_str!("errors.rs")),
];

/// The exports of `source` (by name) and those whose body is not one call of the boundary:
/// the body's first line (at the body's indentation) must call `boundary` or `boundary_or`,
/// and every other line must belong to that call (indented deeper, or its closing line).
/// `llmproxy_version` only returns a constant.
fn exports_outside_the_boundary(source: &str) -> (Vec<String>, Vec<String>) {
    let (mut exports, mut outside) = (Vec::new(), Vec::new());
    for (i, _) in source.match_indices("extern \"C\" fn llmproxy_") {
        let rest = &source[i..];
        let name: String = rest["extern \"C\" fn ".len()..]
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        // rustfmt puts the body's opening brace at the end of the signature and its closing
        // brace alone on a line at column 0.
        let start = rest.find("{\n").expect("function body") + 2;
        let end = start + rest[start..].find("\n}\n").expect("end of the body");
        let lines: Vec<&str> = rest[start..end].lines().collect();
        let first = lines[0];
        let calls_boundary = ["    boundary(", "    boundary_or("]
            .iter()
            .any(|call| first.starts_with(call));
        let rest_inside = lines[1..].iter().enumerate().all(|(n, line)| {
            let last = n + 2 == lines.len();
            line.starts_with("     ") || (last && (*line == "    })" || *line == "    )"))
        });
        let one_call = calls_boundary && rest_inside && (lines.len() > 1 || first.ends_with(')'));
        if !one_call && name != "llmproxy_version" {
            outside.push(name.clone());
        }
        exports.push(name);
    }
    (exports, outside)
}

/// docs/security.md promises that no panic crosses the C ABI: every export's whole body
/// (argument checks and writes to output pointers included) runs inside the boundary.
#[test]
fn every_export_runs_its_whole_body_inside_the_panic_boundary() {
    let mut exports = 0;
    let mut outside = Vec::new();
    for (file, source) in SOURCES {
        let (found, bad) = exports_outside_the_boundary(source);
        exports += found.len();
        outside.extend(bad.into_iter().map(|name| format!("{file}: {name}")));
    }
    assert!(exports >= 41, "found only {exports} exports");
    assert!(
        outside.is_empty(),
        "exports with code outside the panic boundary: {outside:?}"
    );
}

#[test]
fn the_boundary_check_catches_code_before_after_or_beside_the_call() {
    let export = |body: &str| {
        format!("#[no_mangle]\npub unsafe extern \"C\" fn llmproxy_x(out: *mut u32) -> u32 {{\n{body}\n}}\n")
    };
    let good = [
        "    boundary(|| 1)",
        "    boundary(|| {\n        *out = 1;\n        1\n    })",
        "    boundary_or(7, || match out.is_null() {\n        true => 0,\n        false => 1,\n    })",
    ];
    for body in good {
        let (found, outside) = exports_outside_the_boundary(&export(body));
        assert_eq!((found.len(), outside.len()), (1, 0), "{body}");
    }
    let bad = [
        "    *out = 0;\n    boundary(|| 1)",
        "    boundary(|| {\n        1\n    });\n    *out = 0",
        "    let v = boundary(|| 1);\n    v",
        "    guard(0, || 1)",
        "    boundary(|| 1);\n    *out = 1;\n    0",
    ];
    for body in bad {
        let (found, outside) = exports_outside_the_boundary(&export(body));
        assert_eq!((found.len(), outside.len()), (1, 1), "{body}");
    }
}

#[test]
#[cfg_attr(miri, ignore = "reads the source directory")]
fn every_file_of_src_ffi_is_scanned() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/ffi");
    for entry in std::fs::read_dir(dir).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name.ends_with(".rs") && name != "tests.rs" {
            assert!(
                SOURCES.iter().any(|(file, _)| *file == name),
                "src/ffi/{name} is not in SOURCES"
            );
        }
    }
}

#[test]
fn a_caught_panic_returns_the_return_type_s_panic_value() {
    assert_eq!(
        boundary(|| -> llmproxy_status { panic!("test") }),
        LLMPROXY_INTERNAL
    );
    assert!(!boundary(|| -> bool { panic!("test") }));
    assert_eq!(boundary(|| -> u32 { panic!("test") }), 0);
    assert_eq!(boundary(|| -> u64 { panic!("test") }), 0);
    assert!(boundary(|| -> *const c_char { panic!("test") }).is_null());
    boundary(|| -> () { panic!("test") });
    assert_eq!(boundary_or(500, || -> u32 { panic!("test") }), 500);
    assert_eq!(boundary(|| LLMPROXY_OK), LLMPROXY_OK);
}
