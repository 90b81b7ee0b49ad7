//! Tool calls in the generic JSON format (llama.cpp's, for models whose
//! chat template has no tool format of its own, as SmolLM2's has not).
//!
//! The request's functions are described to the model in a system message,
//! and the output is constrained to one JSON document:
//! `{"tool_calls": [{"name": …, "arguments": {…}}, …]}` (or
//! `{"tool_call": {…}}` when `parallel_tool_calls` is false), each call's
//! `arguments` held to its function's parameter schema; with
//! `tool_choice: "auto"` the document may instead be `{"response": "…"}`,
//! a plain answer. Earlier calls and their results go back to the model in
//! the same shapes: an assistant turn with the calls' JSON, and a user turn
//! `{"tool_response": {"tool_call_id": …, "name": …, "content": …}}` per
//! result.
//!
//! [`scan`] reads a document (or the part generated so far) back into the
//! answer's text and calls; [`ToolStream`] turns it into OpenAI's stream
//! deltas. Both are plain functions of the text, tested on their own.

use serde_json::{json, Value};

use super::error::ApiError;

/// One function the model may call.
#[derive(Debug, Clone, PartialEq)]
pub struct Function {
    /// Its name.
    pub name: String,
    /// What it does (for the model).
    pub description: Option<String>,
    /// JSON Schema of its arguments.
    pub parameters: Value,
}

/// `tool_choice`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    /// The model answers in text; the tools are not offered.
    None,
    /// A call or an answer, as the model chooses.
    Auto,
    /// At least one call.
    Required,
    /// A call of this function.
    Named(String),
}

/// The tools a request offers and how they may be used.
#[derive(Debug, Clone, PartialEq)]
pub struct Tools {
    /// The functions.
    pub functions: Vec<Function>,
    /// `tool_choice`.
    pub choice: ToolChoice,
    /// `parallel_tool_calls` (OpenAI's default: true).
    pub parallel: bool,
}

fn bad(param: &'static str, message: String) -> ApiError {
    ApiError::invalid_param(param, message)
}

impl Tools {
    /// Reads `tools`, `tool_choice` and `parallel_tool_calls`; `None` when
    /// the request offers no tools.
    pub fn from_request(
        tools: Option<&Value>,
        tool_choice: Option<&Value>,
        parallel: Option<bool>,
    ) -> Result<Option<Tools>, ApiError> {
        let list = match tools {
            None | Some(Value::Null) => {
                return match tool_choice {
                    None | Some(Value::Null) => Ok(None),
                    Some(Value::String(s)) if s == "none" || s == "auto" => Ok(None),
                    Some(_) => Err(bad(
                        "tool_choice",
                        "tool_choice needs tools to choose from".into(),
                    )),
                };
            }
            Some(Value::Array(list)) => list,
            Some(_) => return Err(bad("tools", "tools must be an array".into())),
        };
        if list.is_empty() {
            return Err(bad("tools", "tools must not be empty".into()));
        }
        let mut functions: Vec<Function> = Vec::new();
        for (i, t) in list.iter().enumerate() {
            let kind = t.get("type").and_then(Value::as_str).unwrap_or("");
            if kind != "function" {
                return Err(bad(
                    "tools",
                    format!("tools[{i}].type {kind:?}: only \"function\" is supported"),
                ));
            }
            let f = t
                .get("function")
                .ok_or_else(|| bad("tools", format!("tools[{i}].function is missing")))?;
            let name = f
                .get("name")
                .and_then(Value::as_str)
                .filter(|n| {
                    !n.is_empty()
                        && n.len() <= 64
                        && n.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
                })
                .ok_or_else(|| {
                    bad(
                        "tools",
                        format!("tools[{i}].function.name must be 1 to 64 letters, digits, _ or -"),
                    )
                })?
                .to_string();
            if functions.iter().any(|g| g.name == name) {
                return Err(bad(
                    "tools",
                    format!("tools[{i}]: two functions are named {name:?}"),
                ));
            }
            let parameters = match f.get("parameters") {
                None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
                Some(p @ Value::Object(_)) => p.clone(),
                Some(_) => {
                    return Err(bad(
                        "tools",
                        format!("tools[{i}].function.parameters must be a JSON Schema object"),
                    ))
                }
            };
            functions.push(Function {
                name,
                description: f
                    .get("description")
                    .and_then(Value::as_str)
                    .map(str::to_string),
                parameters,
            });
        }
        let choice = match tool_choice {
            None | Some(Value::Null) => ToolChoice::Auto,
            Some(Value::String(s)) => match s.as_str() {
                "none" => ToolChoice::None,
                "auto" => ToolChoice::Auto,
                "required" => ToolChoice::Required,
                other => {
                    return Err(bad(
                        "tool_choice",
                        format!("tool_choice {other:?}: none, auto, required or a function"),
                    ))
                }
            },
            Some(v) => {
                let name = v
                    .get("function")
                    .and_then(|f| f.get("name"))
                    .and_then(Value::as_str)
                    .ok_or_else(|| {
                        bad(
                            "tool_choice",
                            "tool_choice must be a string or {\"type\": \"function\", \"function\": {\"name\": …}}"
                                .into(),
                        )
                    })?;
                if !functions.iter().any(|f| f.name == name) {
                    return Err(bad(
                        "tool_choice",
                        format!("tool_choice names {name:?}, which is not among the tools"),
                    ));
                }
                ToolChoice::Named(name.to_string())
            }
        };
        Ok(Some(Tools {
            functions,
            choice,
            parallel: parallel.unwrap_or(true),
        }))
    }

    /// Whether the model is offered the tools (not `tool_choice: none`).
    pub fn offered(&self) -> bool {
        self.choice != ToolChoice::None
    }

    /// The system message that describes the tools and the format.
    pub fn system_prompt(&self) -> String {
        let described: Vec<Value> = self
            .functions
            .iter()
            .map(|f| {
                let mut d = json!({"name": f.name, "parameters": f.parameters});
                if let Some(text) = &f.description {
                    d["description"] = json!(text);
                }
                d
            })
            .collect();
        let example = if self.parallel {
            r#"{"tool_calls": [{"name": "tool_name", "arguments": {"arg1": "some_value"}}]}"#
        } else {
            r#"{"tool_call": {"name": "tool_name", "arguments": {"arg1": "some_value"}}}"#
        };
        let key = if self.parallel {
            "tool_calls"
        } else {
            "tool_call"
        };
        let how = match &self.choice {
            ToolChoice::Auto => format!(
                "Respond in JSON format, either with `{key}` (a request to call tools) or with `response` (a reply to the user's request)."
            ),
            ToolChoice::Named(name) => {
                format!("Respond in JSON format with `{key}`, calling the tool `{name}`.")
            }
            _ => format!("Respond in JSON format with `{key}` (a request to call tools)."),
        };
        format!(
            "You can call any of the following tools to satisfy the user's requests: {}\n\nExample tool call syntax:\n\n{example}\n\n{how}",
            serde_json::to_string(&described).unwrap_or_default()
        )
    }

    /// The JSON Schema the output is held to.
    pub fn schema(&self) -> Value {
        let call = |f: &Function| {
            json!({
                "type": "object",
                "properties": {
                    "name": {"const": f.name},
                    "arguments": f.parameters,
                },
                "required": ["name", "arguments"],
                "additionalProperties": false,
            })
        };
        let calls: Vec<Value> = match &self.choice {
            ToolChoice::Named(name) => self
                .functions
                .iter()
                .filter(|f| &f.name == name)
                .map(call)
                .collect(),
            _ => self.functions.iter().map(call).collect(),
        };
        let one = if calls.len() == 1 {
            calls[0].clone()
        } else {
            json!({"anyOf": calls})
        };
        let calling = if self.parallel {
            json!({
                "type": "object",
                "properties": {"tool_calls": {"type": "array", "items": one, "minItems": 1}},
                "required": ["tool_calls"],
                "additionalProperties": false,
            })
        } else {
            json!({
                "type": "object",
                "properties": {"tool_call": one},
                "required": ["tool_call"],
                "additionalProperties": false,
            })
        };
        match self.choice {
            ToolChoice::Auto => json!({"anyOf": [
                calling,
                {
                    "type": "object",
                    "properties": {"response": {"type": "string"}},
                    "required": ["response"],
                    "additionalProperties": false,
                },
            ]}),
            _ => calling,
        }
    }

    /// An assistant turn's calls, as the model writes them.
    pub fn render_calls(&self, calls: &[(String, String, Value)]) -> String {
        let rendered: Vec<Value> = calls
            .iter()
            .map(|(_, name, args)| json!({"name": name, "arguments": args}))
            .collect();
        let doc = if self.parallel || rendered.len() > 1 {
            json!({ "tool_calls": rendered })
        } else {
            json!({ "tool_call": rendered[0] })
        };
        to_text(&doc)
    }
}

/// A tool's result, as the model reads it.
pub fn render_result(tool_call_id: &str, name: &str, content: &str) -> String {
    to_text(
        &json!({"tool_response": {"tool_call_id": tool_call_id, "name": name, "content": content}}),
    )
}

/// JSON with the separators the constrained output uses.
fn to_text(v: &Value) -> String {
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, SpacedFormatter);
    serde::Serialize::serialize(v, &mut ser).expect("a JSON value serializes");
    String::from_utf8(out).expect("JSON is UTF-8")
}

/// `", "` and `": "`, as Python's `json.dumps`.
struct SpacedFormatter;

impl serde_json::ser::Formatter for SpacedFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        comma_unless_first(writer, first)
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        comma_unless_first(writer, first)
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
    ) -> std::io::Result<()> {
        writer.write_all(b": ")
    }
}

fn comma_unless_first<W: ?Sized + std::io::Write>(w: &mut W, first: bool) -> std::io::Result<()> {
    match first {
        true => Ok(()),
        false => w.write_all(b", "),
    }
}

/// One call read from the output.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ScannedCall {
    /// The function's name, once its string is complete.
    pub name: Option<String>,
    /// The arguments' JSON text as generated, so far.
    pub arguments: String,
}

/// What an output document says, as far as it goes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Scan {
    /// The `response` text decoded so far (no half escape).
    pub content: Option<String>,
    /// The calls begun.
    pub calls: Vec<ScannedCall>,
}

/// Reads a (possibly incomplete) document of the generic format.
pub fn scan(text: &str) -> Scan {
    let mut p = Parser {
        s: text.as_bytes(),
        i: 0,
        out: Scan::default(),
    };
    let _ = p.value(Ctx::Root);
    p.out
}

/// The input ended.
struct Eof;

#[derive(Clone, Copy)]
enum Ctx {
    Root,
    Response,
    Calls,
    Call(usize),
    Name(usize),
    Other,
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
    out: Scan,
}

impl Parser<'_> {
    fn ws(&mut self) -> Result<u8, Eof> {
        while let Some(&b) = self.s.get(self.i) {
            if !matches!(b, b' ' | b'\n' | b'\r' | b'\t') {
                return Ok(b);
            }
            self.i += 1;
        }
        Err(Eof)
    }

    fn call(&mut self, k: usize) -> &mut ScannedCall {
        while self.out.calls.len() <= k {
            self.out.calls.push(ScannedCall::default());
        }
        &mut self.out.calls[k]
    }

    /// A value in `ctx`. Only the format's own levels recurse (the root
    /// object, the calls array, a call object: three at most); anything
    /// else, however deep (a call's arguments), is skipped iteratively.
    fn value(&mut self, ctx: Ctx) -> Result<(), Eof> {
        match (self.ws()?, ctx) {
            (_, Ctx::Other) => self.skip(),
            (b'{', Ctx::Root | Ctx::Call(_)) => self.object(ctx),
            (b'[', Ctx::Calls) => self.array(),
            (b'"', Ctx::Response) => {
                let content = self.string(|decoded| decoded)?;
                self.out.content = Some(content);
                Ok(())
            }
            (b'"', Ctx::Name(k)) => {
                let name = self.string(|_| String::new())?;
                self.call(k).name = Some(name);
                Ok(())
            }
            _ => self.skip(),
        }
    }

    /// Past one value of any shape and depth, without recursion.
    fn skip(&mut self) -> Result<(), Eof> {
        let mut depth = 0usize;
        loop {
            let Some(&b) = self.s.get(self.i) else {
                return Err(Eof);
            };
            match b {
                b'"' => {
                    self.skip_string()?;
                    if depth == 0 {
                        return Ok(());
                    }
                }
                b'{' | b'[' => {
                    depth += 1;
                    self.i += 1;
                }
                b'}' | b']' => {
                    if depth == 0 {
                        return Ok(()); // the container around a scalar ends
                    }
                    depth -= 1;
                    self.i += 1;
                    if depth == 0 {
                        return Ok(());
                    }
                }
                b',' | b' ' | b'\n' | b'\r' | b'\t' if depth == 0 => return Ok(()),
                _ => self.i += 1,
            }
        }
    }

    /// Past a string (at its opening quote).
    fn skip_string(&mut self) -> Result<(), Eof> {
        self.i += 1;
        loop {
            match self.s.get(self.i) {
                None => return Err(Eof),
                Some(b'\\') => self.i += 2,
                Some(b'"') => {
                    self.i += 1;
                    return Ok(());
                }
                Some(_) => self.i += 1,
            }
        }
    }

    fn object(&mut self, ctx: Ctx) -> Result<(), Eof> {
        self.i += 1; // {
        loop {
            match self.ws()? {
                b'}' => {
                    self.i += 1;
                    return Ok(());
                }
                b',' => {
                    self.i += 1;
                    continue;
                }
                b'"' => {}
                _ => return Err(Eof), // not the format: stop reading
            }
            let key = self.string(|_| String::new())?;
            if self.ws()? != b':' {
                return Err(Eof);
            }
            self.i += 1;
            let inner = match (ctx, key.as_str()) {
                (Ctx::Root, "response") => Ctx::Response,
                (Ctx::Root, "tool_calls") => Ctx::Calls,
                (Ctx::Root, "tool_call") => Ctx::Call(0),
                (Ctx::Call(k), "name") => Ctx::Name(k),
                (Ctx::Call(k), "arguments") => {
                    self.ws()?;
                    let start = self.i;
                    let done = self.skip();
                    let end = self.i.min(self.s.len());
                    let text = String::from_utf8_lossy(&self.s[start..end]).into_owned();
                    self.call(k).arguments = text;
                    done?;
                    continue;
                }
                _ => Ctx::Other,
            };
            if let Ctx::Call(k) = inner {
                self.call(k);
            }
            self.value(inner)?;
        }
    }

    /// The calls array: each element a call.
    fn array(&mut self) -> Result<(), Eof> {
        self.i += 1; // [
        let mut k = 0;
        loop {
            match self.ws()? {
                b']' => {
                    self.i += 1;
                    return Ok(());
                }
                b',' => {
                    self.i += 1;
                    continue;
                }
                _ => {}
            }
            self.call(k);
            self.value(Ctx::Call(k))?;
            k += 1;
        }
    }

    /// A string at `self.i` (its opening quote). On `Eof`, what was decoded
    /// before it is handed to `partial` (the response text streams).
    fn string(&mut self, partial: impl FnOnce(String) -> String) -> Result<String, Eof> {
        let mut out = String::new();
        self.i += 1; // "
        let mut run_start = self.i;
        loop {
            let Some(&b) = self.s.get(self.i) else {
                out.push_str(&String::from_utf8_lossy(&self.s[run_start..]));
                let p = partial(out);
                if !p.is_empty() {
                    self.out.content = Some(p);
                }
                return Err(Eof);
            };
            match b {
                b'"' => {
                    out.push_str(&String::from_utf8_lossy(&self.s[run_start..self.i]));
                    self.i += 1;
                    return Ok(out);
                }
                b'\\' => {
                    out.push_str(&String::from_utf8_lossy(&self.s[run_start..self.i]));
                    match unescape(&self.s[self.i..]) {
                        Some((c, used)) => {
                            out.push_str(&c);
                            self.i += used;
                            run_start = self.i;
                        }
                        None => {
                            // An escape cut off by the end: not decoded yet.
                            let p = partial(out);
                            if !p.is_empty() {
                                self.out.content = Some(p);
                            }
                            return Err(Eof);
                        }
                    }
                }
                _ => self.i += 1,
            }
        }
    }
}

/// The text of the escape at the start of `s` and its length; `None` when
/// it is cut off (a malformed escape decodes as U+FFFD).
fn unescape(s: &[u8]) -> Option<(String, usize)> {
    let c = *s.get(1)?;
    let simple = match c {
        b'"' => Some('"'),
        b'\\' => Some('\\'),
        b'/' => Some('/'),
        b'b' => Some('\u{8}'),
        b'f' => Some('\u{c}'),
        b'n' => Some('\n'),
        b'r' => Some('\r'),
        b't' => Some('\t'),
        _ => None,
    };
    if let Some(ch) = simple {
        return Some((ch.to_string(), 2));
    }
    if c != b'u' {
        return Some(('\u{FFFD}'.to_string(), 2));
    }
    let hex = |at: usize| -> Option<Option<u32>> {
        let digits = s.get(at..at + 4)?;
        Some(
            std::str::from_utf8(digits)
                .ok()
                .and_then(|d| u32::from_str_radix(d, 16).ok()),
        )
    };
    let Some(first) = hex(2)? else {
        return Some(('\u{FFFD}'.to_string(), 6));
    };
    if (0xD800..0xDC00).contains(&first) {
        // A high surrogate: its pair follows.
        if s.len() < 12 {
            return None;
        }
        if s[6] == b'\\' && s[7] == b'u' {
            if let Some(Some(low)) = hex(8) {
                if (0xDC00..0xE000).contains(&low) {
                    let cp = 0x10000 + ((first - 0xD800) << 10) + (low - 0xDC00);
                    let ch = char::from_u32(cp).unwrap_or('\u{FFFD}');
                    return Some((ch.to_string(), 12));
                }
            }
        }
        return Some(('\u{FFFD}'.to_string(), 6));
    }
    Some((char::from_u32(first).unwrap_or('\u{FFFD}').to_string(), 6))
}

/// One change to stream, as OpenAI's chunks carry them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEvent {
    /// More answer text.
    Content(String),
    /// A call begins: its index, id and name.
    CallStart {
        /// Its index among the choice's calls.
        index: usize,
        /// Its id.
        id: String,
        /// The function.
        name: String,
    },
    /// More of a call's arguments.
    Arguments {
        /// Its index.
        index: usize,
        /// The text.
        text: String,
    },
}

/// Turns the output, as it grows, into stream events: each is what the
/// text says now and did not before.
#[derive(Debug, Default)]
pub struct ToolStream {
    text: String,
    content_sent: usize,
    /// Per call begun: its id and how much of its arguments went out.
    calls: Vec<(String, usize)>,
}

impl ToolStream {
    /// Adds generated text; returns the events it makes.
    pub fn push(&mut self, delta: &str) -> Vec<StreamEvent> {
        self.text.push_str(delta);
        let now = scan(&self.text);
        let mut events = Vec::new();
        if let Some(content) = &now.content {
            if content.len() > self.content_sent {
                events.push(StreamEvent::Content(
                    content[self.content_sent..].to_string(),
                ));
                self.content_sent = content.len();
            }
        }
        for (index, call) in now.calls.iter().enumerate() {
            let Some(name) = &call.name else { break };
            if index == self.calls.len() {
                let id = new_call_id();
                events.push(StreamEvent::CallStart {
                    index,
                    id: id.clone(),
                    name: name.clone(),
                });
                self.calls.push((id, 0));
            }
            let sent = &mut self.calls[index].1;
            if call.arguments.len() > *sent {
                events.push(StreamEvent::Arguments {
                    index,
                    text: call.arguments[*sent..].to_string(),
                });
                *sent = call.arguments.len();
            }
        }
        events
    }

    /// The ids of the calls begun, in order.
    pub fn call_ids(&self) -> impl Iterator<Item = &str> {
        self.calls.iter().map(|(id, _)| id.as_str())
    }

    /// Whether any call began.
    pub fn has_calls(&self) -> bool {
        !self.calls.is_empty()
    }
}

/// A call id as OpenAI writes them.
pub fn new_call_id() -> String {
    format!("call_{}", uuid::Uuid::new_v4().simple())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> Value {
        json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
            {"type": "function", "function": {"name": "get_time"}}])
    }

    #[test]
    fn requests_are_read_and_bad_ones_named() {
        let t = Tools::from_request(Some(&weather()), None, None)
            .unwrap()
            .unwrap();
        assert_eq!(t.choice, ToolChoice::Auto);
        assert!(t.parallel);
        assert_eq!(t.functions[1].parameters["type"], "object");
        let named = json!({"type": "function", "function": {"name": "get_time"}});
        let t = Tools::from_request(Some(&weather()), Some(&named), Some(false))
            .unwrap()
            .unwrap();
        assert_eq!(t.choice, ToolChoice::Named("get_time".into()));
        let absent = json!({"type": "function", "function": {"name": "nope"}});
        let e = Tools::from_request(Some(&weather()), Some(&absent), None).unwrap_err();
        assert_eq!(e.param, Some("tool_choice"));
        assert!(e.message.contains("nope"), "{}", e.message);
        for bad in [
            json!([]),
            json!({"a": 1}),
            json!([{"type": "retrieval"}]),
            json!([{"type": "function", "function": {"name": "has space"}}]),
            json!([{"type": "function", "function": {"name": "a"}}, {"type": "function", "function": {"name": "a"}}]),
            json!([{"type": "function", "function": {"name": "a", "parameters": "x"}}]),
        ] {
            assert_eq!(
                Tools::from_request(Some(&bad), None, None)
                    .unwrap_err()
                    .param,
                Some("tools"),
                "{bad}"
            );
        }
        assert!(Tools::from_request(None, Some(&json!("required")), None).is_err());
        assert!(Tools::from_request(None, Some(&json!("none")), None)
            .unwrap()
            .is_none());
    }

    #[test]
    fn the_schema_holds_calls_to_their_functions() {
        let t = Tools::from_request(Some(&weather()), Some(&json!("required")), Some(false))
            .unwrap()
            .unwrap();
        let s = t.schema();
        let calls = &s["properties"]["tool_call"]["anyOf"];
        assert_eq!(calls[0]["properties"]["name"]["const"], "get_weather");
        assert_eq!(calls[0]["properties"]["arguments"]["required"][0], "city");
        let auto = Tools::from_request(Some(&weather()), None, None)
            .unwrap()
            .unwrap()
            .schema();
        assert_eq!(auto["anyOf"][1]["required"][0], "response");
        assert!(t.system_prompt().contains("get_weather"));
    }

    #[test]
    fn a_document_scans_into_calls_and_text_at_every_prefix() {
        let doc = r#"{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris \"15\""}}, {"name": "get_time", "arguments": {}}]}"#;
        let full = scan(doc);
        assert_eq!(full.content, None);
        assert_eq!(full.calls.len(), 2);
        assert_eq!(full.calls[0].name.as_deref(), Some("get_weather"));
        assert_eq!(full.calls[0].arguments, r#"{"city": "Paris \"15\""}"#);
        assert_eq!(full.calls[1].arguments, "{}");
        // Streamed a character at a time, the events add up to the same.
        let mut stream = ToolStream::default();
        let mut names = Vec::new();
        let mut args = [String::new(), String::new()];
        for (i, _) in doc.char_indices().skip(1).chain([(doc.len(), ' ')]) {
            let prev: usize = stream.text.len();
            for e in stream.push(&doc[prev..i]) {
                match e {
                    StreamEvent::CallStart { index, name, .. } => {
                        assert_eq!(index, names.len());
                        names.push(name);
                    }
                    StreamEvent::Arguments { index, text } => {
                        assert!(index < names.len(), "arguments before the name");
                        args[index].push_str(&text);
                    }
                    StreamEvent::Content(c) => panic!("content {c:?}"),
                }
            }
        }
        assert_eq!(names, ["get_weather", "get_time"]);
        assert_eq!(args[0], full.calls[0].arguments);
        assert_eq!(args[1], "{}");
        assert_eq!(stream.call_ids().count(), 2);
    }

    #[test]
    fn a_response_streams_as_decoded_text_never_half_an_escape() {
        let doc = r#"{"response": "Hi \"you\"\n\u00e9\ud83d\ude00!"}"#;
        assert_eq!(scan(doc).content.as_deref(), Some("Hi \"you\"\né😀!"));
        let mut stream = ToolStream::default();
        let mut text = String::new();
        for i in 1..=doc.len() {
            let prev = stream.text.len();
            for e in stream.push(&doc[prev..i]) {
                match e {
                    StreamEvent::Content(c) => text.push_str(&c),
                    other => panic!("{other:?}"),
                }
            }
            assert!(!text.contains('\\'), "{text:?} at {i}");
        }
        assert_eq!(text, "Hi \"you\"\né😀!");
        assert!(!stream.has_calls());
    }

    #[test]
    fn arguments_nested_beyond_any_stack_are_read_without_recursion() {
        let depth = 200_000;
        let args = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        let doc = format!(r#"{{"tool_call": {{"name": "f", "arguments": {{"a": {args}}}}}}}"#);
        let read = scan(&doc);
        assert_eq!(read.calls[0].name.as_deref(), Some("f"));
        assert_eq!(read.calls[0].arguments.len(), args.len() + 7);
        // Cut anywhere inside: still no recursion, the text so far.
        let cut = &doc[..doc.len() / 2];
        assert!(scan(cut).calls[0].arguments.starts_with(r#"{"a": [[["#));
    }

    #[test]
    fn calls_render_as_the_model_writes_them() {
        let t = Tools::from_request(Some(&weather()), None, Some(false))
            .unwrap()
            .unwrap();
        let text = t.render_calls(&[("call_1".into(), "get_time".into(), json!({}))]);
        assert_eq!(
            text,
            r#"{"tool_call": {"name": "get_time", "arguments": {}}}"#
        );
        assert_eq!(
            render_result("call_1", "get_time", "12:00"),
            r#"{"tool_response": {"tool_call_id": "call_1", "name": "get_time", "content": "12:00"}}"#
        );
    }
}
