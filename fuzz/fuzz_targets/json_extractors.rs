//! The API's JSON request bodies through the real extractor (src/http/
//! extract.rs `Json<T>`, an axum `Request` and `FromRequest`) and the checks
//! each handler makes before its first side effect (src/http/fuzzing.rs).
//! Input: `<operation id>\n<content type, or ->\n<body>`. Never panics,
//! never a 5xx; every refusal carries a code and status that the OpenAPI
//! document lists for that operation.
#![no_main]

use std::collections::{HashMap, HashSet};
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use slate::http::fuzzing::{OPERATIONS, read_body};

/// `(status, code)` pairs each operation documents (`x-error-codes`).
static DOCUMENTED: LazyLock<HashMap<&'static str, HashSet<(u16, String)>>> = LazyLock::new(|| {
    let doc = slate::http::openapi::document();
    let mut by_op: HashMap<String, HashSet<(u16, String)>> = HashMap::new();
    for item in doc["paths"].as_object().expect("paths").values() {
        for op in item.as_object().expect("a path item").values() {
            let Some(id) = op["operationId"].as_str() else {
                continue;
            };
            let set = by_op.entry(id.to_owned()).or_default();
            for (status, r) in op["responses"].as_object().expect("responses") {
                for code in r["x-error-codes"].as_array().into_iter().flatten() {
                    let status: u16 = status.parse().expect("a numeric status");
                    set.insert((status, code.as_str().expect("a code").to_owned()));
                }
            }
        }
    }
    OPERATIONS
        .iter()
        .map(|op| {
            // A staff route, not in the document: it can answer only the JSON
            // extractor's errors, which `revoke_all_sessions` (no errors of
            // its own) documents like every operation with a JSON body.
            let documented_as = if *op == "start_impersonation" {
                "revoke_all_sessions"
            } else {
                op
            };
            let set = by_op
                .get(documented_as)
                .unwrap_or_else(|| panic!("{documented_as} is not in the document"))
                .clone();
            (*op, set)
        })
        .collect()
});

static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime")
});

fuzz_target!(|data: &[u8]| {
    let mut lines = data.splitn(3, |b| *b == b'\n');
    let op = lines.next().unwrap_or_default();
    let op = OPERATIONS
        .iter()
        .find(|o| o.as_bytes() == op)
        .copied()
        .unwrap_or_else(|| {
            OPERATIONS[op.first().map_or(0, |b| usize::from(*b)) % OPERATIONS.len()]
        });
    let content_type = match lines.next() {
        None | Some(b"-") => None,
        Some(ct) => Some(ct),
    };
    let body = lines.next().unwrap_or_default().to_vec();
    let documented = &DOCUMENTED[op];
    if let Err(e) = RUNTIME.block_on(read_body(op, content_type, body)) {
        let status = e.status().as_u16();
        assert!(status < 500, "{op}: {status} {}: {e:?}", e.code());
        assert!(
            documented.contains(&(status, e.code().to_owned())),
            "{op}: {status} {} is not documented",
            e.code()
        );
    }
});
