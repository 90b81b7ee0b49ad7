"""What agents' clients do, with the official openai Python client, against a
running agent: structured output (`chat.completions.parse` with a pydantic
model; a JSON schema checked with the `jsonschema` package), tool calls
(required, named, auto; streamed and not; a conversation with a tool's
result), logprobs, and n choices. Prints one JSON object with what it saw;
the Rust test asserts on it and on the bill.

Usage: openai_agents.py API_URL KEY MODEL IMSI"""

import json
import sys
from typing import Annotated, List, Literal

import jsonschema
import openai
from pydantic import BaseModel, Field

api, key, model, imsi = sys.argv[1:5]
client = openai.OpenAI(base_url=api + "/v1", api_key=key, default_headers={"X-Subscriber-Imsi": imsi}, max_retries=0)
out = {"requests": 0}


def counted(usage):
    out["requests"] += 1
    out.setdefault("usages", []).append(usage.model_dump() if usage else None)


# 1. Structured output with a pydantic model, 20 prompts.
class Address(BaseModel):
    city: str = Field(max_length=24)
    country: str = Field(max_length=24)


class Person(BaseModel):
    name: str = Field(max_length=24)
    age: int = Field(ge=0, le=120)
    role: Literal["engineer", "technician", "operator", "manager"]
    address: Address
    skills: List[Annotated[str, Field(max_length=16)]] = Field(max_length=3)


topics = ["a radio engineer in Oslo", "a technician who climbs masts", "an operator in Lagos", "a network manager",
          "a student of 5G", "a field engineer in Lima", "a retired operator", "a manager in Seoul", "a nurse",
          "a farmer who uses a 5G tractor", "a pilot", "a chef in Lyon", "a teacher in Pune", "a driver in Austin",
          "a painter in Madrid", "a miner in Perth", "a baker in Vienna", "a coder in Berlin", "a singer in Accra",
          "a sailor in Hamburg"]


def describe(topic):
    """The arguments of one structured-output request about `topic`."""
    return {
        "model": model,
        "messages": [{"role": "system", "content": "Answer with a JSON object describing the person."},
                     {"role": "user", "content": f"Describe {topic}."}],
        "response_format": Person,
        "max_tokens": 160,
        "temperature": 0,
    }


parsed = 0
for topic in topics:
    r = client.chat.completions.parse(**describe(topic))
    counted(r.usage)
    p = r.choices[0].message.parsed
    if isinstance(p, Person) and r.choices[0].finish_reason == "stop":
        parsed += 1
    else:
        out.setdefault("unparsed", []).append(r.choices[0].message.content)
out["parsed"] = parsed
out["parse_example"] = p.model_dump() if p else None

# The same, streamed: the SDK's stream helper parses the streamed document.
streamed_parsed, content_events = 0, 0
for topic in topics[:3]:
    with client.chat.completions.stream(**describe(topic), stream_options={"include_usage": True}) as stream:
        for event in stream:
            if event.type == "content.delta":
                content_events += 1
        final = stream.get_final_completion()
    counted(final.usage)
    if isinstance(final.choices[0].message.parsed, Person):
        streamed_parsed += 1
out["streamed_parsed"] = streamed_parsed
out["streamed_content_events"] = content_events

# 2. A JSON schema with nested objects, arrays, enums and required fields,
# sampled 100 times (25 requests of n = 4, temperature 1), each checked.
# Strings and numbers are bounded (maxLength; multipleOf 0.25, exact in
# binary for the validator): a 135M model
# at temperature 1 can otherwise write digits until max_tokens.
schema = {
    "type": "object",
    "properties": {
        "site": {"type": "string", "maxLength": 20},
        "status": {"enum": ["up", "degraded", "down"]},
        "cells": {
            "type": "array",
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer", "minimum": 1, "maximum": 999},
                    "band": {"enum": ["n28", "n78", "n258"]},
                    "load": {"type": "number", "minimum": 0, "maximum": 1, "multipleOf": 0.25},
                },
                "required": ["id", "band", "load"],
                "additionalProperties": False,
            },
        },
        "contact": {
            "type": "object",
            "properties": {"name": {"type": "string", "maxLength": 20}, "on_call": {"type": "boolean"}},
            "required": ["name", "on_call"],
            "additionalProperties": False,
        },
    },
    "required": ["site", "status", "cells", "contact"],
    "additionalProperties": False,
}
valid, samples = 0, []
for i in range(25):
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Report the state of a 5G site as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "site", "schema": schema, "strict": True}},
        max_tokens=200,
        temperature=1.0,
        seed=1000 * i,  # choice k samples with seed + k: no two alike
        n=4,
    )
    counted(r.usage)
    for c in r.choices:
        try:
            doc = json.loads(c.message.content)
            jsonschema.validate(doc, schema)
            if c.finish_reason == "stop":
                valid += 1
            else:
                samples.append(["finish " + c.finish_reason, c.message.content])
        except (ValueError, jsonschema.ValidationError) as e:
            samples.append([str(e)[:200], c.message.content])
out["schema_valid"] = valid
out["schema_failures"] = samples[:3]

# 3. Tool calls: required, streamed and not; named; a conversation with a result.
weather = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
clock = {"type": "function", "function": {"name": "get_time", "description": "The time in a timezone",
                                          "parameters": {"type": "object", "properties": {"tz": {"type": "string", "maxLength": 30}},
                                                         "required": ["tz"]}}}
ask = [{"role": "user", "content": "What is the weather in Paris?"}]
r = client.chat.completions.create(model=model, messages=ask, tools=[weather, clock], tool_choice="required",
                                   max_tokens=80, temperature=0)
counted(r.usage)
msg = r.choices[0].message
calls = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments} for c in msg.tool_calls or []]
out["required"] = {"finish": r.choices[0].finish_reason, "calls": calls, "content": msg.content}
for c in calls:
    params = weather if c["name"] == "get_weather" else clock
    jsonschema.validate(json.loads(c["arguments"]), params["function"]["parameters"])

stream_calls, finish, usage = {}, None, None
for chunk in client.chat.completions.create(model=model, messages=ask, tools=[weather, clock], tool_choice="required",
                                            max_tokens=80, temperature=0, stream=True,
                                            stream_options={"include_usage": True}):
    if chunk.usage:
        usage = chunk.usage
    for ch in chunk.choices:
        for tc in ch.delta.tool_calls or []:
            entry = stream_calls.setdefault(tc.index, {"id": None, "name": None, "arguments": "", "deltas": 0})
            if tc.id:
                entry["id"] = tc.id
            if tc.function and tc.function.name:
                entry["name"] = tc.function.name
            if tc.function and tc.function.arguments:
                entry["arguments"] += tc.function.arguments
                entry["deltas"] += 1
        if ch.finish_reason:
            finish = ch.finish_reason
counted(usage)
out["required_stream"] = {"finish": finish, "calls": [stream_calls[k] for k in sorted(stream_calls)]}
for c in out["required_stream"]["calls"]:
    params = weather if c["name"] == "get_weather" else clock
    jsonschema.validate(json.loads(c["arguments"]), params["function"]["parameters"])

r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "What time is it in Tokyo?"}],
                                   tools=[weather, clock], tool_choice={"type": "function", "function": {"name": "get_time"}},
                                   parallel_tool_calls=False, max_tokens=60, temperature=0)
counted(r.usage)
named = r.choices[0].message.tool_calls
out["named"] = {"finish": r.choices[0].finish_reason, "names": [c.function.name for c in named or []],
                "arguments": [c.function.arguments for c in named or []]}

# The conversation goes on with the tool's result; auto lets the model answer.
first = msg.tool_calls[0]
convo = ask + [
    {"role": "assistant", "content": None, "tool_calls": [{"id": first.id, "type": "function",
                                                           "function": {"name": first.function.name, "arguments": first.function.arguments}}]},
    {"role": "tool", "tool_call_id": first.id, "content": json.dumps({"temperature": 18, "sky": "clear"})},
]
r = client.chat.completions.create(model=model, messages=convo, tools=[weather, clock], tool_choice="auto",
                                   max_tokens=80, temperature=0)
counted(r.usage)
m2 = r.choices[0].message
out["after_result"] = {"finish": r.choices[0].finish_reason, "content": m2.content,
                       "calls": [c.function.name for c in m2.tool_calls or []]}
try:
    client.chat.completions.create(model=model, messages=convo[:1] + convo[2:], tools=[weather], max_tokens=5)
    out["orphan_result"] = None
except openai.BadRequestError as e:
    out["orphan_result"] = e.code

# 4. Logprobs: greedy, the chosen token is the most likely one.
r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Name a colour."}], max_tokens=6,
                                   temperature=0, logprobs=True, top_logprobs=3)
counted(r.usage)
lp = r.choices[0].logprobs.content
out["logprobs"] = [{"token": t.token, "logprob": t.logprob, "top": [[a.token, a.logprob] for a in t.top_logprobs]} for t in lp]
out["logprobs_text"] = r.choices[0].message.content

# 5. n = 3: three completions, one prompt.
r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Say a word."}], max_tokens=5,
                                   temperature=1.0, seed=3, n=3, user="end-user-42")
counted(r.usage)
out["n3"] = {"choices": len(r.choices), "usage": r.usage.model_dump(), "indexes": [c.index for c in r.choices]}

# 6. Refused before anything is billed: a keyword the engine cannot enforce,
# a tool_choice naming no tool, top_logprobs above 20, n above the maximum.
refusals = {}
for name, kwargs in {
    "not_keyword": {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"not": {"type": "string"}}}}}}},
    "absent_tool": {"tools": [weather], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
    "top_logprobs": {"logprobs": True, "top_logprobs": 21},
    "n": {"n": 99},
    "logit_bias": {"logit_bias": {"99999999": 5}},
}.items():
    try:
        client.chat.completions.create(model=model, messages=ask, max_tokens=5, **kwargs)
        refusals[name] = None
    except openai.BadRequestError as e:
        refusals[name] = {"code": e.code, "param": e.param, "message": e.message}
out["refusals"] = refusals
print(json.dumps(out))
