//! The stored document read in one pass with serde, straight into the fields the exporter uses:
//! no tree of the whole document (`serde_json::Value`) is built, and no key is allocated unless
//! it carries an escape. Works on JSON text (`serde_json::Deserializer`) and on a tree
//! (`&serde_json::Value`, itself a deserializer) alike, so both inputs follow one set of rules.
//!
//! Invariants, the same as a `Value` parse followed by the tree walk of `model`:
//! - every part of the text is checked, kept or not: syntax, nesting deeper than serde_json's
//!   128 levels, numbers beyond `f64` (`1e400`), escapes: [`Skip`] reads an ignored value with
//!   `deserialize_any`, as `Value` would (serde's `IgnoredAny` skips without checking);
//! - each key of a spelling pair (`nodeName`/`nodename`) has its own slot ([`Pair`]); the
//!   camelCase one wins when both are present, even when it is null, as `field` did;
//! - a value of the wrong kind is not an error while reading: its kind is kept ([`Shape`]) and
//!   the error is raised only for the spelling chosen, in the field order of `decode_fields`;
//! - a key seen twice keeps its last value (as `Value` does). PostgreSQL's jsonb and a BSON
//!   document mapped to a tree never hold a key twice.
//!
//! Text fields, enums and `metadata` values are read as [`Scalar`] (a string, null, a
//! boolean, a number, or the kind of what stood there instead); `version`, the booleans and the
//! parts of a timestamp as `Value`s (no allocation for a number or a boolean), so the checks and
//! messages of `model`'s field functions stay theirs.
//!
//! Strings are borrowed, not copied: every visitor takes `visit_borrowed_str`, which
//! serde_json calls for a string of JSON text (`from_str`) without escapes and for every string
//! of a `&Value` tree; only a string with an escape, which serde_json had to unescape into a
//! scratch buffer (`visit_str`), is copied into an owned `String`. The slots, and the
//! `HealthEvent` made from them, therefore live no longer than the document (`'de`).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

/// Any JSON value, checked and dropped.
pub struct Skip;

impl<'de> Deserialize<'de> for Skip {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Skip, D::Error> {
        deserializer.deserialize_any(SkipVisitor)
    }
}

struct SkipVisitor;

impl<'de> Visitor<'de> for SkipVisitor {
    type Value = Skip;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Skip, E> {
        Ok(Skip)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Skip, E> {
        Ok(Skip)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Skip, E> {
        Ok(Skip)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Skip, E> {
        Ok(Skip)
    }
    fn visit_str<E>(self, _: &str) -> Result<Skip, E> {
        Ok(Skip)
    }
    fn visit_unit<E>(self) -> Result<Skip, E> {
        Ok(Skip)
    }
    fn visit_none<E>(self) -> Result<Skip, E> {
        Ok(Skip)
    }
    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Skip, D::Error> {
        Skip::deserialize(deserializer)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Skip, A::Error> {
        while seq.next_element::<Skip>()?.is_some() {}
        Ok(Skip)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Skip, A::Error> {
        while map.next_entry::<Skip, Skip>()?.is_some() {}
        Ok(Skip)
    }
}

/// A map key, borrowed from the text unless it had to be unescaped.
pub enum Key<'de> {
    Borrowed(&'de str),
    Owned(String),
}

impl<'de> Key<'de> {
    pub fn as_str(&self) -> &str {
        match self {
            Key::Borrowed(text) => text,
            Key::Owned(text) => text,
        }
    }

    /// The key as kept text (no copy).
    pub fn into_cow(self) -> Cow<'de, str> {
        match self {
            Key::Borrowed(text) => Cow::Borrowed(text),
            Key::Owned(text) => Cow::Owned(text),
        }
    }
}

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Key<'de>, D::Error> {
        deserializer.deserialize_str(KeyVisitor)
    }
}

struct KeyVisitor;

impl<'de> Visitor<'de> for KeyVisitor {
    type Value = Key<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key")
    }
    fn visit_borrowed_str<E>(self, text: &'de str) -> Result<Key<'de>, E> {
        Ok(Key::Borrowed(text))
    }
    fn visit_str<E>(self, text: &str) -> Result<Key<'de>, E> {
        Ok(Key::Owned(text.to_string()))
    }
    fn visit_string<E>(self, text: String) -> Result<Key<'de>, E> {
        Ok(Key::Owned(text))
    }
}

/// A value read where an object or an array is expected: null, what `T` made of it, or the
/// kind it was instead ("a string", …, as `json_kind` names it).
#[derive(Debug)]
pub enum Shape<T> {
    Null,
    Found(T),
    Other(&'static str),
}

/// What an object or an array becomes. The defaults drain the value: `T` expects the other one.
pub trait Expected<'de>: Sized {
    /// `None`: `T` does not take an object (the map has been read to its end).
    fn from_map<A: MapAccess<'de>>(mut map: A) -> Result<Option<Self>, A::Error> {
        while map.next_entry::<Skip, Skip>()?.is_some() {}
        Ok(None)
    }
    /// `None`: `T` does not take an array (the array has been read to its end).
    fn from_seq<A: SeqAccess<'de>>(mut seq: A) -> Result<Option<Self>, A::Error> {
        while seq.next_element::<Skip>()?.is_some() {}
        Ok(None)
    }
}

impl<'de, T: Expected<'de>> Deserialize<'de> for Shape<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Shape<T>, D::Error> {
        deserializer.deserialize_any(ShapeVisitor(PhantomData))
    }
}

struct ShapeVisitor<T>(PhantomData<T>);

impl<'de, T: Expected<'de>> Visitor<'de> for ShapeVisitor<T> {
    type Value = Shape<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Shape<T>, E> {
        Ok(Shape::Other("a boolean"))
    }
    fn visit_i64<E>(self, _: i64) -> Result<Shape<T>, E> {
        Ok(Shape::Other("a number"))
    }
    fn visit_u64<E>(self, _: u64) -> Result<Shape<T>, E> {
        Ok(Shape::Other("a number"))
    }
    fn visit_f64<E>(self, _: f64) -> Result<Shape<T>, E> {
        Ok(Shape::Other("a number"))
    }
    fn visit_str<E>(self, _: &str) -> Result<Shape<T>, E> {
        Ok(Shape::Other("a string"))
    }
    fn visit_unit<E>(self) -> Result<Shape<T>, E> {
        Ok(Shape::Null)
    }
    fn visit_none<E>(self) -> Result<Shape<T>, E> {
        Ok(Shape::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Shape<T>, D::Error> {
        Shape::deserialize(deserializer)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Shape<T>, A::Error> {
        Ok(T::from_seq(seq)?.map_or(Shape::Other("an array"), Shape::Found))
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Shape<T>, A::Error> {
        Ok(T::from_map(map)?.map_or(Shape::Other("an object"), Shape::Found))
    }
}

/// `generatedTimestamp`: `{seconds, nanos}`, a string, null, or the kind it was instead.
#[derive(Debug)]
pub enum Time<'de> {
    Null,
    Parts(TimeParts),
    Text(Cow<'de, str>),
    Other(&'static str),
}

/// The parts of a `{seconds, nanos}` timestamp, each as read (other keys are skipped).
#[derive(Debug, Default)]
pub struct TimeParts {
    pub seconds: Option<Value>,
    pub nanos: Option<Value>,
}

impl<'de> Deserialize<'de> for Time<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Time<'de>, D::Error> {
        deserializer.deserialize_any(TimeVisitor)
    }
}

struct TimeVisitor;

impl<'de> Visitor<'de> for TimeVisitor {
    type Value = Time<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Time<'de>, E> {
        Ok(Time::Other("a boolean"))
    }
    fn visit_i64<E>(self, _: i64) -> Result<Time<'de>, E> {
        Ok(Time::Other("a number"))
    }
    fn visit_u64<E>(self, _: u64) -> Result<Time<'de>, E> {
        Ok(Time::Other("a number"))
    }
    fn visit_f64<E>(self, _: f64) -> Result<Time<'de>, E> {
        Ok(Time::Other("a number"))
    }
    fn visit_borrowed_str<E>(self, text: &'de str) -> Result<Time<'de>, E> {
        Ok(Time::Text(Cow::Borrowed(text)))
    }
    fn visit_str<E>(self, text: &str) -> Result<Time<'de>, E> {
        Ok(Time::Text(Cow::Owned(text.to_string())))
    }
    fn visit_string<E>(self, text: String) -> Result<Time<'de>, E> {
        Ok(Time::Text(Cow::Owned(text)))
    }
    fn visit_unit<E>(self) -> Result<Time<'de>, E> {
        Ok(Time::Null)
    }
    fn visit_none<E>(self) -> Result<Time<'de>, E> {
        Ok(Time::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Time<'de>, D::Error> {
        Time::deserialize(deserializer)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Time<'de>, A::Error> {
        Skip::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))?;
        Ok(Time::Other("an array"))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Time<'de>, A::Error> {
        let mut parts = TimeParts::default();
        while let Some(key) = map.next_key::<Key>()? {
            match key.as_str() {
                "seconds" => parts.seconds = Some(map.next_value()?),
                "nanos" => parts.nanos = Some(map.next_value()?),
                _ => {
                    map.next_value::<Skip>()?;
                }
            }
        }
        Ok(Time::Parts(parts))
    }
}

/// A value read where text or a scalar is expected (a text field, an enum, a `metadata`
/// value): null, a boolean, a number, a string (borrowed unless it had an escape), or the kind
/// it was instead (an array or an object, checked and dropped). A number is kept as a `Value`
/// would keep it.
#[derive(Debug)]
pub enum Scalar<'de> {
    Null,
    Bool(bool),
    Number(serde_json::Number),
    String(Cow<'de, str>),
    Other(&'static str),
}

impl Scalar<'_> {
    /// The kind of a value that is not a string ("null", "a boolean", …, as `json_kind`).
    pub fn kind(&self) -> &'static str {
        match self {
            Scalar::Null => "null",
            Scalar::Bool(_) => "a boolean",
            Scalar::Number(_) => "a number",
            Scalar::String(_) => "a string",
            Scalar::Other(kind) => kind,
        }
    }
}

impl<'de> Deserialize<'de> for Scalar<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Scalar<'de>, D::Error> {
        deserializer.deserialize_any(ScalarVisitor)
    }
}

struct ScalarVisitor;

impl<'de> Visitor<'de> for ScalarVisitor {
    type Value = Scalar<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, b: bool) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Bool(b))
    }
    fn visit_i64<E>(self, n: i64) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Number(n.into()))
    }
    fn visit_u64<E>(self, n: u64) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Number(n.into()))
    }
    fn visit_f64<E>(self, n: f64) -> Result<Scalar<'de>, E> {
        // As `Value` reads it: a float JSON cannot hold is null.
        Ok(serde_json::Number::from_f64(n).map_or(Scalar::Null, Scalar::Number))
    }
    fn visit_borrowed_str<E>(self, text: &'de str) -> Result<Scalar<'de>, E> {
        Ok(Scalar::String(Cow::Borrowed(text)))
    }
    fn visit_str<E>(self, text: &str) -> Result<Scalar<'de>, E> {
        Ok(Scalar::String(Cow::Owned(text.to_string())))
    }
    fn visit_string<E>(self, text: String) -> Result<Scalar<'de>, E> {
        Ok(Scalar::String(Cow::Owned(text)))
    }
    fn visit_unit<E>(self) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Null)
    }
    fn visit_none<E>(self) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Scalar<'de>, D::Error> {
        Scalar::deserialize(deserializer)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Scalar<'de>, A::Error> {
        Skip::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))?;
        Ok(Scalar::Other("an array"))
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Scalar<'de>, A::Error> {
        Skip::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
        Ok(Scalar::Other("an object"))
    }
}

/// The two spellings of one field: camelCase (Go's JSON) and lowercase (BSON).
#[derive(Debug)]
pub struct Pair<T> {
    pub camel: Option<T>,
    pub lower: Option<T>,
}

impl<T> Default for Pair<T> {
    fn default() -> Self {
        Pair {
            camel: None,
            lower: None,
        }
    }
}

impl<T> Pair<T> {
    /// The camelCase spelling when present (whatever its value), else the lowercase one.
    pub fn chosen(self) -> Option<T> {
        self.camel.or(self.lower)
    }
}

/// The top level: the health event (`healthevent`, else `healthEvent`) and the status.
#[derive(Default)]
pub struct Top<'de> {
    /// Boxed: the fields are a few KiB, moved through every layer of the visitors otherwise.
    pub event: Pair<Shape<Box<EventFields<'de>>>>,
    pub status: Option<Shape<Status<'de>>>,
}

impl<'de> Expected<'de> for Top<'de> {
    fn from_map<A: MapAccess<'de>>(mut map: A) -> Result<Option<Top<'de>>, A::Error> {
        let mut top = Top::default();
        while let Some(key) = map.next_key::<Key>()? {
            match key.as_str() {
                "healthevent" => top.event.camel = Some(map.next_value()?),
                "healthEvent" => top.event.lower = Some(map.next_value()?),
                "healtheventstatus" => top.status = Some(map.next_value()?),
                _ => {
                    map.next_value::<Skip>()?;
                }
            }
        }
        Ok(Some(top))
    }
}

/// `healthevent`'s fields, each spelling in its slot; unknown keys are skipped.
#[derive(Default)]
pub struct EventFields<'de> {
    pub version: Option<Value>,
    pub agent: Option<Scalar<'de>>,
    pub component_class: Pair<Scalar<'de>>,
    pub check_name: Pair<Scalar<'de>>,
    pub is_fatal: Pair<Value>,
    pub is_healthy: Pair<Value>,
    pub message: Option<Scalar<'de>>,
    pub recommended_action: Pair<Scalar<'de>>,
    pub error_code: Pair<Shape<Vec<Scalar<'de>>>>,
    pub entities_impacted: Pair<Shape<Vec<Shape<EntityFields<'de>>>>>,
    pub metadata: Option<Shape<Metadata<'de>>>,
    pub generated_timestamp: Pair<Time<'de>>,
    pub node_name: Pair<Scalar<'de>>,
    pub quarantine_overrides: Pair<Shape<Flags>>,
    pub drain_overrides: Pair<Shape<Flags>>,
    pub processing_strategy: Pair<Scalar<'de>>,
    pub custom_recommended_action: Pair<Scalar<'de>>,
}

impl<'de> Expected<'de> for EventFields<'de> {
    fn from_map<A: MapAccess<'de>>(mut map: A) -> Result<Option<EventFields<'de>>, A::Error> {
        let mut f = EventFields::default();
        while let Some(key) = map.next_key::<Key>()? {
            match key.as_str() {
                "version" => f.version = Some(map.next_value()?),
                "agent" => f.agent = Some(map.next_value()?),
                "componentClass" => f.component_class.camel = Some(map.next_value()?),
                "componentclass" => f.component_class.lower = Some(map.next_value()?),
                "checkName" => f.check_name.camel = Some(map.next_value()?),
                "checkname" => f.check_name.lower = Some(map.next_value()?),
                "isFatal" => f.is_fatal.camel = Some(map.next_value()?),
                "isfatal" => f.is_fatal.lower = Some(map.next_value()?),
                "isHealthy" => f.is_healthy.camel = Some(map.next_value()?),
                "ishealthy" => f.is_healthy.lower = Some(map.next_value()?),
                "message" => f.message = Some(map.next_value()?),
                "recommendedAction" => f.recommended_action.camel = Some(map.next_value()?),
                "recommendedaction" => f.recommended_action.lower = Some(map.next_value()?),
                "errorCode" => f.error_code.camel = Some(map.next_value()?),
                "errorcode" => f.error_code.lower = Some(map.next_value()?),
                "entitiesImpacted" => f.entities_impacted.camel = Some(map.next_value()?),
                "entitiesimpacted" => f.entities_impacted.lower = Some(map.next_value()?),
                "metadata" => f.metadata = Some(map.next_value()?),
                "generatedTimestamp" => f.generated_timestamp.camel = Some(map.next_value()?),
                "generatedtimestamp" => f.generated_timestamp.lower = Some(map.next_value()?),
                "nodeName" => f.node_name.camel = Some(map.next_value()?),
                "nodename" => f.node_name.lower = Some(map.next_value()?),
                "quarantineOverrides" => f.quarantine_overrides.camel = Some(map.next_value()?),
                "quarantineoverrides" => f.quarantine_overrides.lower = Some(map.next_value()?),
                "drainOverrides" => f.drain_overrides.camel = Some(map.next_value()?),
                "drainoverrides" => f.drain_overrides.lower = Some(map.next_value()?),
                "processingStrategy" => f.processing_strategy.camel = Some(map.next_value()?),
                "processingstrategy" => f.processing_strategy.lower = Some(map.next_value()?),
                "customRecommendedAction" => {
                    f.custom_recommended_action.camel = Some(map.next_value()?)
                }
                "customrecommendedaction" => {
                    f.custom_recommended_action.lower = Some(map.next_value()?)
                }
                _ => {
                    map.next_value::<Skip>()?;
                }
            }
        }
        Ok(Some(f))
    }
}

/// An array (`entitiesImpacted`, `errorCode`): its elements, each read as `T`.
impl<'de, T: Expected<'de>> Expected<'de> for Box<T> {
    fn from_map<A: MapAccess<'de>>(map: A) -> Result<Option<Box<T>>, A::Error> {
        Ok(T::from_map(map)?.map(Box::new))
    }
    fn from_seq<A: SeqAccess<'de>>(seq: A) -> Result<Option<Box<T>>, A::Error> {
        Ok(T::from_seq(seq)?.map(Box::new))
    }
}

impl<'de, T: Deserialize<'de>> Expected<'de> for Vec<T> {
    fn from_seq<A: SeqAccess<'de>>(mut seq: A) -> Result<Option<Vec<T>>, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(16));
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Some(items))
    }
}

/// One entity's fields, each spelling in its slot.
#[derive(Default)]
pub struct EntityFields<'de> {
    pub entity_type: Pair<Scalar<'de>>,
    pub entity_value: Pair<Scalar<'de>>,
}

impl<'de> Expected<'de> for EntityFields<'de> {
    fn from_map<A: MapAccess<'de>>(mut map: A) -> Result<Option<EntityFields<'de>>, A::Error> {
        let mut entity = EntityFields::default();
        while let Some(key) = map.next_key::<Key>()? {
            match key.as_str() {
                "entityType" => entity.entity_type.camel = Some(map.next_value()?),
                "entitytype" => entity.entity_type.lower = Some(map.next_value()?),
                "entityValue" => entity.entity_value.camel = Some(map.next_value()?),
                "entityvalue" => entity.entity_value.lower = Some(map.next_value()?),
                _ => {
                    map.next_value::<Skip>()?;
                }
            }
        }
        Ok(Some(entity))
    }
}

/// `quarantineOverrides`, `drainOverrides`: `force` and `skip` as read (other keys are skipped).
#[derive(Debug, Default)]
pub struct Flags {
    pub force: Option<Value>,
    pub skip: Option<Value>,
}

impl<'de> Expected<'de> for Flags {
    fn from_map<A: MapAccess<'de>>(mut map: A) -> Result<Option<Flags>, A::Error> {
        let mut flags = Flags::default();
        while let Some(key) = map.next_key::<Key>()? {
            match key.as_str() {
                "force" => flags.force = Some(map.next_value()?),
                "skip" => flags.skip = Some(map.next_value()?),
                _ => {
                    map.next_value::<Skip>()?;
                }
            }
        }
        Ok(Some(flags))
    }
}

/// `metadata`'s entries, keys and string values borrowed from the document.
pub type MetadataMap<'de> = BTreeMap<Cow<'de, str>, Cow<'de, str>>;

/// `metadata`: text values (numbers and booleans as their text), or the first key whose value
/// is not a scalar.
pub struct Metadata<'de>(pub Result<MetadataMap<'de>, NonScalar<'de>>);

/// A `metadata` entry whose value is not a string, number or boolean.
pub struct NonScalar<'de> {
    pub key: Cow<'de, str>,
    /// The value's JSON kind (`an object`, `an array`, `null`).
    pub kind: &'static str,
}

impl<'de> Expected<'de> for Metadata<'de> {
    fn from_map<A: MapAccess<'de>>(mut map: A) -> Result<Option<Metadata<'de>>, A::Error> {
        let mut entries = BTreeMap::new();
        let mut bad = None;
        while let Some(key) = map.next_key::<Key>()? {
            let key = key.into_cow();
            let text = match map.next_value()? {
                Scalar::String(text) => text,
                Scalar::Number(n) => Cow::Owned(n.to_string()),
                Scalar::Bool(b) => Cow::Borrowed(if b { "true" } else { "false" }),
                other => {
                    bad.get_or_insert(NonScalar {
                        key,
                        kind: other.kind(),
                    });
                    continue;
                }
            };
            entries.insert(key, text);
        }
        Ok(Some(Metadata(bad.map_or(Ok(entries), Err))))
    }
}

/// `healtheventstatus`: only its span ids are read (`spanids`, else `spanIds`).
#[derive(Default)]
pub struct Status<'de> {
    pub span_ids: Pair<Shape<SpanIds<'de>>>,
}

impl<'de> Expected<'de> for Status<'de> {
    fn from_map<A: MapAccess<'de>>(mut map: A) -> Result<Option<Status<'de>>, A::Error> {
        let mut status = Status::default();
        while let Some(key) = map.next_key::<Key>()? {
            match key.as_str() {
                "spanids" => status.span_ids.camel = Some(map.next_value()?),
                "spanIds" => status.span_ids.lower = Some(map.next_value()?),
                _ => {
                    map.next_value::<Skip>()?;
                }
            }
        }
        Ok(Some(status))
    }
}

/// Of the span ids recorded by each component, in document order, only valid W3C span ids
/// (16 hex digits, not all zero) count: the first one, and the first whose component names a
/// platform connector.
#[derive(Default)]
pub struct SpanIds<'de> {
    pub first: Option<Cow<'de, str>>,
    pub platform_connector: Option<Cow<'de, str>>,
}

impl<'de> Expected<'de> for SpanIds<'de> {
    fn from_map<A: MapAccess<'de>>(mut map: A) -> Result<Option<SpanIds<'de>>, A::Error> {
        let mut ids = SpanIds::default();
        while let Some(component) = map.next_key::<Key>()? {
            let Scalar::String(span) = map.next_value()? else {
                continue;
            };
            if !super::is_trace_hex(&span, 16) {
                continue;
            }
            if ids.platform_connector.is_none() && component.as_str().contains("platform-connector")
            {
                ids.platform_connector = Some(span.clone());
            }
            ids.first.get_or_insert(span);
        }
        Ok(Some(ids))
    }
}
