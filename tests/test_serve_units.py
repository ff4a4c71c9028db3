"""The HTTP app's pieces without Ray: config parsing, request parsing, the session store, batched edits with
per-row errors and the out-of-memory retry."""

from __future__ import annotations

import base64
from types import SimpleNamespace

import numpy as np
import pytest

from instdiff.errors import ConfigError, ImageInputError
from pipelines.serve import config as C
from pipelines.serve import engine, parsing
from pipelines.serve.errors import RequestError, error_body
from pipelines.serve.sessions import SessionStore

pytest.importorskip("ray.serve")


# ---- config --------------------------------------------------------------------------------------------------------
def test_config_files_parse_and_builder_is_named():
    for name in ("default", "gpu"):
        f = C.load_serve_file(f"configs/serve/{name}.yaml")
        assert f.route_prefix == "/" and f.args.replicas.max_ongoing_requests >= f.args.batching.max_batch_size
    gpu = C.load_serve_file("configs/serve/gpu.yaml").args
    assert gpu.replicas.num_gpus == 1 and gpu.model.dtype == "fp16" and gpu.replicas.autoscaling["max_replicas"] > 1
    assert C.load_serve_file("configs/serve/default.yaml").args.replicas.num_gpus == 0


@pytest.mark.parametrize(
    "args,words",
    [
        ({"colour": 1}, "args.colour: unknown key"),
        ({"limits": {"max_steps": "many"}}, "args.limits.max_steps"),
        ({"batching": {"max_batch_size": 32}}, "max_ongoing_requests (16) must be >="),
        ({"edits": {"size": 3}}, "edits.size"),
        ({"replicas": {"max_queued_requests": 0}}, "max_queued_requests"),
    ],
)
def test_config_errors(args, words):
    with pytest.raises(ConfigError, match=None) as e:
        C.parse_args(args)
    assert words in str(e.value)


def test_model_options_use_session_router():
    from pipelines.serve.app import SESSION_ROUTER, model_options

    o = model_options(C.parse_args({"replicas": {"num_replicas": 2, "num_gpus": 0}}))
    assert o["num_replicas"] == 2 and o["ray_actor_options"]["num_gpus"] == 0
    rc = o["request_router_config"]
    assert rc.request_router_class == SESSION_ROUTER and rc.request_router_kwargs == {"num_fallback_replicas": 0}
    auto = model_options(C.load_serve_file("configs/serve/gpu.yaml").args)
    assert "autoscaling_config" in auto and "num_replicas" not in auto


# ---- request parsing ---------------------------------------------------------------------------------------------
def test_image_bytes_accepts_base64_data_urls_and_files():
    raw = b"\x89PNG..."
    text = base64.b64encode(raw).decode()
    assert parsing.image_bytes(text, "image") == raw
    assert parsing.image_bytes(f"data:image/png;base64,{text}", "image") == raw
    assert parsing.image_bytes(raw, "image") == raw
    for bad in ("%%%", "data:image/png,abc", 12):
        with pytest.raises(RequestError) as e:
            parsing.image_bytes(bad, "image")
        assert e.value.status == 400


def test_content_kind_and_body_size():
    assert parsing.content_kind("application/json; charset=utf-8") == parsing.JSON
    assert parsing.content_kind("multipart/form-data; boundary=x") == parsing.MULTIPART
    with pytest.raises(RequestError) as e:
        parsing.content_kind("text/plain")
    assert e.value.status == 415
    with pytest.raises(RequestError) as e:
        parsing.check_body_size("999", C.LimitsConfig(max_body_bytes=10))
    assert e.value.status == 413


def test_fields_use_the_config_parser():
    f = parsing.to_fields(parsing.EditFields, {"image": "x", "target_prompt": "t", "steps": 4})
    assert f.steps == 4 and f.method == "instdiffedit"
    with pytest.raises(ConfigError, match="accepted keys"):
        parsing.to_fields(parsing.EditFields, {"image": "x", "target_prompt": "t", "nope": 1})
    form = SimpleNamespace(multi_items=lambda: [("target_prompt", "4"), ("steps", "4"), ("seed", ""), ("image", "x")])
    values = parsing.form_values(parsing.EditFields, form)
    assert values == {"target_prompt": "4", "steps": 4, "image": "x"}  # text stays text; empty optional = absent


def test_error_body_shapes():
    assert error_body(ImageInputError("bad"))["status"] == 400
    assert error_body(ConfigError("x"))["status"] == 422
    oom = error_body(RuntimeError("CUDA out of memory. Tried to allocate"))
    assert oom["status"] == 503 and oom["error"]["code"] == "out_of_memory"
    bug = error_body(KeyError("secret internals"))
    assert bug["status"] == 500 and "secret" not in bug["error"]["message"]


# ---- sessions ----------------------------------------------------------------------------------------------------
class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _session(sid: str, nbytes: int):
    from pipelines.serve.sessions import Session

    cache = SimpleNamespace(nbytes=lambda: nbytes, prompt="p")
    return Session(sid, SimpleNamespace(num_steps=4), cache, "p", np.zeros((4, 4, 3), np.uint8), 0)


def test_session_store_lru_by_bytes_count_and_ttl():
    clock = _Clock()
    store = SessionStore(max_bytes=100, max_sessions=3, ttl_s=10, clock=clock)
    for sid in "abc":
        store.put(_session(sid, 30))
    store.get("a")  # a is now the most recently used
    store.put(_session("d", 30))  # 120 bytes > 100: the least recently used (b) goes
    assert "b" not in store and {"a", "c", "d"} <= {s for s in "abcd" if s in store}
    with pytest.raises(RequestError) as e:
        store.get("b")
    assert e.value.status == 404 and "evicted" in str(e.value) and "POST /v1/sessions" in str(e.value)
    clock.t = 5
    store.get("d")
    clock.t = 12  # a and c unused for 12 s > 10: expired; d was used at 5
    with pytest.raises(RequestError, match="time to live"):
        store.get("a")
    assert store.get("d").session_id == "d" and len(store) == 1
    with pytest.raises(RequestError) as e:
        store.put(_session("huge", 1000))
    assert e.value.status == 413
    store.delete("d")
    with pytest.raises(RequestError, match="deleted"):
        store.get("d")
    with pytest.raises(RequestError, match="unknown"):
        store.get("never")


# ---- batched edits ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundle():
    from instdiff.models import load_bundle

    return load_bundle("tiny", device="cpu", dtype="fp32")


def _req(seed: int, **kw) -> engine.EditRequest:
    img = np.full((32, 32, 3), 100 + seed, np.uint8)
    return engine.EditRequest(
        image=img, target_prompt=kw.pop("target_prompt", "a blue square"), seed=seed, steps=2, **kw
    )


def _prepare(bundle, reqs):
    out = []
    for r in reqs:
        try:
            out.append(engine.prepare_edit(bundle, "tiny", r, "model", "resize"))
        except Exception as exc:  # noqa: BLE001 - as the model deployment does
            out.append(error_body(exc))
    return out


def test_batch_groups_compatible_rows_and_keeps_errors_per_row(bundle):
    reqs = [_req(0), _req(1, target_prompt=" "), _req(2), _req(3, method="sdedit"), _req(4, strength=7.0)]
    out = engine.run_edits(bundle, _prepare(bundle, reqs))
    assert [o.get("status", 200) for o in out] == [200, 422, 200, 200, 422]
    assert out[0]["batch_size"] == out[2]["batch_size"] == 2 and out[3]["batch_size"] == 1
    alone = engine.run_edits(bundle, _prepare(bundle, [_req(2)]))[0]
    a = np.frombuffer(base64.b64decode(alone["image"]), np.uint8)
    assert alone["seed"] == 2 and a.size > 0 and out[2]["seed"] == 2


def test_out_of_memory_batch_is_retried_row_by_row(bundle, monkeypatch):
    import instdiff.editing as editing

    real = editing.edit
    calls = []

    def flaky(b, images, *args, **kw):
        calls.append(images.shape[0])
        if images.shape[0] > 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(b, images, *args, **kw)

    monkeypatch.setattr(editing, "edit", flaky)
    out = engine.run_edits(bundle, _prepare(bundle, [_req(0), _req(1), _req(2)]))
    assert calls == [3, 1, 1, 1] and all("image" in o for o in out)

    def always(*a, **k):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(editing, "edit", always)
    out = engine.run_edits(bundle, _prepare(bundle, [_req(0), _req(1)]))
    assert [o["status"] for o in out] == [503, 503] and out[0]["error"]["code"] == "out_of_memory"
