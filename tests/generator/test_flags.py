"""The generator's command line (services/generator/app.py): wrong values stop the start in one
line naming the flag or variable."""

from __future__ import annotations

import pytest

from services.generator.app import parse_args


def test_window_and_stride_flags_must_be_positive(monkeypatch, capsys):
    """A window or stride <= 0 stops the start in one line naming it (it used to start, and then
    every Memorize asking for the default window was INVALID_ARGUMENT blaming the request)."""
    args = parse_args(["--model", "m", "--window", "1024", "--stride", "256"])
    assert (args.window, args.stride) == (1024, 256)
    for argv, env, says in (
        (["--window", "0"], {}, "argument --window: must be a whole number > 0, got 0"),
        (["--stride", "-5"], {}, "argument --stride: must be a whole number > 0, got -5"),
        ([], {"GENERATOR_WINDOW": "-5"}, "GENERATOR_WINDOW='-5' is not valid: must be a whole number > 0"),
        ([], {"GENERATOR_STRIDE": "half"}, "GENERATOR_STRIDE='half' is not valid: expected a whole number"),
    ):
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        with pytest.raises(SystemExit) as e:
            parse_args(["--model", "m", *argv])
        assert e.value.code == 2 and says in capsys.readouterr().err
        for k in env:
            monkeypatch.delenv(k)


def test_fused_attention_flag(monkeypatch, capsys):
    """--fused-attention takes auto (the default: the CUDA kernels where MLX computes on CUDA) or
    off; another value, from the flag or GENERATOR_FUSED_ATTENTION, stops the start in one line."""
    assert parse_args(["--model", "m"]).fused_attention == "auto"
    assert parse_args(["--model", "m", "--fused-attention", "off"]).fused_attention == "off"
    monkeypatch.setenv("GENERATOR_FUSED_ATTENTION", "off")
    assert parse_args(["--model", "m"]).fused_attention == "off"
    assert parse_args(["--model", "m", "--fused-attention", "auto"]).fused_attention == "auto"  # the flag wins
    for argv, env, says in (
        (["--fused-attention", "on"], {}, "argument --fused-attention: invalid choice: 'on' (choose from"),
        ([], {"GENERATOR_FUSED_ATTENTION": "on"}, "GENERATOR_FUSED_ATTENTION='on' is not valid: use one of auto, off"),
    ):
        monkeypatch.delenv("GENERATOR_FUSED_ATTENTION")
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        with pytest.raises(SystemExit) as e:
            parse_args(["--model", "m", *argv])
        assert e.value.code == 2 and says in capsys.readouterr().err
        monkeypatch.setenv("GENERATOR_FUSED_ATTENTION", "auto")
