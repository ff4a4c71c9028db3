"""The HTTP app's answers to hostile or odd requests, without Ray: decompression-bomb headers, overlong integers
and session ids, the parameters' names and types, and the session byte budget against a real session's cache."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import numpy as np
import pytest
from serve_helpers import bomb_png

from instdiff.errors import ConfigError
from pipelines.serve import config as C
from pipelines.serve import engine, parsing, sessions
from pipelines.serve.errors import RequestError

pytest.importorskip("ray.serve")


# ---- images --------------------------------------------------------------------------------------------------------
def test_a_decompression_bomb_header_is_413_naming_the_limit():
    limits = C.LimitsConfig(max_image_pixels=300 * 300, max_image_side=300)
    with pytest.raises(RequestError) as e:
        parsing.check_image_limits(bomb_png(), limits)
    assert e.value.status == 413 and e.value.code == "too_large"
    assert "90000 pixels" in str(e.value) and "300 px a side" in str(e.value)
    # a mask is held to the same limits
    with pytest.raises(RequestError) as e:
        parsing.decode_mask_field(bomb_png(), (32, 32), limits)
    assert e.value.status == 413 and "mask" in str(e.value)


# ---- numbers -------------------------------------------------------------------------------------------------------
def test_an_overlong_integer_is_refused_with_the_accepted_range_not_pythons_advice():
    body = ('{"image": "x", "target_prompt": "t", "seed": ' + "9" * 5000 + "}").encode()
    with pytest.raises(RequestError) as e:
        parsing.parse_json(body)
    msg = str(e.value)
    assert e.value.status == 422 and e.value.code == "invalid_field"
    assert msg.startswith("seed: a 5000-digit integer is out of range") and "18446744073709551615" in msg
    assert "set_int_max_str_digits" not in msg and len(msg) < 300
    with pytest.raises(RequestError, match=r"steps: a 50-digit integer is out of range"):
        parsing.parse_json(b'{"steps": ' + b"1" * 50 + b"}")
    form = SimpleNamespace(multi_items=lambda: [("target_prompt", "t"), ("seed", "7" * 5000)])
    with pytest.raises(RequestError, match=r"seed: a 5000-digit integer is out of range") as e:
        parsing.form_values(parsing.EditFields, form)
    assert e.value.status == 422
    # ordinary numbers are untouched, also the largest seed
    assert parsing.parse_json(b'{"seed": 18446744073709551615, "steps": 4}') == {"seed": 2**64 - 1, "steps": 4}


# ---- session ids ---------------------------------------------------------------------------------------------------
def test_session_ids_over_the_accepted_form_are_422_and_not_echoed_in_full():
    sessions.check_session_id(sessions.new_session_id())
    sessions.check_session_id("nope")  # well formed, merely unknown: the store answers 404
    for bad in ("a" * 5000, "x" * (sessions.SESSION_ID_MAX + 1), "a b", "../etc", ""):
        with pytest.raises(RequestError) as e:
            sessions.check_session_id(bad)
        assert e.value.status == 422 and "32 hex digits" in str(e.value) and len(str(e.value)) < 300


# ---- the answer's parameters --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundle():
    from instdiff.models import load_bundle

    return load_bundle("tiny", device="cpu", dtype="fp32")


def test_parameters_use_the_request_field_names_and_unet_calls_is_an_int(bundle):
    req = engine.EditRequest(
        image=np.full((32, 32, 3), 90, np.uint8), target_prompt="a square", steps=2, guidance_scale=3.0, seed=5
    )
    (out,) = engine.run_edits(bundle, [engine.prepare_edit(bundle, "tiny", req, "model", "resize")])
    p = out["parameters"]
    assert p["guidance_scale"] == 3.0 and "guidance" not in p and p["steps"] == 2 and p["seed"] == 5
    assert type(out["unet_calls"]) is int and out["unet_calls"] > 0
    # the echo can be sent back: every request field present in the parameters has the request's name
    fields = {f for f in parsing.EditFields.__dataclass_fields__ if f not in ("image", "mask")}
    assert fields <= set(p) | {"source_prompt"}
    json.dumps(out)  # plain data


# ---- session budget ------------------------------------------------------------------------------------------------
def test_session_estimate_matches_a_real_session_and_the_capacity_is_logged(bundle, caplog):
    cfg = sessions.session_config(bundle, 4, None)
    session, answer = sessions.create_session(bundle, sessions.new_session_id(), "a red square", 3, cfg)
    estimate = sessions.estimate_session_bytes(bundle, 4, None)
    assert session.nbytes <= estimate <= 1.1 * session.nbytes, (estimate, session.nbytes)  # exact here
    assert type(answer["unet_calls"]) is int
    line, none_fits = sessions.capacity_note(150 * 2**20, 2**30, 256)
    assert "holds about 6" in line and "the byte budget is the limit (6)" in line and not none_fits
    line, none_fits = sessions.capacity_note(150 * 2**20, 2**30, None)
    assert "holds about 6" in line and "max_sessions" not in line
    line, none_fits = sessions.capacity_note(2**31, 2**30, None)
    assert none_fits and "413" in line


def test_max_sessions_defaults_to_what_the_byte_budget_holds():
    assert C.SessionsConfig().max_sessions is None
    assert C.load_serve_file("configs/serve/default.yaml").args.sessions.max_sessions is None
    with pytest.raises(ConfigError, match="max_sessions"):
        C.SessionsConfig(max_sessions=0)
    store = sessions.SessionStore(max_bytes=100, max_sessions=None, ttl_s=60)
    for sid in "abcdef":
        store.put(sessions.Session(sid, SimpleNamespace(num_steps=1), SimpleNamespace(nbytes=lambda: 20), "p", None, 0))
    assert len(store) == 5  # 5 × 20 bytes fit the budget of 100; the 6th evicted the first


def test_session_capacity_is_logged_when_a_replica_starts(bundle, caplog, monkeypatch):
    """The model deployment's start-up line, from its own method, without Ray."""
    from pipelines.serve.model import EditModel

    cls = EditModel.func_or_class
    model = cls.__new__(cls)
    model.bundle = bundle
    model.args = C.parse_args({"sessions": {"steps": 4, "max_bytes": 2**30}})
    with caplog.at_level(logging.INFO, logger="pipelines.serve.model"):
        nbytes = model._log_session_capacity()
    assert nbytes and nbytes > 0
    assert any("sessions.max_bytes (1024 MiB) holds about" in r.getMessage() for r in caplog.records)
