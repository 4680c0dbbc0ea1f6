//! The prediction envelope `{"accessKey": "...", "request": {...}}`, parsed while the body
//! arrives.
//!
//! [`Scanner`] is fed the body's frames as hyper hands them over. It validates the whole body as
//! JSON, decodes `accessKey`, and keeps `request` as it arrived: a request inside one frame, and
//! every piece of [`ZERO_COPY_MIN`] or more of a longer one, as slices of the frames; smaller
//! pieces copied together. So a large body is never gathered into one buffer or parsed after the
//! fact, and the pieces go to the replica in order. It accepts exactly what `serde_json` accepts
//! for the same envelope struct, except that it refuses invalid UTF-8 anywhere (JSON text is
//! UTF-8) and the array form of the envelope; `fuzzing::envelope` checks that against
//! `serde_json` on every input, fed whole, in thirds and a byte per frame.
//!
//! Strings, the bulk of a large body, are skipped with `memchr` (SIMD) for the quote and
//! backslash and a vectorised minimum for control characters; runs of numbers in arrays are
//! parsed in one loop.

use bytes::Bytes;
use modelgate_protocol::json_plain_run;

/// Pieces of a request spread over frames at least this long are kept in place; shorter ones
/// are copied together. hyper's HTTP/1 read buffer is at most 408 KiB, so a kept piece pins at
/// most about three times its size.
const ZERO_COPY_MIN: usize = 128 * 1024;

/// A parsed envelope.
#[derive(Debug)]
pub struct Envelope {
    /// `accessKey`, unescaped.
    pub access_key: String,
    /// The `request` object's JSON text, as slices of the body's frames, in order.
    pub request: Vec<Bytes>,
    /// Length of the whole body.
    pub body_len: usize,
}

impl Envelope {
    /// Length of the request's JSON text.
    pub fn request_len(&self) -> usize {
        self.request.iter().map(Bytes::len).sum()
    }
}

/// Why a body is not a valid envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvelopeError(pub String);

impl std::fmt::Display for EnvelopeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn syntax(what: &str, at: usize) -> EnvelopeError {
    EnvelopeError(format!(
        "request body must be a JSON object with \"accessKey\" and \"request\": {what} at byte {at}"
    ))
}

/// Where the parser is between bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    /// Expecting a value.
    Value,
    /// After `{`: a key or `}`.
    FirstKeyOrEnd,
    /// After `,` in an object: a key.
    Key,
    /// After a key: `:`.
    Colon,
    /// After `[`: a value or `]`.
    FirstValueOrEnd,
    /// After a value: `,`, a closing bracket, or the end of the body at the top.
    After,
    /// Inside a string.
    Str,
    /// After a backslash in a string.
    Escape,
    /// Inside `\uXXXX`, with this many hex digits to go.
    Hex(u8),
    Num(Num),
    /// Inside `true`, `false` or `null`: the literal and how much of it was seen.
    Literal(&'static [u8], u8),
    /// The top-level object is complete: only whitespace may follow.
    Done,
}

/// Position in the number grammar `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Num {
    /// After `-`.
    Minus,
    /// After a leading `0`.
    Zero,
    Int,
    /// After `.`.
    Dot,
    Frac,
    /// After `e`.
    E,
    /// After the exponent's sign.
    ESign,
    Exp,
}

impl Num {
    fn complete(self) -> bool {
        matches!(self, Num::Zero | Num::Int | Num::Frac | Num::Exp)
    }
}

/// What the string being read is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StrKind {
    /// A key of the top-level object: collected and decoded.
    TopKey,
    /// The value of `accessKey`: collected and decoded.
    AccessKey,
    /// A key of a nested object.
    Key,
    /// A string value.
    Other,
}

/// Which top-level field the value being read belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    AccessKey,
    Request,
    Other,
}

/// The envelope parser; see the module documentation.
#[derive(Debug)]
pub struct Scanner {
    st: St,
    /// Open containers, `{` or `[`; the top-level object is the first.
    stack: Vec<u8>,
    /// Bytes fed so far.
    offset: usize,
    str_kind: StrKind,
    /// The raw text (quotes included) of a top-level key or of `accessKey`'s string.
    collected: Vec<u8>,
    field: Field,
    access_key: Option<Option<String>>,
    /// `Some(None)` when `request` was `null`.
    request_seen: Option<Option<RequestKind>>,
    /// Whether the request's text is being kept, and from where in the current frame.
    keeping: Option<usize>,
    request: Vec<Bytes>,
    /// Small pieces of the request, copied together (see [`ZERO_COPY_MIN`]).
    small: bytes::BytesMut,
    /// An incomplete UTF-8 sequence at the end of the previous frame.
    utf8_carry: [u8; 4],
    utf8_carry_len: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RequestKind {
    Object,
    NotObject,
}

impl Default for Scanner {
    fn default() -> Self {
        Scanner::new()
    }
}

impl Scanner {
    pub fn new() -> Scanner {
        Scanner {
            st: St::Value,
            stack: Vec::new(),
            offset: 0,
            str_kind: StrKind::Other,
            collected: Vec::new(),
            field: Field::Other,
            access_key: None,
            request_seen: None,
            keeping: None,
            request: Vec::new(),
            small: bytes::BytesMut::new(),
            utf8_carry: [0; 4],
            utf8_carry_len: 0,
        }
    }

    /// Parses one more frame of the body. The request's slices of it are kept (a reference count,
    /// not a copy).
    pub fn feed(&mut self, frame: &Bytes) -> Result<(), EnvelopeError> {
        self.check_utf8(frame)?;
        let bytes = &frame[..];
        let mut i = 0;
        while i < bytes.len() {
            i = self.step(frame, bytes, i)?;
        }
        if let Some(from) = self.keeping {
            if from < bytes.len() {
                self.keep(frame.slice(from..));
            }
            // The request goes on in the next frame, from its start.
            self.keeping = Some(0);
        }
        self.offset += bytes.len();
        Ok(())
    }

    /// `accessKey`, once its string has been read.
    pub fn access_key(&self) -> Option<&str> {
        self.access_key.as_ref()?.as_deref()
    }

    /// The pieces of the request's text kept so far, in order. Pieces are only ever added (the
    /// last, and any small ones, when the body ends), never changed.
    pub fn request_so_far(&self) -> &[Bytes] {
        &self.request
    }

    /// Ends the body: the envelope, or why it is not one.
    pub fn finish(mut self) -> Result<Envelope, EnvelopeError> {
        let at = self.offset;
        if self.utf8_carry_len > 0 {
            return Err(syntax("invalid UTF-8", at));
        }
        match self.st {
            St::Done => {}
            St::Value if self.offset == 0 || self.stack.is_empty() => {
                return Err(syntax("empty body", at))
            }
            _ => return Err(syntax("unexpected end of the body", at)),
        }
        let access_key = match self.access_key.take() {
            Some(Some(key)) => key,
            _ => return Err(EnvelopeError("missing \"accessKey\"".into())),
        };
        match self.request_seen {
            Some(Some(RequestKind::Object)) => {
                self.flush_small();
                Ok(Envelope {
                    access_key,
                    request: self.request,
                    body_len: self.offset,
                })
            }
            Some(Some(RequestKind::NotObject)) => {
                Err(EnvelopeError("\"request\" must be a JSON object".into()))
            }
            _ => Err(EnvelopeError("missing \"request\"".into())),
        }
    }

    /// Handles the byte at `i` (and, in a string, the run of plain bytes after it); returns the
    /// index of the next byte to look at.
    #[inline]
    fn step(&mut self, frame: &Bytes, bytes: &[u8], i: usize) -> Result<usize, EnvelopeError> {
        let b = bytes[i];
        let at = self.offset + i;
        match self.st {
            St::Str => {
                let rest = &bytes[i..];
                let run = json_plain_run(rest);
                if matches!(self.str_kind, StrKind::TopKey | StrKind::AccessKey) {
                    self.collected.extend_from_slice(&rest[..run]);
                }
                let j = i + run;
                if j == bytes.len() {
                    return Ok(j);
                }
                let c = bytes[j];
                self.collect(c);
                match c {
                    b'"' => self.end_string(frame, j)?,
                    b'\\' => self.st = St::Escape,
                    _ => return Err(syntax("control character in a string", self.offset + j)),
                }
                return Ok(j + 1);
            }
            St::Escape => {
                self.collect(b);
                self.st = match b {
                    b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => St::Str,
                    b'u' => St::Hex(4),
                    _ => return Err(syntax("invalid escape", at)),
                };
            }
            St::Hex(left) => {
                if !b.is_ascii_hexdigit() {
                    return Err(syntax("invalid \\u escape", at));
                }
                self.collect(b);
                self.st = if left == 1 {
                    St::Str
                } else {
                    St::Hex(left - 1)
                };
            }
            St::Num(n @ (Num::Int | Num::Frac | Num::Exp)) if b.is_ascii_digit() => {
                // A run of digits, the bulk of a numeric array, in one go.
                let run = bytes[i..].iter().take_while(|b| b.is_ascii_digit()).count();
                self.st = St::Num(n);
                return Ok(i + run);
            }
            St::Num(n) => {
                let next = match (n, b) {
                    (Num::Minus, b'0') => Some(Num::Zero),
                    (Num::Minus, b'1'..=b'9') => Some(Num::Int),
                    (Num::Int, b'0'..=b'9') => Some(Num::Int),
                    (Num::Zero | Num::Int, b'.') => Some(Num::Dot),
                    (Num::Dot | Num::Frac, b'0'..=b'9') => Some(Num::Frac),
                    (Num::Zero | Num::Int | Num::Frac, b'e' | b'E') => Some(Num::E),
                    (Num::E, b'+' | b'-') => Some(Num::ESign),
                    (Num::E | Num::ESign | Num::Exp, b'0'..=b'9') => Some(Num::Exp),
                    _ => None,
                };
                match next {
                    Some(n) => self.st = St::Num(n),
                    None if n.complete() => {
                        // The number ended before this byte, which is looked at afresh.
                        self.value_done(frame, i);
                        return Ok(i);
                    }
                    None => return Err(syntax("invalid number", at)),
                }
            }
            St::Literal(word, seen) => {
                if b != word[seen as usize] {
                    return Err(syntax("invalid literal", at));
                }
                if seen as usize + 1 == word.len() {
                    self.value_done(frame, i + 1);
                } else {
                    self.st = St::Literal(word, seen + 1);
                }
            }
            _ if is_space(b) => {}
            St::Value | St::FirstValueOrEnd
                if self.stack.len() >= 2 && (b == b'-' || b.is_ascii_digit()) =>
            {
                if let Some(next) = self.numbers(bytes, i)? {
                    return Ok(next);
                }
                self.value_start(b, i)?;
            }
            St::Value => self.value_start(b, i)?,
            St::FirstValueOrEnd if b == b']' => self.close(frame, b, i)?,
            St::FirstValueOrEnd => self.value_start(b, i)?,
            St::FirstKeyOrEnd if b == b'}' => self.close(frame, b, i)?,
            St::FirstKeyOrEnd | St::Key => {
                if b != b'"' {
                    return Err(syntax("expected a key", at));
                }
                self.begin_string(if self.stack.len() == 1 {
                    StrKind::TopKey
                } else {
                    StrKind::Key
                });
            }
            St::Colon => {
                if b != b':' {
                    return Err(syntax("expected ':'", at));
                }
                self.st = St::Value;
            }
            St::After => match (b, self.stack.last()) {
                (b',', Some(b'{')) => self.st = St::Key,
                (b',', Some(_)) => self.st = St::Value,
                (b'}' | b']', Some(_)) => self.close(frame, b, i)?,
                _ => return Err(syntax("expected ',' or a closing bracket", at)),
            },
            St::Done => return Err(syntax("trailing characters", at)),
        }
        Ok(i + 1)
    }

    /// Numbers inside the request (or any nested value), the bulk of a feature vector: a run of
    /// `n, n, n` in an array is parsed in one go. Returns the index after the run, or `None` when
    /// the first number reaches the end of the frame (the byte-wise states take it from there).
    fn numbers(&mut self, bytes: &[u8], i: usize) -> Result<Option<usize>, EnvelopeError> {
        let mut k = i;
        loop {
            match number_len(&bytes[k..]) {
                Err(at) => return Err(syntax("invalid number", self.offset + k + at)),
                Ok(None) if k == i => return Ok(None),
                Ok(None) => {
                    // The next number straddles frames: leave it to the byte-wise states.
                    self.st = St::Value;
                    return Ok(Some(k));
                }
                Ok(Some(len)) => k += len,
            }
            while k < bytes.len() && is_space(bytes[k]) {
                k += 1;
            }
            if k < bytes.len() && bytes[k] == b',' && self.stack.last() == Some(&b'[') {
                let mut m = k + 1;
                while m < bytes.len() && is_space(bytes[m]) {
                    m += 1;
                }
                if m < bytes.len() && (bytes[m] == b'-' || bytes[m].is_ascii_digit()) {
                    k = m;
                    continue;
                }
            }
            self.st = St::After;
            return Ok(Some(k));
        }
    }

    /// Keeps a piece of the request spread over frames. A frame's slice pins the whole read
    /// buffer hyper filled, so only large pieces are kept in place; small ones (a body trickled
    /// in tiny frames) are copied together, which bounds both the memory a request pins and the
    /// number of writes to the replica.
    fn keep(&mut self, piece: Bytes) {
        if piece.len() >= ZERO_COPY_MIN {
            self.flush_small();
            self.request.push(piece);
        } else {
            self.small.extend_from_slice(&piece);
            // Passed on once it is as long as a kept piece: the buffer never grows (and copies
            // itself) past about twice that.
            if self.small.len() >= ZERO_COPY_MIN {
                self.flush_small();
            }
        }
    }

    fn flush_small(&mut self) {
        if !self.small.is_empty() {
            self.request.push(self.small.split().freeze());
        }
    }

    fn collect(&mut self, b: u8) {
        if matches!(self.str_kind, StrKind::TopKey | StrKind::AccessKey) {
            self.collected.push(b);
        }
    }

    fn begin_string(&mut self, kind: StrKind) {
        self.str_kind = kind;
        self.collected.clear();
        if matches!(kind, StrKind::TopKey | StrKind::AccessKey) {
            // One allocation for every key and the access key of a body, not one per doubling.
            self.collected.reserve(64);
            self.collected.push(b'"');
        }
        self.st = St::Str;
    }

    /// The closing quote at `j` ended a string.
    fn end_string(&mut self, frame: &Bytes, j: usize) -> Result<(), EnvelopeError> {
        match self.str_kind {
            StrKind::TopKey => {
                // The two names that matter are compared as bytes; only a key with escapes is
                // decoded. Any other key needs no decoding: its bytes were (or, at the end of a
                // frame that splits a UTF-8 sequence, will be) checked as UTF-8 with the body.
                self.field = match &self.collected[..] {
                    b"\"accessKey\"" => Field::AccessKey,
                    b"\"request\"" => Field::Request,
                    raw if raw.contains(&b'\\') => {
                        let key = unquote(raw)
                            .map_err(|e| syntax(&format!("invalid key ({e})"), self.offset + j))?;
                        match &*key {
                            "accessKey" => Field::AccessKey,
                            "request" => Field::Request,
                            _ => Field::Other,
                        }
                    }
                    _ => Field::Other,
                };
                let seen = match self.field {
                    Field::AccessKey => self.access_key.is_some(),
                    Field::Request => self.request_seen.is_some(),
                    Field::Other => false,
                };
                if seen {
                    let name = match self.field {
                        Field::AccessKey => "accessKey",
                        _ => "request",
                    };
                    return Err(EnvelopeError(format!("duplicate field {name:?}")));
                }
                self.st = St::Colon;
            }
            StrKind::AccessKey => {
                let key = unquote(&self.collected).map_err(|e| {
                    syntax(&format!("invalid \"accessKey\" ({e})"), self.offset + j)
                })?;
                self.access_key = Some(Some(key.into_owned()));
                if self.collected.capacity() > 1024 {
                    // A long access key (it will not match): do not keep its text twice.
                    self.collected = Vec::new();
                }
                self.value_done(frame, j + 1);
            }
            StrKind::Key => self.st = St::Colon,
            StrKind::Other => self.value_done(frame, j + 1),
        }
        Ok(())
    }

    /// The first byte `b` of a value, at `i`.
    fn value_start(&mut self, b: u8, i: usize) -> Result<(), EnvelopeError> {
        let at = self.offset + i;
        if self.stack.is_empty() && b != b'{' {
            return Err(syntax("expected a JSON object", at));
        }
        let top_field = (self.stack.len() == 1).then_some(self.field);
        match top_field {
            Some(Field::AccessKey) => {
                if b == b'"' {
                    self.begin_string(StrKind::AccessKey);
                    return Ok(());
                }
                if b != b'n' {
                    return Err(EnvelopeError("\"accessKey\" must be a string".into()));
                }
                self.access_key = Some(None);
            }
            Some(Field::Request) => {
                self.request_seen = Some(match b {
                    b'{' => Some(RequestKind::Object),
                    b'n' => None,
                    _ => Some(RequestKind::NotObject),
                });
                if b == b'{' {
                    self.keeping = Some(i);
                }
            }
            _ => {}
        }
        match b {
            b'{' => {
                self.stack.push(b'{');
                self.st = St::FirstKeyOrEnd;
            }
            b'[' => {
                self.stack.push(b'[');
                self.st = St::FirstValueOrEnd;
            }
            b'"' => self.begin_string(StrKind::Other),
            b'-' => self.st = St::Num(Num::Minus),
            b'0' => self.st = St::Num(Num::Zero),
            b'1'..=b'9' => self.st = St::Num(Num::Int),
            b't' => self.st = St::Literal(b"true", 1),
            b'f' => self.st = St::Literal(b"false", 1),
            b'n' => self.st = St::Literal(b"null", 1),
            _ => return Err(syntax("expected a value", at)),
        }
        Ok(())
    }

    /// A closing bracket `b` at `i`.
    fn close(&mut self, frame: &Bytes, b: u8, i: usize) -> Result<(), EnvelopeError> {
        let want = if b == b'}' { b'{' } else { b'[' };
        if self.stack.pop() != Some(want) {
            return Err(syntax("mismatched bracket", self.offset + i));
        }
        self.value_done(frame, i + 1);
        Ok(())
    }

    /// A value ended just before `end` (an index into the current frame).
    fn value_done(&mut self, frame: &Bytes, end: usize) {
        if self.stack.len() == 1 && self.field == Field::Request {
            if let Some(from) = self.keeping.take() {
                if from < end {
                    if self.request.is_empty() && self.small.is_empty() {
                        // The whole request in one frame: kept as is, whatever its size.
                        self.request.push(frame.slice(from..end));
                    } else {
                        self.keep(frame.slice(from..end));
                    }
                }
            }
        }
        if self.stack.len() == 1 {
            self.field = Field::Other;
        }
        self.st = if self.stack.is_empty() {
            St::Done
        } else {
            St::After
        };
    }

    /// Validates `frame` as the next part of a UTF-8 text.
    fn check_utf8(&mut self, frame: &[u8]) -> Result<(), EnvelopeError> {
        let mut data = frame;
        if self.utf8_carry_len > 0 {
            let have = self.utf8_carry_len as usize;
            let width = utf8_width(self.utf8_carry[0]);
            let take = (width - have).min(data.len());
            self.utf8_carry[have..have + take].copy_from_slice(&data[..take]);
            self.utf8_carry_len += take as u8;
            data = &data[take..];
            if (self.utf8_carry_len as usize) < width {
                return Ok(());
            }
            if std::str::from_utf8(&self.utf8_carry[..width]).is_err() {
                return Err(syntax("invalid UTF-8", self.offset));
            }
            self.utf8_carry_len = 0;
        }
        match simdutf8::compat::from_utf8(data) {
            Ok(_) => Ok(()),
            Err(e) if e.error_len().is_none() => {
                let rest = &data[e.valid_up_to()..];
                self.utf8_carry[..rest.len()].copy_from_slice(rest);
                self.utf8_carry_len = rest.len() as u8;
                Ok(())
            }
            Err(e) => Err(syntax(
                "invalid UTF-8",
                self.offset + (frame.len() - data.len()) + e.valid_up_to(),
            )),
        }
    }
}

/// The text of a complete JSON string (quotes included) from a body already checked to be UTF-8:
/// sliced when it has no escapes, else decoded by `serde_json` (which also refuses lone
/// surrogates, as it does for these two strings in the reference parse).
fn unquote(raw: &[u8]) -> Result<std::borrow::Cow<'_, str>, String> {
    let inner = &raw[1..raw.len() - 1];
    if !inner.contains(&b'\\') {
        return std::str::from_utf8(inner)
            .map(std::borrow::Cow::Borrowed)
            .map_err(|e| e.to_string());
    }
    serde_json::from_slice::<String>(raw)
        .map(std::borrow::Cow::Owned)
        .map_err(|e| e.to_string())
}

/// Bytes of a UTF-8 sequence starting with `lead` (a valid lead byte of an incomplete one).
fn utf8_width(lead: u8) -> usize {
    match lead {
        0xF0..=0xF7 => 4,
        0xE0..=0xEF => 3,
        _ => 2,
    }
}

/// The length of the number at the start of `s` when a byte that cannot continue it follows
/// within `s`; `None` when `s` ends first; the offset of the offending byte when it is not a
/// number. Grammar: `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`.
fn number_len(s: &[u8]) -> Result<Option<usize>, usize> {
    let digits = |mut k: usize| {
        while k < s.len() && s[k].is_ascii_digit() {
            k += 1;
        }
        k
    };
    let mut k = usize::from(s.first() == Some(&b'-'));
    match s.get(k) {
        None => return Ok(None),
        Some(b'0') => k += 1,
        Some(b'1'..=b'9') => k = digits(k + 1),
        Some(_) => return Err(k),
    }
    if s.get(k) == Some(&b'.') {
        match s.get(k + 1) {
            None => return Ok(None),
            Some(d) if d.is_ascii_digit() => k = digits(k + 2),
            Some(_) => return Err(k + 1),
        }
    }
    if matches!(s.get(k), Some(b'e' | b'E')) {
        k += 1;
        if matches!(s.get(k), Some(b'+' | b'-')) {
            k += 1;
        }
        match s.get(k) {
            None => return Ok(None),
            Some(d) if d.is_ascii_digit() => k = digits(k + 1),
            Some(_) => return Err(k),
        }
    }
    Ok((k < s.len()).then_some(k))
}

fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// Parses a whole body held in one buffer.
pub fn parse(body: &Bytes) -> Result<Envelope, EnvelopeError> {
    if let Some(envelope) = parse_plain(body) {
        return Ok(envelope);
    }
    let mut scanner = Scanner::new();
    scanner.feed(body)?;
    scanner.finish()
}

/// The common body in one pass over one buffer: at most [`PLAIN_MAX_LEN`] bytes of ASCII, no
/// escape in any string, the two fields once each, `request` an object, nesting at most
/// [`PLAIN_MAX_DEPTH`] deep. `None` for
/// anything else, valid or not, which [`Scanner`] then parses: so this never decides an error,
/// and what it accepts the scanner accepts with the same result (`fuzzing::envelope` checks
/// both on every input). It costs about a third of the scanner's instructions on a small body:
/// no state per byte, no buffer for the keys, no stack on the heap.
pub fn parse_plain(body: &Bytes) -> Option<Envelope> {
    let b = &body[..];
    if b.len() > PLAIN_MAX_LEN || !b.is_ascii() {
        return None;
    }
    let mut p = Plain { b, i: 0 };
    p.ws();
    p.expect(b'{')?;
    let mut access_key = None;
    let mut request = None;
    loop {
        p.ws();
        let key = p.string()?;
        p.ws();
        p.expect(b':')?;
        p.ws();
        match key {
            b"accessKey" if access_key.is_none() => access_key = Some(p.string()?),
            b"request" if request.is_none() && p.peek() == Some(b'{') => {
                let start = p.i;
                p.value()?;
                request = Some(start..p.i);
            }
            b"accessKey" | b"request" => return None,
            _ => p.value()?,
        }
        p.ws();
        match p.next()? {
            b',' => continue,
            b'}' => break,
            _ => return None,
        }
    }
    p.ws();
    if p.i != b.len() {
        return None;
    }
    // ASCII, so UTF-8.
    let access_key = std::str::from_utf8(access_key?).ok()?.to_owned();
    Some(Envelope {
        access_key,
        request: vec![body.slice(request?)],
        body_len: b.len(),
    })
}

/// A mask with the high bit of each byte of `word` (ASCII, little-endian) that is a quote, a
/// backslash or a control character. Only the lowest set bit is exact: a borrow may set bits
/// above it, which the caller never reads.
fn stops_in(word: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let zero_byte = |v: u64| v.wrapping_sub(ONES) & !v & HIGH;
    let quote = zero_byte(word ^ (ONES * u64::from(b'"')));
    let backslash = zero_byte(word ^ (ONES * u64::from(b'\\')));
    // Bytes below 0x20: with no byte at 0x80 or above, subtracting 0x20 from each borrows into
    // the high bit exactly where it was below.
    let control = word.wrapping_sub(ONES * 0x20) & !word & HIGH;
    quote | backslash | control
}

/// The longest body [`parse_plain`] takes: past it, a body it gives up on late (an escape near
/// the end) would cost a second pass that matters.
const PLAIN_MAX_LEN: usize = 64 * 1024;

/// Deepest nesting [`parse_plain`] takes (one bit of its stack per level).
const PLAIN_MAX_DEPTH: u32 = 128;

/// [`parse_plain`]'s cursor; every method returns `None` where the plain grammar ends.
struct Plain<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Plain<'a> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.i += 1;
        Some(c)
    }

    fn expect(&mut self, c: u8) -> Option<()> {
        (self.next()? == c).then_some(())
    }

    fn ws(&mut self) {
        while self.i < self.b.len() && is_space(self.b[self.i]) {
            self.i += 1;
        }
    }

    /// A string with no escape; its text without the quotes.
    fn string(&mut self) -> Option<&'a [u8]> {
        self.expect(b'"')?;
        let b: &'a [u8] = self.b;
        let rest = &b[self.i..];
        // Most strings of a small body are short: eight bytes at a time finds their end before
        // `json_plain_run`'s vector search has paid for its setup.
        let mut run = 0;
        loop {
            let Some(word) = rest.get(run..run + 8) else {
                // Fewer than eight bytes left.
                run += rest[run..]
                    .iter()
                    .position(|&c| c == b'"' || c == b'\\' || c < 0x20)
                    .unwrap_or(rest.len() - run);
                break;
            };
            let stops = stops_in(u64::from_le_bytes(word.try_into().ok()?));
            if stops != 0 {
                run += stops.trailing_zeros() as usize / 8;
                break;
            }
            run += 8;
            if run == 32 {
                run += json_plain_run(&rest[run..]);
                break;
            }
        }
        if rest.get(run) != Some(&b'"') {
            return None;
        }
        self.i += run + 1;
        Some(&rest[..run])
    }

    /// Any value, whitespace before it skipped, nothing after it.
    fn value(&mut self) -> Option<()> {
        // Open containers, innermost in bit 0: 1 for an object, 0 for an array.
        let mut stack: u128 = 0;
        let mut depth = 0;
        'value: loop {
            self.ws();
            match self.next()? {
                open @ (b'{' | b'[') => {
                    self.ws();
                    let close = if open == b'{' { b'}' } else { b']' };
                    if self.peek() == Some(close) {
                        self.i += 1;
                    } else {
                        if depth == PLAIN_MAX_DEPTH {
                            return None;
                        }
                        depth += 1;
                        stack = stack << 1 | u128::from(open == b'{');
                        if open == b'{' {
                            self.key()?;
                        }
                        continue 'value;
                    }
                }
                b'"' => {
                    self.i -= 1;
                    self.string()?;
                }
                b't' => self.literal(b"rue")?,
                b'f' => self.literal(b"alse")?,
                b'n' => self.literal(b"ull")?,
                b'-' | b'0'..=b'9' => {
                    self.i -= 1;
                    self.i += number_len(&self.b[self.i..]).ok()??;
                }
                _ => return None,
            }
            // After a value: a comma goes on to the next, a bracket closes its container.
            loop {
                if depth == 0 {
                    return Some(());
                }
                self.ws();
                let object = stack & 1 == 1;
                match self.next()? {
                    b',' => {
                        if object {
                            self.key()?;
                        }
                        continue 'value;
                    }
                    b'}' if object => {}
                    b']' if !object => {}
                    _ => return None,
                }
                stack >>= 1;
                depth -= 1;
            }
        }
    }

    /// A key and its colon, whitespace around them skipped.
    fn key(&mut self) -> Option<()> {
        self.ws();
        self.string()?;
        self.ws();
        self.expect(b':')
    }

    fn literal(&mut self, rest: &[u8]) -> Option<()> {
        let end = self.i + rest.len();
        (self.b.get(self.i..end)? == rest).then(|| self.i = end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(request: &[Bytes]) -> Vec<u8> {
        request.iter().flat_map(|b| b.iter().copied()).collect()
    }

    /// Every split of `body` into two and three frames gives the same result as one frame.
    fn parse_all_ways(body: &[u8]) -> Result<(String, Vec<u8>), EnvelopeError> {
        let one = parse(&Bytes::copy_from_slice(body)).map(|e| (e.access_key, whole(&e.request)));
        for i in 0..=body.len() {
            for j in i..=body.len() {
                let mut s = Scanner::new();
                let r = [&body[..i], &body[i..j], &body[j..]]
                    .iter()
                    .try_for_each(|part| s.feed(&Bytes::copy_from_slice(part)))
                    .and_then(|()| s.finish())
                    .map(|e| (e.access_key, whole(&e.request)));
                assert_eq!(
                    r.is_ok(),
                    one.is_ok(),
                    "split at {i},{j} of {:?}: {r:?} vs {one:?}",
                    String::from_utf8_lossy(body)
                );
                if let (Ok(a), Ok(b)) = (&r, &one) {
                    assert_eq!(a, b);
                }
            }
        }
        one
    }

    #[test]
    fn accepts_envelopes_in_any_framing() {
        let (key, request) = parse_all_ways(
            br#" {"accessKey":"k1", "request" : {"a":[1,-2.5e+3,"x\"y"],"b":null} } "#,
        )
        .unwrap();
        assert_eq!(key, "k1");
        assert_eq!(request, br#"{"a":[1,-2.5e+3,"x\"y"],"b":null}"#);
        let (key, _) =
            parse_all_ways(br#"{"request":{},"\u0061ccessKey":"k\u0031","x":[true,false,0]}"#)
                .unwrap();
        assert_eq!(key, "k1");
        let (_, request) =
            parse_all_ways("{\"accessKey\":\"é\",\"request\":{\"ü\":\"€𝄞\"}}".as_bytes()).unwrap();
        assert_eq!(request, "{\"ü\":\"€𝄞\"}".as_bytes());
        let (_, request) = parse_all_ways(
            br#"{"accessKey":"k","request":{"v":[1, -2,3.5e-1 ,0],"w":[0,"x",1],"z":-0}}"#,
        )
        .unwrap();
        assert_eq!(request, br#"{"v":[1, -2,3.5e-1 ,0],"w":[0,"x",1],"z":-0}"#);
    }

    /// Bodies that are not envelopes, each for a reason of its own.
    const REFUSED: &[&[u8]] = &[
        b"",
        b"   ",
        b"not json",
        br#"{"request":{}}"#,
        br#"{"accessKey":"k"}"#,
        br#"{"accessKey":null,"request":{}}"#,
        br#"{"accessKey":"k","request":null}"#,
        br#"{"accessKey":5,"request":{}}"#,
        br#"{"accessKey":"k","request":[1]}"#,
        br#"{"accessKey":"k","request":{}"#,
        br#"{"accessKey":"k","request":{}} x"#,
        br#"{"accessKey":"k","accessKey":"k","request":{}}"#,
        br#"{"accessKey":"k","request":{},"request":{}}"#,
        br#"{"accessKey":"k","\u0061ccessKey":"k","request":{}}"#,
        br#"{"request":{},"accessKey":"k","requ\u0065st":{}}"#,
        br#"{"\ud800":1,"accessKey":"k","request":{}}"#,
        br#"{"accessKey":"k","request":{"a":01}}"#,
        br#"{"accessKey":"k","request":{"a":[01]}}"#,
        br#"{"accessKey":"k","request":{"a":[1,-]}}"#,
        br#"{"accessKey":"k","request":{"a":[1.e5]}}"#,
        br#"{"accessKey":"k","request":{"a":[1 2]}}"#,
        br#"{"accessKey":"k","request":{"a":1.}}"#,
        br#"{"accessKey":"k","request":{"a":-}}"#,
        br#"{"accessKey":"k","request":{"a":"\x"}}"#,
        br#"{"accessKey":"k","request":{"a":"\u12"}}"#,
        br#"{"accessKey":"k","request":{"a":tru}}"#,
        br#"{"accessKey":"k","request":{"a":[1,]}}"#,
        br#"{"accessKey":"k","request":{"a":1,}}"#,
        br#"{"accessKey":"k","request":{"a" 1}}"#,
        br#"{"accessKey":"k","request":{"a":[}}"#,
        br#"{"accessKey":"\ud800","request":{}}"#,
        b"{\"accessKey\":\"k\",\"request\":{\"a\":\"\x01\"}}",
        b"{\"accessKey\":\"k\",\"request\":{\"a\":\"\xff\"}}",
        br#"[]"#,
        br#"["k",{}]"#,
    ];

    #[test]
    fn refuses_what_is_not_an_envelope() {
        for &bad in REFUSED {
            assert!(
                parse_all_ways(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    /// What the one-pass parse takes, the scanner takes with the same result.
    fn plain_agrees(body: &[u8]) -> bool {
        let bytes = Bytes::copy_from_slice(body);
        let Some(plain) = parse_plain(&bytes) else {
            return false;
        };
        let mut s = Scanner::new();
        s.feed(&bytes).unwrap();
        let scanned = s.finish().unwrap();
        assert_eq!(plain.access_key, scanned.access_key);
        assert_eq!(whole(&plain.request), whole(&scanned.request));
        assert_eq!(plain.body_len, scanned.body_len);
        true
    }

    #[test]
    fn the_one_pass_parse_takes_plain_bodies_as_the_scanner_does() {
        for body in [
            &br#"{"accessKey":"k","request":{"a":3,"b":5}}"#[..],
            br#" { "request" : { "petal_length" : [1.4, -0.2e-3, 0] } , "accessKey" : "mabc" } "#,
            br#"{"x":[[],{},[{"y":[true,false,null,"s"]}]],"accessKey":"k","request":{"n":{"m":{}}},"z":-0.5E+2}"#,
            b"{\n\t\"accessKey\": \"k\",\r\n\"request\": {\"a\": [1, 2, 3]}\n}\n",
        ] {
            assert!(plain_agrees(body), "{:?}", String::from_utf8_lossy(body));
        }
        // A string longer than the short loop looks at.
        let long = format!(
            r#"{{"accessKey":"k","request":{{"text":"{}"}}}}"#,
            "x".repeat(100)
        );
        assert!(plain_agrees(long.as_bytes()));
        // Nesting up to the limit (the request's own object is one level).
        let depth = PLAIN_MAX_DEPTH as usize;
        let deep = format!(
            r#"{{"accessKey":"k","request":{}{}"#,
            r#"{"a":"#.repeat(depth) + "1",
            "}".repeat(depth + 1)
        );
        assert!(plain_agrees(deep.as_bytes()));
    }

    #[test]
    fn the_one_pass_parse_leaves_everything_else_to_the_scanner() {
        let deeper = format!(
            r#"{{"accessKey":"k","request":{}{}"#,
            r#"{"a":"#.repeat(PLAIN_MAX_DEPTH as usize + 1) + "1",
            "}".repeat(PLAIN_MAX_DEPTH as usize + 2)
        );
        let too_long = format!(
            r#"{{"accessKey":"k","request":{{"t":"{}"}}}}"#,
            "x".repeat(PLAIN_MAX_LEN)
        );
        let escaped_late = format!(
            r#"{{"accessKey":"k","request":{{"t":"{}\n"}}}}"#,
            "x".repeat(40)
        );
        for body in [
            // Valid, but not plain: escapes, non-ASCII, too deep, too long.
            escaped_late.as_bytes(),
            too_long.as_bytes(),
            &br#"{"accessKey":"k\u0031","request":{}}"#[..],
            br#"{"accessKey":"k","request":{"a":"x\"y"}}"#,
            br#"{"\u0061ccessKey":"k","request":{}}"#,
            "{\"accessKey\":\"é\",\"request\":{}}".as_bytes(),
            deeper.as_bytes(),
        ] {
            assert!(!plain_agrees(body), "{:?}", String::from_utf8_lossy(body));
            let mut s = Scanner::new();
            s.feed(&Bytes::copy_from_slice(body)).unwrap();
            assert!(s.finish().is_ok());
        }
    }

    #[test]
    fn the_one_pass_parse_never_takes_an_invalid_body() {
        // Every refused body of `refuses_what_is_not_an_envelope`.
        let mut control_late = br#"{"accessKey":"k","request":{"t":""#.to_vec();
        control_late.extend_from_slice(&[b'x'; 40]);
        control_late.extend_from_slice(b"\x01\"}}");
        // And a few more, past the one-pass parse's short-string loop or in its own grammar.
        let more: [&[u8]; 5] = [
            br#"{"accessKey":"k","request":{"a":[1}}"#,
            br#"{"accessKey":"k","request":{"a":{1:2}}}"#,
            br#"{"accessKey":"k","request":{}},"#,
            br#"{}"#,
            &control_late,
        ];
        for bad in REFUSED.iter().copied().chain(more) {
            assert!(
                parse_plain(&Bytes::copy_from_slice(bad)).is_none(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
            assert!(parse_all_ways(bad).is_err());
        }
    }

    #[test]
    fn plain_strings_end_where_a_byte_by_byte_scan_says() {
        // Neighbours of the stop bytes must not stop it: ! # [ ] space DEL.
        let fillers = [b'a', b'!', b'#', b'[', b']', b' ', 0x7f];
        for len in 0..80 {
            for stop in [
                None,
                Some(b'"'),
                Some(b'\\'),
                Some(0x01),
                Some(0x1f),
                Some(0x00),
            ] {
                for at in 0..len.max(1) {
                    let mut text: Vec<u8> = (0..len).map(|i| fillers[i % fillers.len()]).collect();
                    if let Some(c) = stop {
                        if at >= len {
                            continue;
                        }
                        text[at] = c;
                    }
                    let mut input = vec![b'"'];
                    input.extend_from_slice(&text);
                    input.push(b'"');
                    let mut p = Plain { b: &input, i: 0 };
                    let expected = match stop {
                        None => Some(&text[..]),
                        Some(b'"') => Some(&text[..at]),
                        Some(_) => None,
                    };
                    assert_eq!(p.string(), expected, "{len} {stop:?} at {at}");
                }
            }
        }
    }

    #[test]
    fn large_frames_are_kept_in_place_and_small_ones_copied_together() {
        let pad = "x".repeat(1_000_000);
        let body = Bytes::from(format!(
            r#"{{"accessKey":"k","request":{{"pad":"{pad}"}}}}"#
        ));
        let framed = |size: usize| {
            let mut s = Scanner::new();
            for chunk in body.chunks(size) {
                s.feed(&body.slice_ref(chunk)).unwrap();
            }
            s.finish().unwrap()
        };
        // 256 KB frames: the request is those frames' slices, not a copy.
        let e = framed(256 * 1024);
        assert_eq!(e.request_len(), pad.len() + 10);
        assert_eq!(e.body_len, body.len());
        let (lo, hi) = (body.as_ptr() as usize, body.as_ptr() as usize + body.len());
        let in_place = e
            .request
            .iter()
            .filter(|p| (lo..hi).contains(&(p.as_ptr() as usize)))
            .map(|p| p.len())
            .sum::<usize>();
        assert!(in_place >= pad.len() - 2 * ZERO_COPY_MIN, "{in_place}");
        // Trickled in small frames: copied together into few pieces, none much longer than
        // ZERO_COPY_MIN (the buffer they are copied into is passed on once it reaches it).
        let request = format!(r#"{{"pad":"{pad}"}}"#);
        for size in [1, 4096] {
            let e = framed(size);
            assert_eq!(e.request_len(), request.len());
            let most = request.len().div_ceil(ZERO_COPY_MIN) + 1;
            assert!(e.request.len() <= most, "frames of {size} bytes");
            assert!(e.request.iter().all(|p| p.len() < 2 * ZERO_COPY_MIN));
            assert_eq!(e.request.concat(), request.as_bytes());
        }
    }

    #[test]
    fn number_len_follows_the_grammar() {
        assert_eq!(number_len(b"0,"), Ok(Some(1)));
        assert_eq!(number_len(b"-12.5e+3]"), Ok(Some(8)));
        assert_eq!(number_len(b"12"), Ok(None));
        assert_eq!(number_len(b"1.5E"), Ok(None));
        assert_eq!(number_len(b"-"), Ok(None));
        assert_eq!(number_len(b"-x"), Err(1));
        assert_eq!(number_len(b"1.x"), Err(2));
        assert_eq!(number_len(b"1e+x"), Err(3));
        // A leading zero ends the number; what follows is the next state's to refuse.
        assert_eq!(number_len(b"01"), Ok(Some(1)));
    }
}
