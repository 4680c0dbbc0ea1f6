//! JSON ↔ Python for the common case, without calling into the `json` module.
//!
//! Calling the C scanner and the C encoder still costs their argument parsing (a tuple and
//! keyword matching on every call), a `str` copy of the whole request, a `str` per number before
//! it becomes an `int`, and a list of chunks to join on the way out: for a small request that is
//! most of the replica's work. Here the request's bytes become Python objects directly, and an
//! answer made of plain values is written straight into the output.
//!
//! Both directions only take what they can answer exactly as `json.loads` and
//! `json.dumps(allow_nan=False, ensure_ascii=False, separators=(",", ":"))` would; anything else
//! (a number or a nesting past the limits below, a lone surrogate, `NaN`, a subclass, a
//! non-string key, an error of any kind) returns `None` or `false`, and the caller goes through
//! the `json` module, which then gives the same result or the same error it always did. So these
//! functions never decide an error. `json::tests`, `python::tests` and the `json_python` fuzz
//! target check them against the `json` module.

use std::io::Write as _;

use modelgate_protocol::json_plain_run;

use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyList, PyString, PyTuple};

/// Deeper than this, the `json` module takes over (it then applies Python's recursion limit).
const MAX_DEPTH: usize = 64;
/// Integers of up to 18 digits fit an `i64`; longer ones go to the `json` module.
const MAX_INT_DIGITS: usize = 18;
/// Longer numbers go to the `json` module. Rust's float parse stops reading an exponent past
/// 65,536, which changes the value only when some 65,000 digits before it offset the rest; no
/// shorter number reads differently from Python's `float`.
const MAX_NUMBER_LEN: usize = 100;
/// Distinct object keys remembered per request, so repeated keys (a list of records) share one
/// `str`, as `json.loads` does with its memo.
const KEY_MEMO: usize = 32;

/// `json.loads(text)`, when `text` is JSON this parser takes whole.
pub fn decode<'py>(py: Python<'py>, text: &str) -> Option<Bound<'py, PyAny>> {
    let mut parser = Parser {
        py,
        text,
        pos: 0,
        keys: Vec::new(),
    };
    parser.skip_ws();
    let value = parser.value(0)?;
    parser.skip_ws();
    (parser.pos == parser.text.len()).then_some(value)
}

struct Parser<'py, 't> {
    py: Python<'py>,
    text: &'t str,
    pos: usize,
    keys: Vec<(&'t str, Bound<'py, PyString>)>,
}

impl<'py, 't> Parser<'py, 't> {
    fn bytes(&self) -> &'t [u8] {
        self.text.as_bytes()
    }

    fn peek(&self) -> Option<u8> {
        self.bytes().get(self.pos).copied()
    }

    /// JSON's whitespace, which is also what the `json` module skips.
    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.pos += 1;
        }
    }

    fn eat(&mut self, literal: &[u8]) -> Option<()> {
        let end = self.pos + literal.len();
        (self.bytes().get(self.pos..end)? == literal).then(|| self.pos = end)
    }

    fn value(&mut self, depth: usize) -> Option<Bound<'py, PyAny>> {
        let py = self.py;
        match self.peek()? {
            b'{' => self.object(depth + 1),
            b'[' => self.array(depth + 1),
            b'"' => {
                let s = self.string()?;
                Some(s.into_any())
            }
            b't' => {
                self.eat(b"true")?;
                Some(PyBool::new(py, true).to_owned().into_any())
            }
            b'f' => {
                self.eat(b"false")?;
                Some(PyBool::new(py, false).to_owned().into_any())
            }
            b'n' => {
                self.eat(b"null")?;
                Some(py.None().into_bound(py))
            }
            b'-' | b'0'..=b'9' => self.number(),
            _ => None,
        }
    }

    fn object(&mut self, depth: usize) -> Option<Bound<'py, PyAny>> {
        let dict = PyDict::new(self.py);
        self.elements(depth, b'}', |p| {
            if p.peek()? != b'"' {
                return None;
            }
            let key = p.key()?;
            p.skip_ws();
            p.eat(b":")?;
            p.skip_ws();
            let value = p.value(depth)?;
            // A repeated key keeps its first place with the last value, as in `json.loads`.
            dict.set_item(key, value).ok()
        })?;
        Some(dict.into_any())
    }

    fn array(&mut self, depth: usize) -> Option<Bound<'py, PyAny>> {
        let list = PyList::empty(self.py);
        self.elements(depth, b']', |p| list.append(p.value(depth)?).ok())?;
        Some(list.into_any())
    }

    /// An object's or an array's elements, from its opening bracket to `close`; `element` reads
    /// one (for an object, a key and its value).
    fn elements(
        &mut self,
        depth: usize,
        close: u8,
        mut element: impl FnMut(&mut Self) -> Option<()>,
    ) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        self.pos += 1;
        self.skip_ws();
        if self.peek()? == close {
            self.pos += 1;
            return Some(());
        }
        loop {
            element(self)?;
            self.skip_ws();
            match self.peek()? {
                b',' => {
                    self.pos += 1;
                    self.skip_ws();
                }
                c if c == close => {
                    self.pos += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// An object key: the `str` of an earlier equal key when there is one.
    fn key(&mut self) -> Option<Bound<'py, PyString>> {
        let start = self.pos + 1;
        let Some(end) = self.plain_string_end(start) else {
            return self.string();
        };
        let raw = &self.text[start..end];
        self.pos = end + 1;
        if let Some((_, key)) = self.keys.iter().find(|(k, _)| *k == raw) {
            return Some(key.clone());
        }
        let key = PyString::new(self.py, raw);
        if self.keys.len() < KEY_MEMO {
            self.keys.push((raw, key.clone()));
        }
        Some(key)
    }

    /// Where the string starting at `start` (after its quote) ends, when it has no escapes.
    fn plain_string_end(&self, start: usize) -> Option<usize> {
        let rest = self.bytes().get(start..)?;
        let len = json_plain_run(rest);
        (*rest.get(len)? == b'"').then_some(start + len)
    }

    fn string(&mut self) -> Option<Bound<'py, PyString>> {
        let start = self.pos + 1;
        if let Some(end) = self.plain_string_end(start) {
            self.pos = end + 1;
            return Some(PyString::new(self.py, &self.text[start..end]));
        }
        let mut out = String::new();
        let mut i = start;
        loop {
            let run = json_plain_run(&self.bytes()[i..]);
            out.push_str(&self.text[i..i + run]);
            i += run;
            match *self.bytes().get(i)? {
                b'"' => break,
                b'\\' => {
                    let escape = *self.bytes().get(i + 1)?;
                    i += 2;
                    out.push(match escape {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => {
                            let (c, len) = self.unicode_escape(i)?;
                            i += len;
                            c
                        }
                        _ => return None,
                    });
                }
                // A raw control character, which `json.loads` refuses.
                _ => return None,
            }
        }
        self.pos = i + 1;
        Some(PyString::new(self.py, &out))
    }

    /// The character of `\uXXXX` whose hex digits start at `i`, with the input it took. A
    /// surrogate pair is one character; a lone surrogate (which a Rust string cannot hold) is
    /// left to the `json` module.
    fn unicode_escape(&self, i: usize) -> Option<(char, usize)> {
        let hex = |at: usize| {
            let digits = self.text.get(at..at + 4)?;
            if !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
                return None;
            }
            u32::from_str_radix(digits, 16).ok()
        };
        let first = hex(i)?;
        if !(0xd800..=0xdbff).contains(&first) {
            return char::from_u32(first).map(|c| (c, 4));
        }
        if self.bytes().get(i + 4..i + 6)? != b"\\u" {
            return None;
        }
        let second = hex(i + 6)?;
        if !(0xdc00..=0xdfff).contains(&second) {
            return None;
        }
        let c = 0x10000 + ((first - 0xd800) << 10) + (second - 0xdc00);
        char::from_u32(c).map(|c| (c, 10))
    }

    fn number(&mut self) -> Option<Bound<'py, PyAny>> {
        let start = self.pos;
        let mut i = start;
        if self.bytes()[i] == b'-' {
            i += 1;
        }
        let digits = |from: usize| {
            self.bytes()[from..]
                .iter()
                .take_while(|b| b.is_ascii_digit())
                .count()
        };
        let int_digits = digits(i);
        // No digits, or a leading zero followed by more: not a number `json.loads` reads whole.
        if int_digits == 0 || (int_digits > 1 && self.bytes()[i] == b'0') {
            return None;
        }
        i += int_digits;
        let mut float = false;
        if self.bytes().get(i) == Some(&b'.') {
            let frac = digits(i + 1);
            if frac == 0 {
                return None;
            }
            i += 1 + frac;
            float = true;
        }
        if let Some(b'e' | b'E') = self.bytes().get(i) {
            let mut j = i + 1;
            if let Some(b'+' | b'-') = self.bytes().get(j) {
                j += 1;
            }
            let exp = digits(j);
            if exp == 0 {
                return None;
            }
            i = j + exp;
            float = true;
        }
        if i - start > MAX_NUMBER_LEN {
            return None;
        }
        self.pos = i;
        let text = &self.text[start..i];
        if float {
            // Rust's parse and Python's `float` both round correctly, so they agree.
            let f: f64 = text.parse().ok()?;
            return Some(PyFloat::new(self.py, f).into_any());
        }
        if int_digits > MAX_INT_DIGITS {
            return None;
        }
        let n: i64 = text.parse().ok()?;
        Some(n.into_pyobject(self.py).ok()?.into_any())
    }
}

/// Appends `json.dumps(value, allow_nan=False, ensure_ascii=False, separators=(",", ":"))` to
/// `out` when `value` is made only of exact `dict` (with `str` keys), `list`, `tuple`, `str`,
/// `int` (within `i64`), finite `float`, `bool` and `None`; otherwise leaves `out` as it was and
/// returns `false`.
pub fn encode(value: &Bound<'_, PyAny>, out: &mut Vec<u8>) -> bool {
    let len = out.len();
    if encode_value(value, out, 0).is_some() {
        return true;
    }
    out.truncate(len);
    false
}

fn encode_value(value: &Bound<'_, PyAny>, out: &mut Vec<u8>, depth: usize) -> Option<()> {
    if value.is_none() {
        out.extend_from_slice(b"null");
    } else if let Ok(b) = value.cast_exact::<PyBool>() {
        out.extend_from_slice(if b.is_true() { b"true" } else { b"false" });
    } else if let Ok(s) = value.cast_exact::<PyString>() {
        encode_str(s, out)?;
    } else if value.is_exact_instance_of::<pyo3::types::PyInt>() {
        let n: i64 = value.extract().ok()?;
        write!(out, "{n}").ok()?;
    } else if let Ok(f) = value.cast_exact::<PyFloat>() {
        if !f.value().is_finite() {
            return None;
        }
        // `float.__repr__`, which is what `json` writes.
        out.extend_from_slice(f.repr().ok()?.to_str().ok()?.as_bytes());
    } else if let Ok(dict) = value.cast_exact::<PyDict>() {
        if depth >= MAX_DEPTH {
            return None;
        }
        out.push(b'{');
        for (i, (k, v)) in dict.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            encode_str(k.cast_exact::<PyString>().ok()?, out)?;
            out.push(b':');
            encode_value(&v, out, depth + 1)?;
        }
        out.push(b'}');
    } else if let Ok(list) = value.cast_exact::<PyList>() {
        encode_array(list.iter(), out, depth)?;
    } else if let Ok(tuple) = value.cast_exact::<PyTuple>() {
        encode_array(tuple.iter(), out, depth)?;
    } else {
        return None;
    }
    Some(())
}

/// A list or a tuple, at `depth`: both are JSON arrays.
fn encode_array<'py>(
    items: impl Iterator<Item = Bound<'py, PyAny>>,
    out: &mut Vec<u8>,
    depth: usize,
) -> Option<()> {
    if depth >= MAX_DEPTH {
        return None;
    }
    out.push(b'[');
    for (i, item) in items.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        encode_value(&item, out, depth + 1)?;
    }
    out.push(b']');
    Some(())
}

/// A `str` as `json` writes it without `ensure_ascii`: quotes, backslashes and control
/// characters escaped (`\u00XX` in lower-case hex where there is no short form), everything else
/// as is. A string that is not UTF-8 (a lone surrogate) is left to the `json` module.
fn encode_str(s: &Bound<'_, PyString>, out: &mut Vec<u8>) -> Option<()> {
    let text = s.to_str().ok()?;
    out.reserve(text.len() + 2);
    out.push(b'"');
    let mut rest = text.as_bytes();
    loop {
        let run = json_plain_run(rest);
        out.extend_from_slice(&rest[..run]);
        let Some(&b) = rest.get(run) else {
            break;
        };
        rest = &rest[run + 1..];
        if b == b'"' || b == b'\\' {
            out.extend_from_slice(&[b'\\', b]);
            continue;
        }
        controls_escaped(&[b], out);
        // Control characters come many to a string (line breaks): the rest of this stretch
        // without quotes or backslashes is escaped in one pass, so no search reads it again
        // (searching from each one to the next quote would read a long text quadratically).
        let stop = memchr::memchr2(b'"', b'\\', rest).unwrap_or(rest.len());
        controls_escaped(&rest[..stop], out);
        rest = &rest[stop..];
    }
    out.push(b'"');
    Some(())
}

/// `run` (no quote or backslash in it) with its control characters escaped.
fn controls_escaped(mut run: &[u8], out: &mut Vec<u8>) {
    // The minimum compiles to vector instructions; only a run that has a control character is
    // read again for where.
    if run.iter().copied().min().unwrap_or(u8::MAX) >= 0x20 {
        out.extend_from_slice(run);
        return;
    }
    while let Some(i) = run.iter().position(|&b| b < 0x20) {
        out.extend_from_slice(&run[..i]);
        let b = run[i];
        run = &run[i + 1..];
        let short = match b {
            b'\n' => b'n',
            b'\r' => b'r',
            b'\t' => b't',
            0x08 => b'b',
            0x0c => b'f',
            _ => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u00");
                out.extend_from_slice(&[HEX[usize::from(b >> 4)], HEX[usize::from(b & 0xf)]]);
                continue;
            }
        };
        out.extend_from_slice(&[b'\\', short]);
    }
    out.extend_from_slice(run);
}

#[cfg(test)]
mod tests {
    use super::*;
    use pyo3::types::PyModule;

    /// The `json` module's side of the comparison, and a canonical form of a value that tells
    /// `1` from `1.0` and `True`, and keeps the order of a dict's keys.
    const HELPERS: &str = r#"
import json, random

def canon(x):
    t = type(x).__name__
    if isinstance(x, dict):
        return (t, [(canon(k), canon(v)) for k, v in x.items()])
    if isinstance(x, (list, tuple)):
        return (t, [canon(v) for v in x])
    return (t, repr(x))

def loads(text):
    try:
        return True, json.loads(text)
    except Exception:
        return False, None

def same(a, b):
    return canon(a) == canon(b)

def dumps(value):
    try:
        out = json.dumps(value, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
        return out.encode("utf-8")
    except Exception:
        return None

class Sub(dict):
    pass

class Text(str):
    pass

def value(rng, depth=0):
    kind = rng.randrange(13 if depth < 4 else 8)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice([0, 1, -1, 255, 256, -5, -6, 2**31, 2**53 + 1, 2**63 - 1, -2**63,
                           2**63, -2**63 - 1, 10**30, rng.randrange(-10**6, 10**6)])
    if kind == 3:
        return rng.choice([0.0, -0.0, 0.1, 1e16, 1e15, 1.5e-5, 1e-4, 1e300, 5e-324, 2.0**60,
                           float("nan"), float("inf"), -float("inf"),
                           rng.uniform(-1e6, 1e6), rng.random() * 10.0 ** rng.randrange(-30, 30)])
    if kind in (4, 5, 6, 7):
        if rng.random() < 0.05:
            return "".join(rng.choice(["ab", "\n", "\x01", '"', "\\", "\u00e9"])
                           for _ in range(rng.randrange(0, 200)))
        alphabet = ['a', 'Z', '0', ' ', '"', '\\', '/', '\n', '\r', '\t', '\b', '\f', '\x00',
                    '\x1f', '\x7f', '\x80', '\u00e9', '\u2028', '\uffff', '\U0001f600',
                    '\ud800', '\udfff']
        s = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 6)))
        return Text(s) if rng.random() < 0.02 else s
    if kind in (8, 9):
        items = [value(rng, depth + 1) for _ in range(rng.randrange(0, 4))]
        return tuple(items) if rng.random() < 0.3 else items
    d = Sub() if rng.random() < 0.02 else {}
    for _ in range(rng.randrange(0, 4)):
        r = rng.random()
        key = (rng.choice(["a", "b", "k\u00e9", "q\"", ""]) if r < 0.9
               else rng.choice([1, 2.5, True, None]))
        d[key] = value(rng, depth + 1)
    return d
"#;

    fn helpers(py: Python<'_>) -> Bound<'_, PyModule> {
        PyModule::from_code(
            py,
            &std::ffi::CString::new(HELPERS).unwrap(),
            c"json_helpers.py",
            c"json_helpers",
        )
        .unwrap()
    }

    /// `json.loads(text)`: whether it succeeded, and the value (`None` if not).
    fn loads<'py>(h: &Bound<'py, PyModule>, text: &str) -> (bool, Bound<'py, PyAny>) {
        let call = h.getattr("loads").unwrap().call1((text,)).unwrap();
        call.extract().unwrap()
    }

    /// Whether `a` and `b` are equal, of the same types throughout, with keys in the same order.
    fn same(h: &Bound<'_, PyModule>, a: &Bound<'_, PyAny>, b: &Bound<'_, PyAny>) -> bool {
        let call = h.getattr("same").unwrap().call1((a, b)).unwrap();
        call.extract().unwrap()
    }

    /// A deterministic generator of JSON-ish text: mostly valid documents of every shape this
    /// parser takes or refuses, some with one byte changed.
    struct Gen(u64);

    impl Gen {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn pick<'a>(&mut self, options: &[&'a str]) -> &'a str {
            options[(self.next() % options.len() as u64) as usize]
        }
        fn ws(&mut self, out: &mut String) {
            if self.next().is_multiple_of(4) {
                out.push_str(self.pick(&[" ", "\n", "\t ", "\r\n", "  "]));
            }
        }
        fn value(&mut self, out: &mut String, depth: usize) {
            self.ws(out);
            match self.next() % if depth < 6 { 10 } else { 7 } {
                0 => out.push_str(self.pick(&["true", "false", "null", "NaN", "-Infinity", "nul"])),
                1 | 2 => out.push_str(self.pick(&[
                    "0",
                    "-0",
                    "7",
                    "-12",
                    "123456789012345678",
                    "-123456789012345678",
                    "1234567890123456789",
                    "99999999999999999999999",
                    "01",
                    "1.",
                    ".5",
                    "-",
                    "2.5",
                    "-0.0",
                    "1e5",
                    "1E+5",
                    "1e-7",
                    "3.14159e300",
                    "1e400",
                    "-1e-400",
                    "5e-324",
                    "0.1",
                    "1.7976931348623157e308",
                    "1e",
                    "+1",
                    "1.5e+",
                    "00",
                    "1e65536",
                    "1e-70000",
                    "12.5e99999",
                    "0.00000000000000000000000001e-300",
                    "123456789012345678901234567890123456789012345678901234567890.5e-40",
                ])),
                3..=6 => {
                    out.push('"');
                    for _ in 0..self.next() % 6 {
                        out.push_str(self.pick(&[
                            "a",
                            "Z9",
                            " ",
                            "\\\"",
                            "\\\\",
                            "\\/",
                            "\\n",
                            "\\b",
                            "\\f",
                            "\\r",
                            "\\t",
                            "\\u00e9",
                            "\\u0000",
                            "\\u001F",
                            "\\uD83D\\uDE00",
                            "\\ud800",
                            "\\udc00x",
                            "\\uD83Dx",
                            "\\x",
                            "\\u12",
                            "é",
                            "😀",
                            "\u{7f}",
                            "\t",
                            "\u{1}",
                            "\\ud83d\\u0041",
                        ]));
                    }
                    out.push('"');
                }
                7 | 8 => {
                    out.push('[');
                    let n = self.next() % 4;
                    for i in 0..n {
                        if i > 0 {
                            out.push(',');
                        }
                        self.value(out, depth + 1);
                    }
                    if self.next().is_multiple_of(30) {
                        out.push(',');
                    }
                    self.ws(out);
                    out.push(']');
                }
                _ => {
                    out.push('{');
                    let n = self.next() % 4;
                    for i in 0..n {
                        if i > 0 {
                            out.push(',');
                        }
                        self.ws(out);
                        out.push_str(self.pick(&["\"a\"", "\"b\"", "\"a\\u0062\"", "\"\"", "1"]));
                        self.ws(out);
                        out.push(':');
                        self.value(out, depth + 1);
                    }
                    self.ws(out);
                    out.push('}');
                }
            }
            self.ws(out);
        }
    }

    /// Whatever `decode` takes, `json.loads` reads to the same value; and it takes most of what
    /// is valid, so the comparison is not empty.
    #[test]
    fn decode_agrees_with_json_loads() {
        Python::initialize();
        Python::attach(|py| {
            let h = helpers(py);
            let mut gen = Gen(0x9e37_79b9_7f4a_7c15);
            let (mut taken, mut valid) = (0, 0);
            for round in 0..20_000u32 {
                let mut text = String::new();
                gen.value(&mut text, 0);
                if round.is_multiple_of(5) && !text.is_empty() {
                    // One byte changed, where that keeps the text UTF-8.
                    let at = (gen.next() % text.len() as u64) as usize;
                    if text.is_char_boundary(at) && text.is_char_boundary(at + 1) {
                        let with =
                            gen.pick(&["{", "}", "[", "]", ",", ":", "\"", "\\", "0", "x", " "]);
                        text.replace_range(at..at + 1, with);
                    }
                }
                let (ok, slow) = loads(&h, &text);
                valid += usize::from(ok);
                if let Some(fast) = decode(py, &text) {
                    taken += 1;
                    assert!(ok, "decode took what json.loads refuses: {text:?}");
                    assert!(
                        same(&h, &fast, &slow),
                        "decode and json.loads differ on {text:?}: {fast} / {slow}"
                    );
                }
            }
            assert!(
                taken * 10 > valid * 6,
                "decode took {taken} of {valid} valid documents"
            );
        });
    }

    /// Whatever `encode` writes, `json.dumps` with the replica's settings writes the same; it
    /// refuses what `json.dumps` refuses; and it takes most values, so the comparison is not
    /// empty.
    #[test]
    fn encode_agrees_with_json_dumps() {
        Python::initialize();
        Python::attach(|py| {
            let h = helpers(py);
            let rng = h
                .getattr("random")
                .unwrap()
                .getattr("Random")
                .unwrap()
                .call1((7,))
                .unwrap();
            let (mut taken, mut total) = (0, 0);
            for _ in 0..20_000 {
                let value = h.getattr("value").unwrap().call1((&rng,)).unwrap();
                let slow: Option<Vec<u8>> = h
                    .getattr("dumps")
                    .unwrap()
                    .call1((&value,))
                    .unwrap()
                    .extract()
                    .unwrap();
                let mut out = b"before".to_vec();
                total += 1;
                if encode(&value, &mut out) {
                    taken += 1;
                    assert_eq!(
                        Some(&out[6..]),
                        slow.as_deref(),
                        "encode and json.dumps differ on {value}"
                    );
                } else {
                    assert_eq!(
                        out, b"before",
                        "a refused value leaves the output as it was"
                    );
                }
            }
            assert!(taken * 2 > total, "encode took {taken} of {total} values");
        });
    }

    /// What the `json` module must decide is left to it.
    #[test]
    fn edge_cases_go_to_the_json_module() {
        Python::initialize();
        Python::attach(|py| {
            for text in [
                "NaN",
                "Infinity",
                "1234567890123456789",
                "\"\\ud800\"",
                "\"a\nb\"",
                "01",
                "[1,]",
                "{\"a\":1,}",
                "",
                " ",
                "\"\\u12\"",
                "{1:2}",
            ] {
                assert!(decode(py, text).is_none(), "{text:?}");
            }
            let deep = format!("{}{}", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1));
            assert!(decode(py, &deep).is_none());
            let deepest = format!("{}{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
            assert!(decode(py, &deepest).is_some());
            // A refusal leaves no Python error behind.
            assert!(PyErr::take(py).is_none());
            // Numbers too long to be read the same by Rust's parse (0.0 instead of 1.0 here).
            let long = format!("0.{}1e700000", "0".repeat(699_999));
            assert!(decode(py, &long).is_none());
            assert!(decode(py, &format!("1{}", "0".repeat(MAX_NUMBER_LEN))).is_none());
            let value = decode(py, r#" {"a" : [1, 2.5, "x\u00e9\n"], "a": true} "#).unwrap();
            let mut out = Vec::new();
            assert!(encode(&value, &mut out));
            assert_eq!(out, "{\"a\":true}".as_bytes());

            // More distinct keys than the memo holds, repeated over records.
            let h = helpers(py);
            let record = (0..KEY_MEMO + 8)
                .map(|i| format!(r#""k{i}":{i}"#))
                .collect::<Vec<_>>()
                .join(",");
            let text = format!("[{{{record}}},{{{record}}},{{{record}}}]");
            let (ok, slow) = loads(&h, &text);
            assert!(ok);
            assert!(same(&h, &decode(py, &text).unwrap(), &slow));

            // Encoding: as deep as the limit and no deeper; a circular list is refused.
            let nested = |levels: usize| {
                let mut v = PyList::empty(py);
                for _ in 1..levels {
                    v = PyList::new(py, [v]).unwrap();
                }
                v
            };
            let mut out = Vec::new();
            assert!(encode(&nested(MAX_DEPTH), &mut out));
            assert_eq!(out.len(), 2 * MAX_DEPTH);
            let mut out = Vec::new();
            assert!(!encode(&nested(MAX_DEPTH + 1), &mut out));
            let circular = PyList::empty(py);
            circular.append(&circular).unwrap();
            assert!(!encode(&circular, &mut out));
            assert!(out.is_empty());
            circular.del_item(0).unwrap();

            // A long string of many escapes, against `json.dumps`.
            let text = PyString::new(py, &"x\n\u{1}\"é\\".repeat(20_000));
            let mut out = Vec::new();
            assert!(encode(&text, &mut out));
            let slow: Vec<u8> = h
                .getattr("dumps")
                .unwrap()
                .call1((&text,))
                .unwrap()
                .extract()
                .unwrap();
            assert_eq!(out, slow);
            assert!(PyErr::take(py).is_none());
        });
    }
}
