//! The TOML file as written: serde types with a span on every value that validation checks.
//!
//! Nothing here is trusted. Numbers are read as `i64` and strings as `String` so that range
//! and format checks happen in `validate`, where each failure gets its own message at the
//! right place. Unknown keys are rejected by `deny_unknown_fields`.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use toml::Spanned;

/// The keys accepted at the top level of the file.
pub const TOP_LEVEL_KEYS: &[&str] = &["superserver", "service"];

/// The keys accepted at the top level of a drop-in file (see `include`).
pub const DROP_IN_KEYS: &[&str] = &["service"];

/// A table type of the schema. Every field is optional, so a table holding any subset of
/// [`KEYS`](RawTable::KEYS) (even one key alone) deserializes: `validate` relies on this to
/// check each key on its own when a table does not fit.
pub trait RawTable: serde::de::DeserializeOwned {
    /// The accepted keys, in the order the messages list them (the order of the fields; a unit
    /// test checks that the list and the fields agree).
    const KEYS: &'static [&'static str];
}

/// The `[superserver]` table.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGlobal {
    pub shutdown_grace: Option<Spanned<String>>,
    pub backlog: Option<Spanned<i64>>,
    pub restart_backoff_min: Option<Spanned<String>>,
    pub restart_backoff_max: Option<Spanned<String>>,
    pub allow_no_services: Option<bool>,
    pub include: Option<Spanned<Vec<Spanned<String>>>>,
    pub control: Option<Spanned<RawControl>>,
    pub control_group: Option<Spanned<NameOrId>>,
    pub metrics: Option<Spanned<String>>,
    pub agent: Option<Spanned<String>>,
}

/// `control = false` or `control = "/path"` (`true`: the default path).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(untagged)]
pub enum RawControl {
    Switch(bool),
    Path(String),
}

impl RawTable for RawGlobal {
    const KEYS: &'static [&'static str] = &[
        "shutdown_grace",
        "backlog",
        "restart_backoff_min",
        "restart_backoff_max",
        "allow_no_services",
        "include",
        "control",
        "control_group",
        "metrics",
        "agent",
    ];
}

impl RawTable for RawService {
    const KEYS: &'static [&'static str] = &[
        "mode",
        "enable",
        "exec",
        "listen",
        "backlog",
        "max_instances",
        "instances",
        "max_per_source",
        "source_prefix_v4",
        "source_prefix_v6",
        "overflow",
        "max_duration",
        "rate",
        "allow",
        "deny",
        "user",
        "user_if_root",
        "group",
        "allow_root",
        "no_new_privs",
        "env",
        "pass_env",
        "working_directory",
        "umask",
        "limit_nofile",
        "limit_nproc",
        "connection",
        "handoff",
        "log_peer",
        "proxy_protocol",
        "proxy_from",
        "proxy_timeout",
        "socket_mode",
        "socket_user",
        "socket_group",
    ];
}

/// One `[service.NAME]` table.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawService {
    pub mode: Option<Spanned<RawMode>>,
    pub enable: Option<bool>,
    pub exec: Option<Spanned<Vec<Spanned<String>>>>,
    pub listen: Option<Spanned<RawListen>>,
    pub backlog: Option<Spanned<i64>>,
    pub max_instances: Option<Spanned<i64>>,
    pub instances: Option<Spanned<i64>>,
    pub max_per_source: Option<Spanned<i64>>,
    pub source_prefix_v4: Option<Spanned<i64>>,
    pub source_prefix_v6: Option<Spanned<i64>>,
    pub overflow: Option<Spanned<RawOverflow>>,
    pub max_duration: Option<Spanned<String>>,
    pub rate: Option<Spanned<String>>,
    pub allow: Option<Spanned<Vec<Spanned<String>>>>,
    pub deny: Option<Spanned<Vec<Spanned<String>>>>,
    pub user: Option<Spanned<NameOrId>>,
    pub user_if_root: Option<Spanned<NameOrId>>,
    pub group: Option<Spanned<NameOrId>>,
    pub allow_root: Option<bool>,
    pub no_new_privs: Option<bool>,
    pub env: Option<Entries<Spanned<String>>>,
    pub pass_env: Option<Vec<Spanned<String>>>,
    pub working_directory: Option<Spanned<String>>,
    pub umask: Option<Spanned<Octal>>,
    pub limit_nofile: Option<Spanned<i64>>,
    pub limit_nproc: Option<Spanned<i64>>,
    pub connection: Option<Spanned<RawConnection>>,
    pub handoff: Option<Spanned<RawHandoff>>,
    pub log_peer: Option<Spanned<RawLogPeer>>,
    pub proxy_protocol: Option<Spanned<RawProxyVersion>>,
    pub proxy_from: Option<Spanned<Vec<Spanned<String>>>>,
    pub proxy_timeout: Option<Spanned<String>>,
    pub socket_mode: Option<Spanned<Octal>>,
    pub socket_user: Option<Spanned<NameOrId>>,
    pub socket_group: Option<Spanned<NameOrId>>,
}

/// `mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub enum RawMode {
    Wait,
    Nowait,
}

/// `overflow`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub enum RawOverflow {
    Hold,
    Close,
}

/// `connection`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub enum RawConnection {
    Stdio,
    ListenFds,
}

/// `handoff`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub enum RawHandoff {
    ListenFds,
    Stdin,
}

/// `log_peer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub enum RawLogPeer {
    Full,
    Masked,
    None,
}

/// `proxy_protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub enum RawProxyVersion {
    V1,
    V2,
    Any,
}

/// `TryFrom<String>` for a keyword enum: a wrong type is serde's "expected a string", a wrong
/// word names the accepted ones.
macro_rules! keywords {
    ($ty:ident { $($word:literal => $variant:ident),+ $(,)? }) => {
        impl TryFrom<String> for $ty {
            type Error = String;
            fn try_from(s: String) -> Result<Self, String> {
                match s.as_str() {
                    $($word => Ok($ty::$variant),)+
                    _ => Err(format!(
                        "unknown value \"{}\", expected {}",
                        s.escape_debug(),
                        [$(concat!("\"", $word, "\"")),+].join(" or ")
                    )),
                }
            }
        }
    };
}

keywords!(RawMode { "wait" => Wait, "nowait" => Nowait });
keywords!(RawOverflow { "hold" => Hold, "close" => Close });
keywords!(RawConnection { "stdio" => Stdio, "listen-fds" => ListenFds });
keywords!(RawHandoff { "listen-fds" => ListenFds, "stdin" => Stdin });
keywords!(RawProxyVersion { "v1" => V1, "v2" => V2, "any" => Any });
keywords!(RawLogPeer { "full" => Full, "masked" => Masked, "none" => None });

/// `listen`: `"addr"`, `["addr", ...]` or `{ fdname = "addr" | ["addr", ...] }`.
#[derive(Debug)]
pub enum RawListen {
    /// One address or a list, all named after the service.
    Unnamed(Vec<Spanned<String>>),
    /// fd name → addresses, in file order.
    Named(Vec<(Spanned<String>, Spanned<OneOrMany>)>),
}

impl<'de> Deserialize<'de> for RawListen {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawListen;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an address, a list of addresses, or a table { fdname = addresses }")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawListen, E> {
                // The span of a lone string is the span of the whole `listen` value, which
                // `validate` substitutes (a zero range here means "use the parent's").
                Ok(RawListen::Unnamed(vec![Spanned::new(0..0, v.to_owned())]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RawListen, A::Error> {
                let mut v = Vec::new();
                while let Some(s) = seq.next_element()? {
                    v.push(s);
                }
                Ok(RawListen::Unnamed(v))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RawListen, A::Error> {
                Ok(RawListen::Named(
                    Entries::deserialize(de::value::MapAccessDeserializer::new(map))?.0,
                ))
            }
        }
        d.deserialize_any(V)
    }
}

/// One address or a list of them (the values of a `listen` table).
#[derive(Debug)]
pub struct OneOrMany(pub Vec<Spanned<String>>);

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OneOrMany;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an address or a list of addresses")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<OneOrMany, E> {
                Ok(OneOrMany(vec![Spanned::new(0..0, v.to_owned())]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<OneOrMany, A::Error> {
                let mut v = Vec::new();
                while let Some(s) = seq.next_element()? {
                    v.push(s);
                }
                Ok(OneOrMany(v))
            }
        }
        d.deserialize_any(V)
    }
}

/// A table read in file order, each key with its span. Duplicate keys cannot occur: the TOML
/// parser rejects them.
#[derive(Debug)]
pub struct Entries<V>(pub Vec<(Spanned<String>, V)>);

impl<'de, V: Deserialize<'de>> Deserialize<'de> for Entries<V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Vis<V>(PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for Vis<V> {
            type Value = Entries<V>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a table")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Entries<V>, A::Error> {
                let mut v: Vec<(Spanned<String>, V)> = Vec::new();
                while let Some(k) = map.next_key::<Spanned<String>>()? {
                    v.push((k, map.next_value()?));
                }
                // toml hands tables over sorted by key unless `preserve_order` is on.
                v.sort_by_key(|(k, _)| k.span().start);
                Ok(Entries(v))
            }
        }
        d.deserialize_map(Vis(PhantomData))
    }
}

/// A user or group: a name, or a numeric id (as an integer or a string of digits).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameOrId {
    Name(String),
    Id(u32),
}

impl fmt::Display for NameOrId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NameOrId::Name(n) => write!(f, "{n:?}"),
            NameOrId::Id(i) => write!(f, "{i}"),
        }
    }
}

impl<'de> Deserialize<'de> for NameOrId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = NameOrId;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a name or a numeric id")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<NameOrId, E> {
                if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
                    return v.parse().map(NameOrId::Id).map_err(|_| {
                        E::custom(format!("id {v} is out of range (0..={})", u32::MAX))
                    });
                }
                Ok(NameOrId::Name(v.to_owned()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<NameOrId, E> {
                u32::try_from(v)
                    .map(NameOrId::Id)
                    .map_err(|_| E::custom(format!("id {v} is out of range (0..={})", u32::MAX)))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<NameOrId, E> {
                self.visit_i64(i64::try_from(v).unwrap_or(i64::MAX))
            }
        }
        d.deserialize_any(V)
    }
}

/// A file mode or umask: an octal string (`"022"`, `"0o022"`) or an integer. Which integers
/// are accepted (TOML's `0o022`, not a decimal `22`) is decided in `validate`, which sees how
/// the number was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Octal {
    Text(String),
    Int(i64),
}

impl<'de> Deserialize<'de> for Octal {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Octal;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an octal string such as \"022\" or an integer such as 0o022")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Octal, E> {
                Ok(Octal::Text(v.to_owned()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Octal, E> {
                Ok(Octal::Int(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Octal, E> {
                Ok(Octal::Int(i64::try_from(v).unwrap_or(i64::MAX)))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The accepted keys serde reports for an unknown one (the field list of `T`).
    fn serde_keys<T: RawTable>() -> String {
        let err = toml::from_str::<T>("no_such_key = 1").err().unwrap();
        let msg = err.message().to_owned();
        msg.split_once("expected one of ")
            .unwrap()
            .1
            .trim()
            .to_owned()
    }

    fn listed(keys: &[&str]) -> String {
        keys.iter()
            .map(|k| format!("`{k}`"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    #[test]
    fn key_lists_match_the_fields() {
        assert_eq!(serde_keys::<RawGlobal>(), listed(RawGlobal::KEYS));
        assert_eq!(serde_keys::<RawService>(), listed(RawService::KEYS));
    }
}
