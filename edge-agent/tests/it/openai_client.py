"""The official openai Python client against a running agent: chat (plain
and streamed with usage), text completion, models, and a 404. Prints one
JSON object with what it saw. Usage: openai_client.py API_URL KEY MODEL IMSI"""

import json
import sys

import openai

api, key, model, imsi = sys.argv[1:5]
client = openai.OpenAI(base_url=api + "/v1", api_key=key, default_headers={"X-Subscriber-Imsi": imsi})
messages = [{"role": "user", "content": "What is MEC?"}]
out = {"openai_version": openai.__version__}

r = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
out["chat"] = {"text": r.choices[0].message.content, "usage": r.usage.model_dump()}

text, usage = "", None
for chunk in client.chat.completions.create(
    model=model, messages=messages, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}
):
    if chunk.choices and chunk.choices[0].delta.content:
        text += chunk.choices[0].delta.content
    if chunk.usage:
        usage = chunk.usage.model_dump()
out["stream"] = {"text": text, "usage": usage}

t = client.completions.create(model=model, prompt="The capital of France is", max_tokens=3, temperature=0)
out["completion"] = {"text": t.choices[0].text, "usage": t.usage.model_dump()}
out["models"] = [m.id for m in client.models.list()]
try:
    client.chat.completions.create(model="no-such-model", messages=messages)
    out["not_found"] = None
except openai.NotFoundError as e:
    out["not_found"] = e.code
print(json.dumps(out))
