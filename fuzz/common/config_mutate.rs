//! Structure-aware config fuzzing: start from a valid config (tests/fixtures/config/valid,
//! config/examples), apply a few typed mutations to its TOML tree (replace, delete, add a key,
//! push to an array) with values drawn from a dictionary of near-valid ones, render, load.
//! Same checks as the `config` target; mostly reaches validation rather than the TOML parser.
use arbitrary::Arbitrary;
use toml::{Table, Value};

use crate::config_check;

const BASES: [&str; 3] = [
    include_str!("../../tests/fixtures/config/valid/full.toml"),
    include_str!("../../config/examples/minimal.toml"),
    include_str!("../../config/examples/strict.toml"),
];

/// Values near the edge of what the loader accepts.
const WORDS: [&str; 40] = [
    "127.0.0.1:3128",
    "[::1]:0",
    "0.0.0.0:3128",
    "10.0.0.0/8",
    "10.1.2.3/8",
    "fd00::/8",
    "::ffff:0:0/96",
    "169.254.169.254/32",
    "0.0.0.0/0",
    "::/0",
    "api.example.com",
    "*.example.com",
    "*.com",
    "*",
    "API.Example.com",
    "example.com.",
    "b\u{fc}cher.example:8443",
    "xn--bcher-kva.example",
    "203.0.113.7",
    "[2001:db8::1]:443",
    "[::ffff:1.2.3.4]",
    "example.com:0",
    "example.com:65536",
    "0x7f.1",
    "1s",
    "0s",
    "500ms",
    "25h",
    "2 days",
    "enforce",
    "report",
    "Report",
    "llm-apis",
    "empty",
    "missing",
    "agent name",
    "token",
    "127.0.0.53",
    "",
    "\u{1F980}",
];
const KEYS: [&str; 16] = [
    "listen",
    "admin_listen",
    "mode",
    "max_connections",
    "allow",
    "allow_cidrs",
    "deny_cidrs",
    "limits",
    "burst",
    "requests_per_second",
    "max_request_header_bytes",
    "source_cidrs",
    "token_file",
    "policy",
    "nameservers",
    "hosts",
];

#[derive(Arbitrary, Debug)]
enum Val {
    Word(u8),
    Text(String),
    Int(i64),
    SmallInt(u8),
    Float(f64),
    Bool(bool),
    Words(Vec<u8>),
    Table(u8, Box<Val>),
}

#[derive(Arbitrary, Debug)]
enum Op {
    Set(Vec<u8>, Val),
    Delete(Vec<u8>),
    Add(Vec<u8>, u8, Val),
    Push(Vec<u8>, Val),
}

/// One fuzz case: which base config, and the mutations to apply to it.
#[derive(Arbitrary, Debug)]
pub(crate) struct Input {
    base: u8,
    ops: Vec<Op>,
}

/// Mutate, render and load one input; panics on a broken invariant.
pub(crate) fn run(input: &Input) {
    let base = BASES[usize::from(input.base) % BASES.len()];
    let Ok(mut doc) = base.parse::<Table>() else {
        panic!("base config is not TOML");
    };
    for op in input.ops.iter().take(6) {
        apply(&mut doc, op);
    }
    let Ok(src) = toml::to_string(&doc) else {
        return; // e.g. a NaN float; nothing a file could say
    };
    config_check::load_and_check(&src);
}

fn value(v: &Val) -> Value {
    match v {
        Val::Word(i) => Value::String(WORDS[usize::from(*i) % WORDS.len()].into()),
        Val::Text(s) => Value::String(s.clone()),
        Val::Int(n) => Value::Integer(*n),
        Val::SmallInt(n) => Value::Integer(i64::from(*n) * 1024 - 1),
        Val::Float(f) => Value::Float(*f),
        Val::Bool(b) => Value::Boolean(*b),
        Val::Words(ix) => Value::Array(
            ix.iter()
                .take(8)
                .map(|i| Value::String(WORDS[usize::from(*i) % WORDS.len()].into()))
                .collect(),
        ),
        Val::Table(k, inner) => {
            let mut t = Table::new();
            t.insert(KEYS[usize::from(*k) % KEYS.len()].into(), value(inner));
            Value::Table(t)
        }
    }
}

/// Walk down by `path` (each byte picks a child) to a table or array; `None` if a leaf is hit
/// first. Returns the container reached.
fn walk<'a>(doc: &'a mut Value, path: &[u8]) -> &'a mut Value {
    let mut cur = doc;
    for &step in path.iter().take(5) {
        let has_children = match &*cur {
            Value::Table(t) => t.values().any(|v| v.is_table() || v.is_array()),
            Value::Array(a) => a.iter().any(|v| v.is_table() || v.is_array()),
            _ => false,
        };
        if !has_children {
            break;
        }
        cur = match cur {
            Value::Table(t) => {
                let keys: Vec<String> = t
                    .iter()
                    .filter(|(_, v)| v.is_table() || v.is_array())
                    .map(|(k, _)| k.clone())
                    .collect();
                let k = &keys[usize::from(step) % keys.len()];
                t.get_mut(k).expect("key listed above")
            }
            Value::Array(a) => {
                let idx: Vec<usize> = (0..a.len())
                    .filter(|&i| a[i].is_table() || a[i].is_array())
                    .collect();
                &mut a[idx[usize::from(step) % idx.len()]]
            }
            _ => unreachable!("checked above"),
        };
    }
    cur
}

fn apply(doc: &mut Table, op: &Op) {
    let mut root = Value::Table(std::mem::take(doc));
    match op {
        Op::Set(path, _) | Op::Delete(path) => {
            let new = match op {
                Op::Set(_, v) => Some(value(v)),
                _ => None,
            };
            let pick = path.last().copied().unwrap_or(0);
            let container = walk(&mut root, path.split_last().map_or(&[], |(_, p)| p));
            match container {
                Value::Table(t) if !t.is_empty() => {
                    let k = t
                        .keys()
                        .nth(usize::from(pick) % t.len())
                        .cloned()
                        .expect("non-empty");
                    match new {
                        Some(v) => {
                            t.insert(k, v);
                        }
                        None => {
                            t.remove(&k);
                        }
                    }
                }
                Value::Array(a) if !a.is_empty() => {
                    let i = usize::from(pick) % a.len();
                    match new {
                        Some(v) => a[i] = v,
                        None => {
                            a.remove(i);
                        }
                    }
                }
                _ => {}
            }
        }
        Op::Add(path, k, v) => {
            if let Value::Table(t) = walk(&mut root, path) {
                t.insert(KEYS[usize::from(*k) % KEYS.len()].into(), value(v));
            }
        }
        Op::Push(path, v) => {
            if let Value::Array(a) = walk(&mut root, path) {
                a.push(value(v));
            }
        }
    }
    if let Value::Table(t) = root {
        *doc = t;
    }
}
