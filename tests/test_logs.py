"""Structured log formatters: extra fields are kept, uvicorn's coloured copy of the message is not."""

import json
import logging

from services.common.logs import JsonFormatter, TextFormatter


def _record(**extra) -> logging.LogRecord:
    # What uvicorn logs at start: the message plus `color_message`, the same with ANSI codes.
    r = logging.makeLogRecord({"name": "uvicorn.error", "levelno": logging.INFO, "levelname": "INFO"})
    r.msg, r.args = "Started server process [%d]", (42,)
    r.__dict__.update(extra)
    return r


def test_text_and_json_keep_extra_fields_and_drop_uvicorns_color_message():
    r = _record(color_message="Started server process [\x1b[36m%d\x1b[0m]", method="/x.Y/Z")
    text = TextFormatter().format(r)
    assert text.endswith("uvicorn.error: Started server process [42] method=/x.Y/Z"), text
    assert "\x1b" not in text and "color_message" not in text
    out = json.loads(JsonFormatter().format(r))
    assert out["msg"] == "Started server process [42]" and out["method"] == "/x.Y/Z"
    assert "color_message" not in out
