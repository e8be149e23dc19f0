//! Routing as configuration: which Kafka topics become which notifications, for whom.
//!
//! A route names a topic, how its records are decoded (a protobuf message type from the
//! contract crate's descriptors, which also reads proto3 JSON records, or plain JSON), where
//! the recipient user id(s) sit and/or which channels it publishes to (name templates such as
//! `order:{order_id}`), an optional filter, the notification `type`, and which fields go into
//! `data`. Two routes are built in (order status changes; moderation results to the
//! reporter and, when the target was removed, to its owner); a TOML file adds more without
//! code. Every route is checked against the message descriptors at start, so a typo in a field
//! path stops the process with one line instead of sending records to the DLQ at run time.

use std::collections::BTreeMap;
use std::path::Path;

use prost_reflect::{
    DescriptorPool, DynamicMessage, Kind, MessageDescriptor, ReflectMessage, Value as PValue,
};
use serde::Deserialize;
use serde_json::{Map, Value};

/// How a topic's record values are encoded.
#[derive(Debug, Clone)]
pub enum Format {
    /// A protobuf message (or its proto3 JSON form, by `content-type: application/json`).
    Protobuf(MessageDescriptor),
    /// Any JSON object.
    Json,
}

/// A condition on one field.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Filter {
    /// Field path (`a.b.c`).
    pub field: String,
    /// The field's value (as text, enums without their prefix) must be one of these.
    #[serde(rename = "in")]
    pub one_of: Vec<String>,
}

/// One route as written in the routes file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    /// A name for logs, metrics-free; also scopes idempotency keys.
    pub name: String,
    /// Kafka topic.
    pub topic: String,
    /// `"json"` or a fully qualified protobuf message name.
    pub message: String,
    /// Notification type (never `hub.*`).
    #[serde(rename = "type")]
    pub kind: String,
    /// Field paths holding recipient user ids (a string, or a list of strings).
    #[serde(default)]
    pub recipients: Vec<String>,
    /// Channel name templates: text with field paths in braces, e.g. `order:{order_id}`.
    #[serde(default)]
    pub channels: Vec<String>,
    /// Field path of the event id that deduplicates redeliveries.
    #[serde(default = "default_event_id")]
    pub event_id: String,
    /// Only records matching every filter become notifications.
    #[serde(default)]
    pub filter: Vec<Filter>,
    /// `data` key → field path.
    #[serde(default)]
    pub data: BTreeMap<String, String>,
    /// `data` key → constant string.
    #[serde(default)]
    pub constants: BTreeMap<String, String>,
}

fn default_event_id() -> String {
    "event_id".to_owned()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RoutesFile {
    #[serde(default, rename = "route")]
    routes: Vec<RouteSpec>,
}

/// A validated route.
#[derive(Debug, Clone)]
pub struct Route {
    /// The spec it came from.
    pub spec: RouteSpec,
    /// Decoder.
    pub format: Format,
    /// The spec's channel templates, parsed.
    pub channels: Vec<ChannelTemplate>,
}

/// One piece of a channel name template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    /// Text taken as it is.
    Text(String),
    /// A field path whose value (as text) goes here.
    Field(String),
}

/// A channel name made from a record: `order:{order_id}` → `order:o-123`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelTemplate {
    source: String,
    pieces: Vec<Piece>,
}

impl ChannelTemplate {
    /// Parses `text`: literal parts must be channel characters, `{path}` names a field.
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = |what: String| format!("channel template {text:?}: {what}");
        let mut pieces = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            match rest.find(['{', '}']) {
                Some(i) if rest[i..].starts_with('}') => {
                    return Err(bad("a '}' without its '{'".to_owned()));
                }
                Some(i) => {
                    if i > 0 {
                        pieces.push(Piece::Text(rest[..i].to_owned()));
                    }
                    let after = &rest[i + 1..];
                    let end = after
                        .find(['{', '}'])
                        .filter(|&j| after[j..].starts_with('}'))
                        .ok_or_else(|| bad("a '{' without its '}'".to_owned()))?;
                    let path = after[..end].trim();
                    if path.is_empty() || path.split('.').any(str::is_empty) {
                        return Err(bad(format!("{{{}}} is not a field path", &after[..end])));
                    }
                    pieces.push(Piece::Field(path.to_owned()));
                    rest = &after[end + 1..];
                }
                None => {
                    pieces.push(Piece::Text(rest.to_owned()));
                    rest = "";
                }
            }
        }
        if !pieces.iter().any(|p| matches!(p, Piece::Field(_))) {
            // A fixed channel is allowed: every record of the topic goes to it.
            crate::envelope::check_channel(text).map_err(|e| bad(e.to_owned()))?;
        }
        for piece in &pieces {
            if let Piece::Text(t) = piece
                && let Some(c) = t.chars().find(|&c| !crate::envelope::is_channel_char(c))
            {
                return Err(bad(format!(
                    "{c:?} cannot be in a channel name ([A-Za-z0-9_.:@/-])"
                )));
            }
        }
        Ok(Self {
            source: text.to_owned(),
            pieces,
        })
    }

    /// The field paths the template reads.
    pub fn fields(&self) -> impl Iterator<Item = &String> {
        self.pieces.iter().filter_map(|p| match p {
            Piece::Field(path) => Some(path),
            Piece::Text(_) => None,
        })
    }

    /// The channel name for `doc`; a missing or empty field, or a name the hub would refuse,
    /// makes the record unroutable.
    fn render(&self, doc: &Value) -> Result<String, RouteError> {
        let mut name = String::new();
        for piece in &self.pieces {
            match piece {
                Piece::Text(t) => name.push_str(t),
                Piece::Field(path) => {
                    let value = get(doc, path)
                        .and_then(as_text)
                        .filter(|v| !v.is_empty())
                        .ok_or_else(|| {
                            RouteError::Unroutable(format!(
                                "no {path} for channel {:?}",
                                self.source
                            ))
                        })?;
                    name.push_str(&value);
                }
            }
        }
        crate::envelope::check_channel(&name)
            .map_err(|e| RouteError::Unroutable(format!("channel {name:?}: {e}")))?;
        Ok(name)
    }
}

/// Who a routed notification goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recipient {
    /// A user's personal stream.
    User(String),
    /// A channel.
    Channel(String),
}

/// One notification a record produces.
#[derive(Debug, Clone, PartialEq)]
pub struct Routed {
    /// Recipient: a user or a channel.
    pub to: Recipient,
    /// Notification type.
    pub kind: String,
    /// Payload.
    pub data: Value,
    /// Idempotency key (route name + event id): a redelivered record publishes nothing new.
    pub idempotency_key: String,
}

/// Why a record cannot become notifications (it goes to the DLQ with this reason).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// The value could not be decoded.
    #[error("undecodable: {0}")]
    Decode(String),
    /// A recipient or the event id is missing, empty or not a valid user id.
    #[error("unroutable: {0}")]
    Unroutable(String),
    /// The record is larger than `HUB_INGEST_MAX_RECORD_BYTES`.
    #[error("too large: {0}")]
    TooLarge(String),
    /// The backplane refused the notification for good.
    #[error("refused: {0}")]
    Refused(String),
    /// Processing the record panicked (a bug): it is kept in the DLQ for a replay.
    #[error("internal error: {0}")]
    Internal(String),
}

/// A bad routes file or route; `Display` is the one line printed at start.
#[derive(Debug, thiserror::Error)]
#[error("config: HUB_INGEST_ROUTES: {0}")]
pub struct RoutesError(pub String);

/// All routes, by topic.
#[derive(Debug, Clone, Default)]
pub struct Routes {
    routes: Vec<Route>,
}

/// The two routes every hub has.
pub fn builtin() -> Vec<RouteSpec> {
    let map = |pairs: &[(&str, &str)]| {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect::<BTreeMap<_, _>>()
    };
    let moderation_data = map(&[
        ("report_id", "report_id"),
        ("target_type", "target_type"),
        ("target_id", "target_id"),
        ("decision", "decision"),
    ]);
    vec![
        RouteSpec {
            name: "order-status".to_owned(),
            topic: "order.status.changed".to_owned(),
            message: "notifications.orders.v1.OrderStatusChanged".to_owned(),
            kind: "order.status".to_owned(),
            recipients: vec!["user_id".to_owned()],
            // Everyone following the order (its page, a support agent) as well as its owner.
            channels: vec!["order:{order_id}".to_owned()],
            event_id: default_event_id(),
            filter: Vec::new(),
            data: map(&[
                ("order_id", "order_id"),
                ("status", "status"),
                ("previous_status", "previous_status"),
            ]),
            constants: BTreeMap::new(),
        },
        RouteSpec {
            name: "moderation-reporter".to_owned(),
            topic: "moderation.results".to_owned(),
            message: "notifications.moderation.v1.ModerationResult".to_owned(),
            kind: "moderation.result".to_owned(),
            recipients: vec!["reporter_id".to_owned()],
            channels: Vec::new(),
            event_id: default_event_id(),
            filter: Vec::new(),
            data: moderation_data.clone(),
            constants: map(&[("role", "reporter")]),
        },
        RouteSpec {
            name: "moderation-owner".to_owned(),
            topic: "moderation.results".to_owned(),
            message: "notifications.moderation.v1.ModerationResult".to_owned(),
            kind: "moderation.result".to_owned(),
            recipients: vec!["target_owner_id".to_owned()],
            channels: Vec::new(),
            event_id: default_event_id(),
            filter: vec![Filter {
                field: "decision".to_owned(),
                one_of: vec!["REMOVED".to_owned()],
            }],
            data: moderation_data,
            constants: map(&[("role", "owner")]),
        },
    ]
}

impl Routes {
    /// The built-in routes (unless `builtin` is false) plus those of `file`, validated against
    /// `pool`.
    pub fn load(
        pool: &DescriptorPool,
        file: Option<&Path>,
        builtin: bool,
    ) -> Result<Self, RoutesError> {
        let text = match file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| RoutesError(format!("cannot read {}: {e}", path.display())))?,
            ),
            None => None,
        };
        Self::parse(
            pool,
            text.as_deref(),
            file.unwrap_or(Path::new("-")),
            builtin,
        )
    }

    /// As [`Routes::load`], with the routes file's text already read (`origin` names it in
    /// errors).
    pub fn parse(
        pool: &DescriptorPool,
        text: Option<&str>,
        origin: &Path,
        builtin: bool,
    ) -> Result<Self, RoutesError> {
        let mut specs = if builtin { self::builtin() } else { Vec::new() };
        if let Some(text) = text {
            let parsed: RoutesFile =
                toml::from_str(text).map_err(|e| RoutesError(toml_error(origin, text, &e)))?;
            specs.extend(parsed.routes);
        }
        Self::from_specs(pool, specs)
    }

    /// Validates specs.
    pub fn from_specs(pool: &DescriptorPool, specs: Vec<RouteSpec>) -> Result<Self, RoutesError> {
        let mut routes = Vec::with_capacity(specs.len());
        let mut names = std::collections::HashSet::new();
        for spec in specs {
            let bad = |what: String| RoutesError(format!("route {:?}: {what}", spec.name));
            if spec.name.is_empty() || !names.insert(spec.name.clone()) {
                return Err(bad("name must be non-empty and unique".to_owned()));
            }
            if spec.topic.is_empty() {
                return Err(bad("topic must not be empty".to_owned()));
            }
            if spec.kind.is_empty() || spec.kind.starts_with("hub.") {
                return Err(bad(
                    "type must be non-empty and not start with \"hub.\"".to_owned()
                ));
            }
            if spec.recipients.is_empty() && spec.channels.is_empty() {
                return Err(bad(
                    "recipients or channels must name at least one field or channel".to_owned(),
                ));
            }
            let channels = spec
                .channels
                .iter()
                .map(|t| ChannelTemplate::parse(t))
                .collect::<Result<Vec<_>, _>>()
                .map_err(&bad)?;
            let format = if spec.message == "json" {
                Format::Json
            } else {
                let desc = pool
                    .get_message_by_name(&spec.message)
                    .ok_or_else(|| bad(format!("unknown message type {:?}", spec.message)))?;
                let paths = spec
                    .recipients
                    .iter()
                    .chain(channels.iter().flat_map(ChannelTemplate::fields))
                    .chain(std::iter::once(&spec.event_id))
                    .chain(spec.filter.iter().map(|f| &f.field))
                    .chain(spec.data.values());
                for path in paths {
                    check_path(&desc, path).map_err(&bad)?;
                }
                Format::Protobuf(desc)
            };
            routes.push(Route {
                spec,
                format,
                channels,
            });
        }
        Ok(Routes { routes })
    }

    /// Every topic some route reads.
    pub fn topics(&self) -> Vec<String> {
        let mut t: Vec<String> = self.routes.iter().map(|r| r.spec.topic.clone()).collect();
        t.sort();
        t.dedup();
        t
    }

    /// The notifications one record becomes (none when filtered out).
    pub fn route(&self, topic: &str, value: &[u8], json: bool) -> Result<Vec<Routed>, RouteError> {
        let mut out = Vec::new();
        // Decode once per distinct format of the topic's routes.
        let mut decoded: Option<(String, Value)> = None;
        for route in self.routes.iter().filter(|r| r.spec.topic == topic) {
            let key = route.spec.message.clone();
            let doc = match &decoded {
                Some((k, v)) if *k == key => v.clone(),
                _ => {
                    let v = decode(&route.format, value, json)?;
                    decoded = Some((key, v.clone()));
                    v
                }
            };
            out.extend(apply(route, &doc)?);
        }
        Ok(out)
    }
}

/// A TOML error on one line (toml's messages may span several), with where it is.
fn toml_error(path: &Path, text: &str, e: &toml::de::Error) -> String {
    let message = e
        .message()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    let at = e
        .span()
        .and_then(|span| text.get(..span.start))
        .map(|before| {
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!(" line {line}, column {column}")
        })
        .unwrap_or_default();
    format!("{}:{at}: {message}", path.display())
}

/// Checks that `path` names a field (through nested messages) of `desc`.
fn check_path(desc: &MessageDescriptor, path: &str) -> Result<(), String> {
    let mut current = desc.clone();
    let mut parts = path.split('.').peekable();
    while let Some(part) = parts.next() {
        let field = current.get_field_by_name(part).ok_or_else(|| {
            format!(
                "{} has no field {part:?} (in {path:?})",
                current.full_name()
            )
        })?;
        if parts.peek().is_some() {
            match field.kind() {
                Kind::Message(m) => current = m,
                _ => return Err(format!("{part:?} in {path:?} is not a message")),
            }
        }
    }
    Ok(())
}

/// Decodes a record value into JSON with proto field names and enum names without their
/// type prefix (`ORDER_STATUS_PAID` → `PAID`).
fn decode(format: &Format, value: &[u8], json: bool) -> Result<Value, RouteError> {
    match format {
        Format::Json => {
            let v: Value = serde_json::from_slice(value)
                .map_err(|e| RouteError::Decode(format!("JSON: {e}")))?;
            if v.is_object() {
                Ok(v)
            } else {
                Err(RouteError::Decode("JSON value is not an object".to_owned()))
            }
        }
        Format::Protobuf(desc) => {
            let msg = if json {
                let bad = |e: serde_json::Error| {
                    RouteError::Decode(format!("proto3 JSON {}: {e}", desc.full_name()))
                };
                let mut doc: Value = serde_json::from_slice(value).map_err(bad)?;
                // Readers ignore unknown fields (forward compatibility), as over protobuf, but
                // an unknown enum name is an error (proto/README.md, rule 4). prost-reflect
                // has one switch for both, so the unknown fields go first and the decode is
                // strict.
                drop_unknown_fields(desc, &mut doc);
                DynamicMessage::deserialize(desc.clone(), doc).map_err(bad)?
            } else {
                DynamicMessage::decode(desc.clone(), value).map_err(|e| {
                    RouteError::Decode(format!("protobuf {}: {e}", desc.full_name()))
                })?
            };
            Ok(message_to_json(&msg))
        }
    }
}

/// Removes, at every level, the members of a proto3 JSON document that name no field of
/// their message, so that a strict decode fails only on what is wrong in known fields.
fn drop_unknown_fields(desc: &MessageDescriptor, doc: &mut Value) {
    // Well-known types have JSON forms of their own (a Timestamp is a string, a Struct any
    // object): left to the decoder.
    if desc.package_name() == "google.protobuf" {
        return;
    }
    let Value::Object(members) = doc else {
        return;
    };
    let field = |key: &str| {
        desc.get_field_by_json_name(key)
            .or_else(|| desc.get_field_by_name(key))
    };
    members.retain(|key, _| field(key).is_some());
    for (key, value) in members.iter_mut() {
        let Some(f) = field(key) else { continue };
        let Kind::Message(inner) = f.kind() else {
            continue;
        };
        if f.is_map() {
            if let (Kind::Message(m), Value::Object(entries)) =
                (inner.map_entry_value_field().kind(), value)
            {
                entries
                    .values_mut()
                    .for_each(|v| drop_unknown_fields(&m, v));
            }
        } else if f.is_list() {
            if let Value::Array(items) = value {
                items
                    .iter_mut()
                    .for_each(|v| drop_unknown_fields(&inner, v));
            }
        } else {
            drop_unknown_fields(&inner, value);
        }
    }
}

fn message_to_json(msg: &DynamicMessage) -> Value {
    let desc = msg.descriptor();
    if desc.full_name() == "google.protobuf.Timestamp" {
        let seconds = msg
            .get_field_by_name("seconds")
            .and_then(|v| v.as_i64())
            .unwrap_or(0);
        let nanos = msg
            .get_field_by_name("nanos")
            .and_then(|v| v.as_i32())
            .unwrap_or(0);
        let millis = seconds.saturating_mul(1000) + i64::from(nanos) / 1_000_000;
        return Value::from(millis);
    }
    let mut out = Map::new();
    // Every declared field, present or default, so filters and data see proto3 defaults.
    for field in desc.fields() {
        let value = msg.get_field(&field);
        out.insert(
            field.name().to_owned(),
            value_to_json(&value, &field.kind()),
        );
    }
    Value::Object(out)
}

fn value_to_json(value: &PValue, kind: &Kind) -> Value {
    match value {
        PValue::Bool(b) => Value::from(*b),
        PValue::I32(n) => Value::from(*n),
        PValue::I64(n) => Value::from(*n),
        PValue::U32(n) => Value::from(*n),
        PValue::U64(n) => Value::from(*n),
        PValue::F32(n) => Value::from(f64::from(*n)),
        PValue::F64(n) => Value::from(*n),
        PValue::String(s) => Value::from(s.clone()),
        PValue::Bytes(b) => {
            use base64::Engine;
            Value::from(base64::engine::general_purpose::STANDARD.encode(b))
        }
        PValue::EnumNumber(n) => match kind {
            Kind::Enum(e) => match e.get_value(*n) {
                Some(v) => Value::from(strip_enum_prefix(e.name(), v.name())),
                None => Value::from(*n),
            },
            _ => Value::from(*n),
        },
        PValue::Message(m) => message_to_json(m),
        PValue::List(items) => Value::Array(items.iter().map(|v| value_to_json(v, kind)).collect()),
        PValue::Map(map) => {
            let mut out = Map::new();
            for (k, v) in map {
                let key = match k {
                    prost_reflect::MapKey::String(s) => s.clone(),
                    other => format!("{other:?}"),
                };
                out.insert(key, value_to_json(v, kind));
            }
            Value::Object(out)
        }
    }
}

/// `OrderStatus` + `ORDER_STATUS_PAID` → `PAID`.
fn strip_enum_prefix(enum_name: &str, value: &str) -> String {
    let mut prefix = String::new();
    for (i, c) in enum_name.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            prefix.push('_');
        }
        prefix.push(c.to_ascii_uppercase());
    }
    prefix.push('_');
    value.strip_prefix(&prefix).unwrap_or(value).to_owned()
}

fn get<'a>(doc: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(doc, |v, part| v.get(part))
}

fn as_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn apply(route: &Route, doc: &Value) -> Result<Vec<Routed>, RouteError> {
    for f in &route.spec.filter {
        let value = get(doc, &f.field).and_then(as_text).unwrap_or_default();
        if !f.one_of.contains(&value) {
            return Ok(Vec::new());
        }
    }
    let event_id = get(doc, &route.spec.event_id)
        .and_then(as_text)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| RouteError::Unroutable(format!("no {}", route.spec.event_id)))?;
    let mut users = Vec::new();
    for path in &route.spec.recipients {
        match get(doc, path) {
            Some(Value::Array(items)) => users.extend(items.iter().filter_map(as_text)),
            Some(v) => users.extend(as_text(v)),
            None => {}
        }
    }
    users.retain(|u| !u.is_empty() && u.len() <= 256);
    users.sort();
    users.dedup();
    if users.is_empty() && !route.spec.recipients.is_empty() {
        return Err(RouteError::Unroutable(format!(
            "no recipient in {}",
            route.spec.recipients.join(", ")
        )));
    }
    let mut channels = route
        .channels
        .iter()
        .map(|t| t.render(doc))
        .collect::<Result<Vec<_>, _>>()?;
    channels.sort();
    channels.dedup();
    let mut data = Map::new();
    for (key, path) in &route.spec.data {
        data.insert(key.clone(), get(doc, path).cloned().unwrap_or(Value::Null));
    }
    for (key, value) in &route.spec.constants {
        data.insert(key.clone(), Value::from(value.clone()));
    }
    let data = Value::Object(data);
    // The same key for every recipient: keys are scoped to their user or channel.
    let key = format!("{}:{event_id}", route.spec.name);
    Ok(users
        .into_iter()
        .map(Recipient::User)
        .chain(channels.into_iter().map(Recipient::Channel))
        .map(|to| Routed {
            to,
            kind: route.spec.kind.clone(),
            data: data.clone(),
            idempotency_key: key.clone(),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enum_prefixes_are_stripped() {
        assert_eq!(
            strip_enum_prefix("OrderStatus", "ORDER_STATUS_PAID"),
            "PAID"
        );
        assert_eq!(strip_enum_prefix("Decision", "DECISION_REMOVED"), "REMOVED");
        assert_eq!(strip_enum_prefix("TargetType", "TARGET_TYPE_AD"), "AD");
        assert_eq!(strip_enum_prefix("X", "OTHER"), "OTHER");
    }

    fn json_route(toml_text: &str) -> Result<Routes, RoutesError> {
        let file: RoutesFile = toml::from_str(toml_text).map_err(|e| RoutesError(e.to_string()))?;
        Routes::from_specs(&DescriptorPool::new(), file.routes)
    }

    #[test]
    fn a_json_route_selects_recipients_filters_and_data() {
        let routes = json_route(
            r#"
            [[route]]
            name = "promo"
            topic = "promotions"
            message = "json"
            type = "promo"
            recipients = ["audience.users"]
            event_id = "id"
            filter = [{ field = "kind", in = ["flash"] }]
            data = { title = "title", until = "window.end" }
            constants = { source = "marketing" }
            "#,
        )
        .unwrap();
        assert_eq!(routes.topics(), vec!["promotions"]);
        let doc = br#"{"id":"e1","kind":"flash","title":"50% off","window":{"end":99},"audience":{"users":["u1","u2","u1"]}}"#;
        let out = routes.route("promotions", doc, true).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].to, Recipient::User("u1".into()));
        assert_eq!(
            out[0].data,
            serde_json::json!({"title":"50% off","until":99,"source":"marketing"})
        );
        assert_eq!(out[0].idempotency_key, "promo:e1");
        let filtered = br#"{"id":"e2","kind":"weekly","audience":{"users":["u1"]}}"#;
        assert!(
            routes
                .route("promotions", filtered, true)
                .unwrap()
                .is_empty()
        );
        let nobody = br#"{"id":"e3","kind":"flash","audience":{"users":[]}}"#;
        assert!(matches!(
            routes.route("promotions", nobody, true),
            Err(RouteError::Unroutable(_))
        ));
        assert!(matches!(
            routes.route("promotions", b"\xff", true),
            Err(RouteError::Decode(_))
        ));
        assert!(routes.route("other", doc, true).unwrap().is_empty());
    }

    fn order_routes() -> Routes {
        let pool = DescriptorPool::decode(proto::FILE_DESCRIPTOR_SET).unwrap();
        Routes::from_specs(&pool, vec![builtin().remove(0)]).unwrap()
    }

    #[test]
    fn proto3_json_ignores_unknown_fields_but_not_unknown_enum_names() {
        let routes = order_routes();
        let doc = br#"{"eventId":"e1","orderId":"o1","userId":"u1","status":"ORDER_STATUS_PAID",
            "carrier":{"name":"x","legs":[1,"two"]},"occurredAt":"2026-01-01T00:00:00Z"}"#;
        let out = routes.route("order.status.changed", doc, true).unwrap();
        assert_eq!(out.len(), 2, "the owner and the order's channel");
        assert_eq!(out[0].data["status"], "PAID");
        let unknown =
            br#"{"eventId":"e2","orderId":"o1","userId":"u1","status":"ORDER_STATUS_TELEPORTED"}"#;
        match routes.route("order.status.changed", unknown, true) {
            Err(RouteError::Decode(e)) => assert!(e.contains("ORDER_STATUS_TELEPORTED"), "{e}"),
            other => panic!("an unknown enum name must be refused, got {other:?}"),
        }
    }

    #[test]
    fn a_toml_error_is_one_line_with_its_position() {
        let text = "[[route]\nname = 'x'\n";
        let e = toml::from_str::<RoutesFile>(text).unwrap_err();
        let line = toml_error(Path::new("routes.toml"), text, &e);
        assert!(!line.contains('\n'), "{line:?}");
        assert!(line.starts_with("routes.toml: line 1, column "), "{line:?}");
    }

    #[test]
    fn bad_routes_are_refused_with_the_route_named() {
        let e = json_route(
            r#"
            [[route]]
            name = "x"
            topic = "t"
            message = "json"
            type = "hub.sneaky"
            recipients = ["u"]
            "#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("\"x\""), "{e}");
        let e = json_route("[[route]]\nname = 'y'\n").unwrap_err();
        assert!(e.to_string().contains("missing field"), "{e}");
        let e = Routes::from_specs(
            &DescriptorPool::new(),
            vec![RouteSpec {
                name: "z".into(),
                topic: "t".into(),
                message: "no.such.Message".into(),
                kind: "k".into(),
                recipients: vec!["u".into()],
                channels: Vec::new(),
                event_id: "event_id".into(),
                filter: vec![],
                data: BTreeMap::new(),
                constants: BTreeMap::new(),
            }],
        )
        .unwrap_err();
        assert!(e.to_string().contains("unknown message type"), "{e}");
    }

    #[test]
    fn channel_templates_parse_and_refuse_with_the_template_named() {
        let t = ChannelTemplate::parse("order:{order_id}").unwrap();
        assert_eq!(t.fields().collect::<Vec<_>>(), ["order_id"]);
        let t = ChannelTemplate::parse("{shop.id}/orders/{ order_id }").unwrap();
        assert_eq!(t.fields().collect::<Vec<_>>(), ["shop.id", "order_id"]);
        assert!(ChannelTemplate::parse("announcements").is_ok());
        for (bad, why) in [
            ("order:{order_id", "without its '}'"),
            ("order:order_id}", "without its '{'"),
            ("order:{}", "is not a field path"),
            ("order:{a..b}", "is not a field path"),
            ("order:{a{b}}", "without its '}'"),
            ("order {order_id}", "' ' cannot be in a channel name"),
            ("", "must not be empty"),
            ("caf\u{e9}", "may hold only"),
        ] {
            let e = ChannelTemplate::parse(bad).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn a_route_publishes_to_rendered_channels_and_refuses_bad_names() {
        let routes = json_route(
            r#"
            [[route]]
            name = "rooms"
            topic = "chat"
            message = "json"
            type = "chat.message"
            channels = ["room:{room}", "room:{room}", "lobby"]
            event_id = "id"
            data = { text = "text" }
            "#,
        )
        .unwrap();
        let out = routes
            .route("chat", br#"{"id":"m1","room":42,"text":"hi"}"#, true)
            .unwrap();
        let to: Vec<_> = out.iter().map(|r| r.to.clone()).collect();
        assert_eq!(
            to,
            [
                Recipient::Channel("lobby".into()),
                Recipient::Channel("room:42".into())
            ]
        );
        assert!(out.iter().all(|r| r.idempotency_key == "rooms:m1"));
        for bad in [
            br#"{"id":"m2","text":"no room"}"#.as_slice(),
            br#"{"id":"m3","room":""}"#,
            br#"{"id":"m4","room":"a b"}"#,
            br#"{"id":"m5","room":{"nested":1}}"#,
        ] {
            match routes.route("chat", bad, true) {
                Err(RouteError::Unroutable(e)) => assert!(e.contains("channel"), "{e}"),
                other => panic!(
                    "{} must be unroutable, got {other:?}",
                    String::from_utf8_lossy(bad)
                ),
            }
        }
        let long = format!(r#"{{"id":"m6","room":"{}"}}"#, "x".repeat(200));
        assert!(matches!(
            routes.route("chat", long.as_bytes(), true),
            Err(RouteError::Unroutable(_))
        ));
    }

    #[test]
    fn the_order_route_also_publishes_to_the_orders_channel() {
        let routes = order_routes();
        let doc =
            br#"{"eventId":"e1","orderId":"o-7","userId":"alice","status":"ORDER_STATUS_PAID"}"#;
        let out = routes.route("order.status.changed", doc, true).unwrap();
        let to: Vec<_> = out.iter().map(|r| r.to.clone()).collect();
        assert_eq!(
            to,
            [
                Recipient::User("alice".into()),
                Recipient::Channel("order:o-7".into())
            ]
        );
        assert_eq!(out[0].data, out[1].data);
        assert!(out.iter().all(|r| r.idempotency_key == "order-status:e1"));
        // An order id the hub cannot name a channel after sends the record to the DLQ.
        let bad =
            br#"{"eventId":"e2","orderId":"o 7","userId":"alice","status":"ORDER_STATUS_PAID"}"#;
        assert!(matches!(
            routes.route("order.status.changed", bad, true),
            Err(RouteError::Unroutable(_))
        ));
    }

    #[test]
    fn protobuf_routes_check_template_fields_at_start() {
        let pool = DescriptorPool::decode(proto::FILE_DESCRIPTOR_SET).unwrap();
        let mut spec = builtin().remove(0);
        spec.channels = vec!["order:{order_idd}".into()];
        let e = Routes::from_specs(&pool, vec![spec])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("config: HUB_INGEST_ROUTES: route \"order-status\""),
            "{e}"
        );
        assert!(e.contains("order_idd"), "{e}");
        let mut spec = builtin().remove(0);
        spec.recipients.clear();
        spec.channels.clear();
        let e = Routes::from_specs(&pool, vec![spec])
            .unwrap_err()
            .to_string();
        assert!(e.contains("recipients or channels"), "{e}");
        let mut spec = builtin().remove(0);
        spec.channels = vec!["order:{order_id".into()];
        let e = Routes::from_specs(&pool, vec![spec])
            .unwrap_err()
            .to_string();
        assert!(e.contains("channel template"), "{e}");
        // Channels alone are enough.
        let mut spec = builtin().remove(0);
        spec.recipients.clear();
        assert!(Routes::from_specs(&pool, vec![spec]).is_ok());
    }

    mod fuzz {
        //! Outside input never panics the routes parser or the record router.

        use proptest::prelude::*;

        use super::super::*;

        fn pool() -> DescriptorPool {
            DescriptorPool::decode(proto::FILE_DESCRIPTOR_SET).expect("contracts")
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn any_routes_file_text_is_parsed_or_refused_with_a_line(text in ".{0,400}") {
                let pool = pool();
                if let Err(e) = Routes::parse(&pool, Some(&text), Path::new("routes.toml"), false) {
                    prop_assert!(e.to_string().starts_with("config: HUB_INGEST_ROUTES:"));
                    prop_assert!(!e.to_string().contains('\n'));
                }
            }

            #[test]
            fn route_shaped_files_with_random_values_never_panic(
                topic in "[a-z.]{0,12}",
                message in prop_oneof![Just("json".to_owned()), "[a-zA-Z.]{0,30}"],
                recipient in "[a-z_.]{0,12}",
                event_id in "[a-z_.]{0,12}",
            ) {
                let text = format!(
                    "[[routes]]\nname = \"r\"\ntopic = \"{topic}\"\nmessage = \"{message}\"\ntype = \"t\"\nrecipients = [\"{recipient}\"]\nevent_id = \"{event_id}\"\n"
                );
                let _ = Routes::parse(&pool(), Some(&text), Path::new("routes.toml"), false);
            }

            #[test]
            fn any_record_value_is_routed_or_refused(
                payload in proptest::collection::vec(any::<u8>(), 0..600),
                json in any::<bool>(),
            ) {
                let routes = Routes::parse(&pool(), None, Path::new("-"), true).expect("built-ins");
                for topic in ["order.status.changed", "moderation.results", "other"] {
                    let _ = routes.route(topic, &payload, json);
                }
            }

            #[test]
            fn json_records_with_deep_nesting_and_huge_numbers_never_panic(
                depth in 0usize..300,
                number in "-?[0-9]{1,400}(\\.[0-9]{1,40})?(e[+-]?[0-9]{1,5})?",
            ) {
                let routes = Routes::parse(&pool(), None, Path::new("-"), true).expect("built-ins");
                let deep = format!("{}{}{}", "[".repeat(depth), number, "]".repeat(depth));
                let record = format!(
                    r#"{{"eventId":"e","orderId":"o","userId":"u","status":"ORDER_STATUS_PAID","x":{deep}}}"#
                );
                let _ = routes.route("order.status.changed", record.as_bytes(), true);
                let _ = routes.route("order.status.changed", number.as_bytes(), true);
            }
        }
    }
}
