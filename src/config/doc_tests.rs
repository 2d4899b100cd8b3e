//! docs/configuration.md checked against the config structs: every key `raw` accepts has a row
//! in the doc's key reference with the right type, every row names a key `raw` accepts, and the
//! doc's full example parses and uses every key.
//!
//! The keys come from tracing `RawConfig`'s own `Deserialize` impl with a recording deserializer
//! (`Tracer`, below), not from a hand-kept list, so a field added to `raw.rs` without a row in the
//! doc fails here. Why not the serde-reflection crate: its tracer feeds every struct to the
//! visitor as a sequence, and `toml::Spanned`, which wraps most values in `raw`, accepts only a
//! map carrying its private field names, so tracing stops at the first `Spanned`; it also keys
//! what it finds by type name, which every `Spanned<…>` shares. The tracer here handles exactly
//! the shapes `raw` uses and fails loudly on any other.
//!
//! Key paths: a struct field is `parent.field`, an element of an array is `parent[]` (so
//! `agents[].name`), an entry of a map keyed by a name the operator chooses is `parent.NAME`
//! (so `policies.NAME.allow`, `dns.hosts.NAME`).

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};

use serde::de::value::{BorrowedStrDeserializer, Error};
use serde::de::{self, DeserializeSeed, IntoDeserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use super::raw::RawConfig;

const DOC: &str = include_str!("../../docs/configuration.md");
const DOC_PATH: &str = "docs/configuration.md";
/// The heading of the key reference table.
const KEYS_HEADING: &str = "## Keys";
/// The heading whose first `toml` block is the full example.
const EXAMPLE_HEADING: &str = "## A full example";
/// The path segment of a map entry.
const NAME: &str = "NAME";

/// What a value is, in TOML terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    String,
    Integer,
    /// `f64`: TOML accepts an integer or a float.
    Number,
    Boolean,
    Array,
    Table,
    /// A string or an array of strings (`cluster.redis`: one server, or cluster nodes).
    StringOrStrings,
}

/// Every key path `RawConfig` accepts, with its type as the doc writes it.
fn traced_keys() -> BTreeMap<String, String> {
    let kinds = RefCell::new(BTreeMap::new());
    let tracer = Tracer {
        path: Some(String::new()),
        kinds: &kinds,
    };
    if let Err(e) = RawConfig::deserialize(tracer) {
        panic!("tracing RawConfig failed: {e}");
    }
    let kinds = kinds.into_inner();
    kinds
        .keys()
        .filter(|path| !path.ends_with("[]"))
        .map(|path| (path.clone(), type_name(&kinds, path)))
        .collect()
}

/// The doc's word for the type at `path`: `string`, `array of strings`, `array of tables`, ….
fn type_name(kinds: &BTreeMap<String, Kind>, path: &str) -> String {
    match kinds.get(path) {
        Some(Kind::String) => "string".into(),
        Some(Kind::Integer) => "integer".into(),
        Some(Kind::Number) => "number".into(),
        Some(Kind::Boolean) => "boolean".into(),
        Some(Kind::Table) => "table".into(),
        Some(Kind::StringOrStrings) => "string or array of strings".into(),
        Some(Kind::Array) => format!("array of {}s", type_name(kinds, &format!("{path}[]"))),
        None => panic!("no kind traced for {path}"),
    }
}

/// The rows of the key reference: key → type cell.
fn documented_keys() -> BTreeMap<String, String> {
    let section = section(KEYS_HEADING);
    let mut rows = BTreeMap::new();
    for line in section.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.split(" | ").collect();
        let key = cells[0]
            .strip_prefix("| `")
            .and_then(|k| k.strip_suffix('`'))
            .unwrap_or_else(|| panic!("{DOC_PATH}: a row's first cell is one `key`: {line}"));
        assert!(
            !key.contains('`') && cells.len() >= 4,
            "{DOC_PATH}: rows read | `key` | type | default | meaning |: {line}"
        );
        let previous = rows.insert(key.to_owned(), cells[1].to_owned());
        assert!(previous.is_none(), "{DOC_PATH}: `{key}` has two rows");
    }
    rows
}

/// The text from `heading` to the next heading of the same level.
fn section(heading: &str) -> &'static str {
    let start = DOC
        .find(&format!("\n{heading}\n"))
        .unwrap_or_else(|| panic!("{DOC_PATH} lacks the heading `{heading}`"));
    let body = &DOC[start + heading.len() + 2..];
    let end = body.find("\n## ").unwrap_or(body.len());
    &body[..end]
}

/// The first ```toml block of the example section.
fn example() -> &'static str {
    let section = section(EXAMPLE_HEADING);
    let start = section
        .find("```toml\n")
        .unwrap_or_else(|| panic!("{DOC_PATH}: `{EXAMPLE_HEADING}` has no ```toml block"));
    let block = &section[start + "```toml\n".len()..];
    &block[..block.find("```").unwrap_or(block.len())]
}

/// The key paths a TOML table uses, in the tracer's spelling: a key that is not a field at its
/// place is an entry of a map, `NAME`.
fn used_keys(
    table: &toml::Table,
    parent: &str,
    known: &BTreeMap<String, String>,
    out: &mut BTreeSet<String>,
) {
    for (k, v) in table {
        let field = join(parent, k);
        let path = if known.contains_key(&field) {
            field
        } else {
            join(parent, NAME)
        };
        match v {
            toml::Value::Table(t) => used_keys(t, &path, known, out),
            toml::Value::Array(items) => {
                for item in items {
                    if let toml::Value::Table(t) = item {
                        used_keys(t, &format!("{path}[]"), known, out);
                    }
                }
            }
            _ => {}
        }
        out.insert(path);
    }
}

/// True for the visitor of `raw::Nodes`, recognised by what it expects.
fn visitor_expects_nodes<'de, V: Visitor<'de>>(visitor: &V) -> bool {
    let expected = format!("{}", visitor as &dyn de::Expected);
    expected == super::raw::NODES_EXPECTED
}

fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_owned()
    } else {
        format!("{parent}.{key}")
    }
}

#[test]
fn every_config_key_is_documented_with_its_type() {
    let traced = traced_keys();
    let documented = documented_keys();
    let missing: Vec<&String> = traced
        .keys()
        .filter(|k| !documented.contains_key(*k))
        .collect();
    assert!(
        missing.is_empty(),
        "{DOC_PATH} `{KEYS_HEADING}` lacks a row for: {missing:?}"
    );
    for (key, ty) in &traced {
        let cell = &documented[key];
        assert!(
            cell.starts_with(ty.as_str()),
            "{DOC_PATH}: `{key}` is a {ty}, the doc says `{cell}`"
        );
    }
}

#[test]
fn every_documented_key_exists() {
    let traced = traced_keys();
    let unknown: Vec<String> = documented_keys()
        .into_keys()
        .filter(|k| !traced.contains_key(k))
        .collect();
    assert!(
        unknown.is_empty(),
        "{DOC_PATH} documents keys the config does not have: {unknown:?}"
    );
}

#[test]
fn the_full_example_parses_and_uses_every_key() {
    let src = example();
    if let Err(e) = toml::from_str::<RawConfig>(src) {
        panic!("{DOC_PATH}: the full example does not parse: {e}");
    }
    let table: toml::Table = toml::from_str(src).unwrap_or_else(|e| panic!("{e}"));
    let traced = traced_keys();
    let mut used = BTreeSet::new();
    used_keys(&table, "", &traced, &mut used);
    let unused: Vec<&String> = traced.keys().filter(|k| !used.contains(*k)).collect();
    assert!(
        unused.is_empty(),
        "{DOC_PATH}: the full example does not use {unused:?}"
    );
}

/// The tracer itself: it must see through `Spanned`, options, arrays and maps.
#[test]
fn tracer_sees_through_spanned_options_arrays_and_maps() {
    let traced = traced_keys();
    for (key, ty) in [
        ("server", "table"),
        ("server.listen", "string"),
        ("server.max_connections", "integer"),
        ("sni.ports", "array of integers"),
        ("sni.require", "boolean"),
        ("limits.requests_per_second", "number"),
        ("agents", "array of tables"),
        ("agents[].source_cidrs", "array of strings"),
        ("dns.hosts.NAME", "array of strings"),
        ("policies.NAME", "table"),
        ("policies.NAME.limits.burst", "integer"),
    ] {
        assert_eq!(traced.get(key).map(String::as_str), Some(ty), "{key}");
    }
    assert!(!traced.keys().any(|k| k.contains('$')), "{traced:?}");
}

// === Tracer ===

/// A deserializer that produces one of everything and records, per key path, the kind of value
/// asked for. `path: None` traces without recording (a map's key).
struct Tracer<'a> {
    path: Option<String>,
    kinds: &'a RefCell<BTreeMap<String, Kind>>,
}

impl<'a> Tracer<'a> {
    fn record(&self, kind: Kind) {
        if let Some(path) = self.path.as_ref().filter(|p| !p.is_empty()) {
            self.kinds.borrow_mut().insert(path.clone(), kind);
        }
    }

    fn at(&self, path: Option<String>) -> Tracer<'a> {
        Tracer {
            path,
            kinds: self.kinds,
        }
    }

    fn field(&self, name: &str) -> Tracer<'a> {
        self.at(self.path.as_deref().map(|p| join(p, name)))
    }

    fn element(&self) -> Tracer<'a> {
        self.at(self.path.as_deref().map(|p| format!("{p}[]")))
    }
}

impl<'de> de::Deserializer<'de> for Tracer<'_> {
    type Error = Error;

    /// Only `raw::Nodes` (a string or an array of strings) asks for any type.
    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        if visitor_expects_nodes(&visitor) {
            self.record(Kind::StringOrStrings);
            return visitor.visit_str(NAME);
        }
        Err(de::Error::custom(format!(
            "{:?}: a type the doc tracer does not know; teach it in src/config/doc_tests.rs",
            self.path
        )))
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.record(Kind::Boolean);
        visitor.visit_bool(false)
    }

    fn deserialize_i64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.record(Kind::Integer);
        visitor.visit_i64(0)
    }

    fn deserialize_f64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.record(Kind::Number);
        visitor.visit_f64(0.0)
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.record(Kind::String);
        visitor.visit_str(NAME)
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_str(visitor)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_some(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.record(Kind::Array);
        visitor.visit_seq(OneElement(Some(self.element())))
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.record(Kind::Table);
        visitor.visit_map(OneEntry {
            key: Some(self.at(None)),
            value: Some(self.field(NAME)),
        })
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        // `$__…` names mark a format's private wrapper (toml's `Spanned`): its value field
        // carries the value at this same path; its other fields are byte offsets.
        let wrapper = name.starts_with("$__");
        if !wrapper {
            self.record(Kind::Table);
        }
        visitor.visit_map(Fields {
            tracer: self,
            fields: fields.iter(),
            current: "",
            wrapper,
        })
    }

    serde::forward_to_deserialize_any! {
        i8 i16 i32 i128 u8 u16 u32 u64 u128 f32 char bytes byte_buf unit unit_struct
        newtype_struct tuple tuple_struct enum identifier ignored_any
    }
}

/// A struct's fields, each once, in declaration order.
struct Fields<'a> {
    tracer: Tracer<'a>,
    fields: std::slice::Iter<'static, &'static str>,
    current: &'static str,
    wrapper: bool,
}

impl<'de> MapAccess<'de> for Fields<'_> {
    type Error = Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Error> {
        let Some(&field) = self.fields.next() else {
            return Ok(None);
        };
        self.current = field;
        seed.deserialize(BorrowedStrDeserializer::new(field))
            .map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
        match self.wrapper {
            true if self.current.ends_with("value") => {
                seed.deserialize(self.tracer.at(self.tracer.path.clone()))
            }
            true => seed.deserialize(0u64.into_deserializer()),
            false => seed.deserialize(self.tracer.field(self.current)),
        }
    }
}

/// A map with one entry: a key nobody records, and the value at `parent.NAME`.
struct OneEntry<'a> {
    key: Option<Tracer<'a>>,
    value: Option<Tracer<'a>>,
}

impl<'de> MapAccess<'de> for OneEntry<'_> {
    type Error = Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Error> {
        self.key.take().map(|t| seed.deserialize(t)).transpose()
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
        match self.value.take() {
            Some(t) => seed.deserialize(t),
            None => Err(de::Error::custom("value asked for twice")),
        }
    }
}

/// An array with one element.
struct OneElement<'a>(Option<Tracer<'a>>);

impl<'de> SeqAccess<'de> for OneElement<'_> {
    type Error = Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Error> {
        self.0.take().map(|t| seed.deserialize(t)).transpose()
    }
}
