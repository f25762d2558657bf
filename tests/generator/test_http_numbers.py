"""The HTTP face's JSON numbers: an integer past float's range (JSON allows any number of
digits) in a field that takes a number is a 400 naming the field, not a 500 (``math.isfinite``
of such an int raises OverflowError), and the face keeps serving."""

from __future__ import annotations

import asyncio
import http.client
import json

from services.generator.engine import EngineConfig, GeneratorEngine
from services.generator.http_face import GeneratorHttpFace

HUGE = "1" + "0" * 400  # an integer of 401 digits: past float's range, under Python's 4300-digit limit


def _post(port: int, path: str, body: str) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", path, body=body.encode(), headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    out = r.status, json.loads(r.read())
    conn.close()
    return out


async def test_integers_past_float_range_are_400_naming_the_field(llama_path):
    engine = GeneratorEngine(EngineConfig(model=str(llama_path)))
    face = GeneratorHttpFace(engine)
    port = await face.start("127.0.0.1", 0)
    try:
        await asyncio.to_thread(engine.start)
        face.loaded = True
        chat = '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, %s}'
        for field, param in (
            (f'"temperature": {HUGE}', "temperature"),
            (f'"top_p": -{HUGE}', "top_p"),
            (f'"extmind": {{"memory_ids": ["m"], "citation_min_weight": {HUGE}}}', "extmind.citation_min_weight"),
            (f'"extmind": {{"memory_ids": ["m"], "threshold": {HUGE}}}', "extmind.threshold"),
        ):
            status, body = await asyncio.to_thread(_post, port, "/v1/chat/completions", chat % field)
            assert (status, body["error"]["code"], body["error"]["param"]) == (400, "invalid_argument", param), body
        status, body = await asyncio.to_thread(_post, port, "/v1/completions", '{"prompt": "hi", "max_tokens": 2}')
        assert status == 200 and 1 <= body["usage"]["completion_tokens"] <= 2
    finally:
        await face.stop()
        engine.stop()
