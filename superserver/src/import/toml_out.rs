//! Writing TOML values: strings escaped as basic strings, arrays and inline tables of them.

use std::fmt::Write;

/// `s` as a TOML basic string, quotes included: `\` and `"` escaped, control characters as
/// `\uXXXX` (so every value stays on one line).
pub fn string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// `["a", "b"]`.
pub fn array(items: &[String]) -> String {
    let items: Vec<String> = items.iter().map(|s| string(s)).collect();
    format!("[{}]", items.join(", "))
}

/// A string when there is one item, an array otherwise.
pub fn one_or_array(items: &[String]) -> String {
    match items {
        [one] => string(one),
        _ => array(items),
    }
}

/// A bare key when it can be one, a quoted key otherwise.
pub fn key(k: &str) -> String {
    if !k.is_empty()
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        k.to_string()
    } else {
        string(k)
    }
}

/// A comment line's text with line breaks folded (the text comes from the imported file).
pub fn comment(text: &str) -> String {
    text.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes() {
        assert_eq!(string("a\"b\\c\td"), r#""a\"b\\c\u0009d""#);
        assert_eq!(array(&["x".into(), "y".into()]), r#"["x", "y"]"#);
        assert_eq!(key("echo"), "echo");
        assert_eq!(key("a b"), "\"a b\"");
    }
}
