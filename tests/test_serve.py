"""The HTTP app through real HTTP on 127.0.0.1 (tiny model, CPU): every endpoint, JSON and multipart, determinism
against direct library calls, the bad-input matrix, concurrency with batching, the queue limit and the timeout.

Serve starts once for the module; the queue/timeout app and the two-replica app are separate applications on the
same Serve instance (each deleted after its tests). Marked slow (each over ~30 s on 2 busy cores; ``make
test-slow``): 16 clients × 4 requests with batches counted, the two-replica session affinity and time to live,
and the embedded-model case.
"""

from __future__ import annotations

import copy
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

requests = pytest.importorskip("requests")
pytest.importorskip("ray.serve")

from serve_helpers import (  # noqa: E402
    TINY_ARGS,
    b64,
    bomb_png,
    decode_b64png,
    deploy,
    png,
    scene,
    serve_instance,
    wait_healthy,
)

TIMEOUT = 120


@pytest.fixture(scope="module")
def port():
    with serve_instance() as p:
        yield p


@pytest.fixture(scope="module")
def url(port):
    deploy(TINY_ARGS, "instdiff", "/")
    base = f"http://127.0.0.1:{port}"
    wait_healthy(base)
    return base


@pytest.fixture(scope="module")
def bundle():
    from instdiff.models import load_bundle

    return load_bundle("tiny", device="cpu", dtype="fp32")


def post(url: str, path: str, **kw):
    return requests.post(f"{url}{path}", timeout=TIMEOUT, **kw)


def expected_edit(bundle, image: np.ndarray, target: str, steps: int, seed: int, method: str = "instdiffedit"):
    """The same edit by direct library calls (no server code): decode → fit → edit → composite at the input size."""
    from instdiff import imageio
    from instdiff.composite import restore
    from instdiff.config import EditConfig, Method
    from instdiff.editing import edit, size_multiple

    array, _ = imageio.decode_image(png(image))
    prepared = imageio.fit_to_multiple(array, size_multiple(bundle), "resize", bundle.resolution)
    cfg = EditConfig.for_model(bundle.defaults, "model", method=Method(method), steps=steps, seed=seed)
    result = edit(bundle, imageio.to_model_tensor(prepared.array), [target], [target], cfg, [seed])
    ((out, mask),) = restore(result, [array], [prepared], cfg)
    return out, mask


# ---- endpoints --------------------------------------------------------------------------------------------------
def test_health_models_docs_page(url):
    assert requests.get(f"{url}/healthz", timeout=10).json()["status"] == "ok"
    m = requests.get(f"{url}/v1/models", timeout=10).json()
    assert m["name"] == "tiny" and m["resolution"] == 32 and m["methods"] == ["instdiffedit", "sdedit", "diffedit"]
    assert "vocabulary" in m
    docs = requests.get(f"{url}/docs", timeout=10)
    assert docs.status_code == 200 and "openapi.json" in docs.text
    assert "jsdelivr" not in docs.text and "https://" not in docs.text  # nothing loaded from elsewhere (a CDN)
    assert "https://" not in requests.get(f"{url}/static/docs.js", timeout=10).text
    spec = requests.get(f"{url}/openapi.json", timeout=10).json()
    assert {"/v1/edits", "/v1/sessions", "/v1/sessions/{session_id}/edits", "/healthz"} <= set(spec["paths"])
    page = requests.get(f"{url}/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")


def test_edit_json_equals_library(url, bundle):
    img = scene(48, 40)
    r = post(url, "/v1/edits", json={"image": b64(png(img)), "target_prompt": "a blue square", "steps": 4, "seed": 7})
    assert r.status_code == 200, r.text
    j = r.json()
    out, mask = decode_b64png(j["image"]), decode_b64png(j["mask"])
    assert out.shape == (40, 48, 3) and mask.shape == (40, 48)
    assert set(np.unique(mask)) <= {0, 255}
    want, want_mask = expected_edit(bundle, img, "a blue square", 4, 7)
    np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(mask > 127, want_mask)
    assert j["method"] == "instdiffedit" and j["seed"] == 7 and j["unet_calls"] == 2 * 3 * 2 + 2 * 4
    p = j["parameters"]
    assert p["steps"] == 4 and p["strength"] == 0.5 and p["guidance_scale"] == 7.5 and p["n_noises"] == 3
    assert type(j["unet_calls"]) is int and "guidance" not in p  # the request's field names, as docs/serve.md says
    assert "total" not in j["timings"] and j["timings"]["batch_total"] > 0
    assert any("resized" in w for w in j["warnings"])
    assert r.headers["X-Instdiff-Batch-Size"] == "1" and r.headers["X-Instdiff-Replica"]


def test_edit_multipart_and_data_url_match_json(url):
    img = scene(40, 40, seed=3)
    fields = {"target_prompt": "a red circle", "steps": 4, "seed": 2, "method": "sdedit"}
    a = post(url, "/v1/edits", json={"image": b64(png(img)), **fields}).json()
    b = post(
        url,
        "/v1/edits",
        files={"image": ("x.png", png(img), "image/png")},
        data={k: str(v) for k, v in fields.items()},
    ).json()
    c = post(url, "/v1/edits", json={"image": "data:image/png;base64," + b64(png(img)), **fields}).json()
    assert a["image"] == b["image"] == c["image"]
    assert a["method"] == "sdedit" and decode_b64png(a["mask"]).min() == 255  # SDEdit's mask is the whole image


def test_edit_with_mask_bounds_the_change(url):
    img = scene(48, 40)
    region = np.zeros((40, 48), bool)
    region[:, :24] = True
    j = post(
        url, "/v1/edits", json={"image": b64(png(img)), "target_prompt": "x", "steps": 4, "mask": b64(png(region))}
    ).json()
    out, mask = decode_b64png(j["image"]), decode_b64png(j["mask"]) > 127
    assert not mask[:, 24:].any()
    np.testing.assert_array_equal(out[~mask], img[~mask])


def test_session_lifecycle_equals_library(url, bundle):
    from instdiff import imageio
    from instdiff.sparse.session import FISEditSession
    from pipelines.serve.sessions import session_config

    r = post(url, "/v1/sessions", json={"prompt": "a red square", "seed": 5})
    assert r.status_code == 200, r.text
    s = r.json()
    sid, replica = s["session_id"], r.headers["X-Instdiff-Replica"]
    cfg = session_config(bundle, 4, None)
    session = FISEditSession(bundle, cfg)
    image, cache = session.generate("a red square", 5)
    np.testing.assert_array_equal(decode_b64png(s["image"]), imageio.from_model_tensor(image)[0])
    assert s["steps"] == 4 and s["width"] == s["height"] == 32

    e = post(url, f"/v1/sessions/{sid}/edits", json={"prompt": "a blue square"})
    assert e.status_code == 200, e.text
    assert e.headers["X-Instdiff-Replica"] == replica
    ej = e.json()
    want = session.edit(cache, "a blue square")
    np.testing.assert_array_equal(decode_b64png(ej["image"]), imageio.from_model_tensor(want.images)[0])
    np.testing.assert_array_equal(decode_b64png(ej["mask"]) > 127, want.masks[0, 0].numpy())
    assert 0 <= ej["active_fraction"] <= 1 and ej["unet_macs_ratio"] >= 1 and ej["edits"] == 1
    assert ej["regenerate_seconds"] > 0 and set(ej["timings"]) >= {"mask", "denoise", "total"}

    # a given mask (multipart file), then the state
    region = np.zeros((32, 32), bool)
    region[8:16, 8:16] = True
    e2 = post(
        url, f"/v1/sessions/{sid}/edits", files={"mask": ("m.png", png(region), "image/png")}, data={"prompt": "x"}
    )
    assert e2.status_code == 200, e2.text
    assert e2.json()["mask_source"] == "given" and e2.json()["edits"] == 2
    g = requests.get(f"{url}/v1/sessions/{sid}", timeout=TIMEOUT).json()
    assert g["prompt"] == "x" and g["edits"] == 2 and g["image"] == e2.json()["image"]

    assert requests.delete(f"{url}/v1/sessions/{sid}", timeout=TIMEOUT).json()["deleted"] is True
    gone = requests.get(f"{url}/v1/sessions/{sid}", timeout=TIMEOUT)
    assert gone.status_code == 404 and "POST /v1/sessions" in gone.json()["error"]["message"]


def test_session_eviction_by_count(url):
    ids = [post(url, "/v1/sessions", json={"prompt": f"p{i}", "seed": i}).json()["session_id"] for i in range(4)]
    first = post(url, f"/v1/sessions/{ids[0]}/edits", json={"prompt": "q"})
    assert first.status_code == 404
    assert "evicted" in first.json()["error"]["message"] and "start a new session" in first.json()["error"]["message"]
    assert post(url, f"/v1/sessions/{ids[3]}/edits", json={"prompt": "q"}).status_code == 200


# ---- bad input --------------------------------------------------------------------------------------------------
GOOD = None  # filled lazily: a valid base64 PNG


def _good() -> str:
    global GOOD
    if GOOD is None:
        GOOD = b64(png(scene(32, 32)))
    return GOOD


def _truncated() -> str:
    data = png(scene(64, 64, seed=1))
    return b64(data[: len(data) // 2])


BAD_JSON = [
    # (name, body, status, code, words in the message)
    ("not base64", lambda: {"image": "@@not*base64@@", "target_prompt": "x"}, 400, "bad_image", "base64"),
    ("not an image", lambda: {"image": b64(b"hello world"), "target_prompt": "x"}, 400, "bad_image", "PNG"),
    ("truncated png", lambda: {"image": _truncated(), "target_prompt": "x"}, 400, "bad_image", "cannot decode"),
    ("zero-size image", lambda: {"image": "", "target_prompt": "x"}, 400, "bad_image", "empty"),
    (
        "over-limit dimensions",
        lambda: {"image": b64(png(scene(320, 40))), "target_prompt": "x"},
        413,
        "too_large",
        "300",
    ),
    ("empty prompt", lambda: {"image": _good(), "target_prompt": ""}, 422, "invalid_field", "empty"),
    ("whitespace prompt", lambda: {"image": _good(), "target_prompt": "  \t "}, 422, "invalid_field", "empty"),
    (
        "huge guidance",
        lambda: {"image": _good(), "target_prompt": "x", "guidance_scale": 1e308},
        422,
        "invalid_field",
        "100",
    ),
    (
        "unknown method",
        lambda: {"image": _good(), "target_prompt": "x", "method": "magic"},
        422,
        "invalid_field",
        "sdedit",
    ),
    ("negative steps", lambda: {"image": _good(), "target_prompt": "x", "steps": -3}, 422, "invalid_field", "steps"),
    ("huge steps", lambda: {"image": _good(), "target_prompt": "x", "steps": 10**9}, 422, "invalid_field", "50"),
    (
        "steps as text",
        lambda: {"image": _good(), "target_prompt": "x", "steps": "four"},
        422,
        "invalid_field",
        "accepted: int",
    ),
    ("seed as float", lambda: {"image": _good(), "target_prompt": "x", "seed": 1.5}, 422, "invalid_field", "seed"),
    ("prompt as list", lambda: {"image": _good(), "target_prompt": ["x"]}, 422, "invalid_field", "string"),
    (
        "strength out of range",
        lambda: {"image": _good(), "target_prompt": "x", "strength": 2},
        422,
        "invalid_field",
        "(0, 1]",
    ),
    ("missing image", lambda: {"target_prompt": "x"}, 422, "invalid_field", "image"),
    ("missing prompt", lambda: {"image": _good()}, 422, "invalid_field", "target_prompt"),
    ("unknown field", lambda: {"image": _good(), "target_prompt": "x", "colour": 1}, 422, "invalid_field", "accepted"),
    (
        "diffedit without source",
        lambda: {"image": _good(), "target_prompt": "x", "method": "diffedit"},
        422,
        "invalid_field",
        "source_prompt",
    ),
    (
        "mask of another size",
        lambda: {"image": _good(), "target_prompt": "x", "mask": b64(png(np.ones((8, 8), bool)))},
        400,
        "bad_image",
        "must match",
    ),
]


@pytest.mark.parametrize("name,body,status,code,words", BAD_JSON, ids=[b[0] for b in BAD_JSON])
def test_bad_json_inputs(url, name, body, status, code, words):
    r = post(url, "/v1/edits", json=body())
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and words in err["message"], err
    assert "Traceback" not in r.text
    assert requests.get(f"{url}/healthz", timeout=10).status_code == 200


@pytest.mark.parametrize(
    "path,kw,status,code,words",
    [
        ("/v1/edits", {"data": b"{not json", "headers": {"content-type": "application/json"}}, 400, "bad_json", "JSON"),
        ("/v1/edits", {"data": b"[1, 2]", "headers": {"content-type": "application/json"}}, 400, "bad_json", "object"),
        (
            "/v1/edits",
            {"data": b"[" * 100_000 + b"]" * 100_000, "headers": {"content-type": "application/json"}},
            400,
            "bad_json",
            "deeply",
        ),
        (
            "/v1/edits",
            {
                "data": ('{"image": "' + _good() + '", "target_prompt": "\\ud800"}').encode(),
                "headers": {"content-type": "application/json"},
            },
            422,
            "invalid_field",
            "Unicode",
        ),
        ("/v1/edits", {"data": b"x", "headers": {"content-type": "text/plain"}}, 415, "unsupported_media_type", "json"),
        (
            "/v1/edits",
            {"data": b"x" * 500_000, "headers": {"content-type": "application/json"}},
            413,
            "too_large",
            "400000",
        ),
        ("/v1/sessions", {"json": {"prompt": " ", "seed": 1}}, 422, "invalid_field", "empty"),
        ("/v1/sessions", {"json": {"prompt": "x", "seed": "one"}}, 422, "invalid_field", "seed"),
        ("/v1/sessions", {"json": {"prompt": "x", "steps": 0}}, 422, "invalid_field", "steps"),
        ("/v1/sessions/nope/edits", {"json": {"prompt": "x"}}, 404, "session_not_found", "POST /v1/sessions"),
        (
            "/v1/edits",
            {"files": {"image": ("a.png", b"garbage", "image/png")}, "data": {"target_prompt": "x"}},
            400,
            "bad_image",
            "PNG",
        ),
        (
            "/v1/edits",
            {
                "files": {"image": ("a.png", png(scene(32, 32)), "image/png")},
                "data": {"target_prompt": "x", "steps": "lots"},
            },
            422,
            "invalid_field",
            "accepted: int",
        ),
    ],
)
def test_bad_requests(url, path, kw, status, code, words):
    r = post(url, path, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and words in err["message"], err
    assert requests.get(f"{url}/healthz", timeout=10).status_code == 200


def test_unknown_routes_and_sessions(url):
    assert requests.get(f"{url}/v1/nothing", timeout=10).json()["error"]["code"] == "not_found"
    r = requests.delete(f"{url}/v1/sessions/0123", timeout=10)
    assert r.status_code == 404 and "unknown" in r.json()["error"]["message"]
    assert requests.get(f"{url}/v1/edits", timeout=10).status_code == 405


# ---- concurrency -------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_concurrent_clients_form_batches(url, bundle):
    """16 clients × 4 requests: all answered, each the same as its direct library call; batches > 1 formed."""
    images = {s: scene(32, 32, seed=s) for s in range(4)}

    def client(c: int) -> list[tuple[int, int, str, int]]:
        out = []
        with requests.Session() as http:
            for k in range(4):
                s = (c + k) % 4
                r = http.post(
                    f"{url}/v1/edits",
                    json={"image": b64(png(images[s])), "target_prompt": "a blue square", "steps": 4, "seed": s},
                    timeout=TIMEOUT,
                )
                out.append(
                    (r.status_code, s, r.json().get("image", r.text), int(r.headers.get("X-Instdiff-Batch-Size", 0)))
                )
        return out

    t0 = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        results = [x for chunk in pool.map(client, range(16)) for x in chunk]
    assert len(results) == 64 and time.monotonic() - t0 < 240
    assert all(st == 200 for st, *_ in results), [r[2][:200] for r in results if r[0] != 200]
    sizes = [b for *_, b in results]
    assert max(sizes) > 1, sizes
    expected = {s: expected_edit(bundle, images[s], "a blue square", 4, s)[0] for s in images}
    for _, s, image, _b in results:
        got = decode_b64png(image).astype(int)
        assert np.abs(got - expected[s]).max() <= 2  # batched rows: same up to float rounding of batched kernels


# ---- queue limit and timeout ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_queue_url(port, url):
    from ray import serve

    args = copy.deepcopy(TINY_ARGS)
    args["replicas"].update(max_ongoing_requests=1, max_queued_requests=1)
    args["batching"] = {"max_batch_size": 1, "batch_wait_timeout_s": 0.0}
    args["limits"].update(request_timeout_s=4, max_steps=1000)
    deploy(args, "queue", "/q")
    yield f"http://127.0.0.1:{port}/q"
    serve.delete("queue")


def test_queue_limit_answers_503(small_queue_url):
    body = {"image": b64(png(scene(32, 32))), "target_prompt": "x", "steps": 60, "method": "sdedit"}
    t0 = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        rs = list(pool.map(lambda _: requests.post(f"{small_queue_url}/v1/edits", json=body, timeout=60), range(8)))
    assert time.monotonic() - t0 < 60
    codes = [r.status_code for r in rs]
    assert set(codes) <= {200, 503, 504} and 503 in codes and 200 in codes, codes
    busy = next(r for r in rs if r.status_code == 503)
    assert busy.headers["Retry-After"] == "3" and busy.json()["error"]["code"] == "queue_full"


def test_timeout_answers_504(small_queue_url):
    time.sleep(3)  # let the queue drain
    # 999 steps (the most a 1000-step schedule takes): about 10 s on an idle CPU, well past the 4 s timeout
    body = {"image": b64(png(scene(32, 32))), "target_prompt": "x", "steps": 999, "strength": 1.0, "method": "sdedit"}
    r = requests.post(f"{small_queue_url}/v1/edits", json=body, timeout=60)
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout", r.text
    assert "request_timeout_s" in r.json()["error"]["message"]


# ---- two replicas: sessions stay with their cache; time to live -----------------------------------------------------
@pytest.fixture(scope="module")
def two_replicas_url(port, url):
    from ray import serve

    args = copy.deepcopy(TINY_ARGS)
    args["replicas"]["num_replicas"] = 2
    args["sessions"].update(ttl_s=4, max_sessions=100)
    deploy(args, "pair", "/pair")
    yield f"http://127.0.0.1:{port}/pair"
    serve.delete("pair")


@pytest.mark.slow
def test_two_replicas_session_affinity(two_replicas_url):
    """Every edit of a session is served by the replica that made it (its cache); sessions spread over both."""
    u = two_replicas_url
    made = {}
    for i in range(10):
        r = requests.post(f"{u}/v1/sessions", json={"prompt": f"a red square {i}", "seed": i}, timeout=TIMEOUT)
        assert r.status_code == 200, r.text
        made[r.json()["session_id"]] = r.headers["X-Instdiff-Replica"]
    assert len(set(made.values())) == 2, made

    def edit(sid: str) -> tuple[str, int, str]:
        r = requests.post(f"{u}/v1/sessions/{sid}/edits", json={"prompt": "a blue square"}, timeout=TIMEOUT)
        return sid, r.status_code, r.headers.get("X-Instdiff-Replica", "")

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(edit, list(made) * 2))
    for sid, status, replica in results:
        assert status == 200 and replica == made[sid], (sid, status, replica, made[sid])
    # plain edits are spread too (hashed by request id), and do not disturb sessions
    seen = {
        requests.post(
            f"{u}/v1/edits", json={"image": b64(png(scene(32, 32))), "target_prompt": "x", "steps": 2}, timeout=TIMEOUT
        ).headers["X-Instdiff-Replica"]
        for _ in range(8)
    }
    assert seen <= set(made.values()) and len(seen) == 2


@pytest.mark.slow
def test_session_time_to_live(two_replicas_url):
    u = two_replicas_url
    sid = requests.post(f"{u}/v1/sessions", json={"prompt": "p", "seed": 1}, timeout=TIMEOUT).json()["session_id"]
    assert requests.get(f"{u}/v1/sessions/{sid}", timeout=TIMEOUT).status_code == 200
    time.sleep(5)
    r = requests.get(f"{u}/v1/sessions/{sid}", timeout=TIMEOUT)
    assert r.status_code == 404 and "time to live" in r.json()["error"]["message"]


# ---- the embedded model ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_embedded_model_edit_and_session(port, url):
    """One edit and one session on the embedded shapes model, equal to direct library calls."""
    from ray import serve

    from instdiff import imageio
    from instdiff.models import embedded_model_available, load_bundle

    if not embedded_model_available():
        pytest.skip("the embedded model is not in instdiff/assets/shapes")
    args = copy.deepcopy(TINY_ARGS)
    args["model"]["spec"] = "default"
    args["sessions"]["steps"] = 3
    deploy(args, "emb", "/emb")
    try:
        u = f"http://127.0.0.1:{port}/emb"
        b = load_bundle("default", device="cpu", dtype="fp32")
        img = scene(64, 64, seed=4)
        r = requests.post(
            f"{u}/v1/edits",
            json={"image": b64(png(img)), "target_prompt": "a blue circle", "steps": 4, "seed": 1},
            timeout=TIMEOUT,
        )
        assert r.status_code == 200, r.text
        j = r.json()
        assert j["parameters"]["guidance_scale"] == 5.0  # the model folder's default
        import torch

        from instdiff.config import EditConfig
        from instdiff.editing import edit

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the replica's thread count: the same float reduction order
        try:
            want = edit(
                b,
                imageio.to_model_tensor(img),
                ["a blue circle"],
                ["a blue circle"],
                EditConfig.for_model(b.defaults, "model", steps=4, seed=1),  # the app's settings: the model's
                [1],
            )
        finally:
            torch.set_num_threads(threads)
        np.testing.assert_array_equal(decode_b64png(j["image"]), imageio.from_model_tensor(want.images)[0])
        s = requests.post(
            f"{u}/v1/sessions", json={"prompt": "a red square on a gray background", "seed": 0}, timeout=TIMEOUT
        )
        assert s.status_code == 200 and s.json()["width"] == 64
        e = requests.post(
            f"{u}/v1/sessions/{s.json()['session_id']}/edits",
            json={"prompt": "a blue square on a gray background"},
            timeout=TIMEOUT,
        )
        assert e.status_code == 200 and decode_b64png(e.json()["image"]).shape == (64, 64, 3)
    finally:
        serve.delete("emb")


def test_a_field_given_twice_is_refused(url):
    """JSON keys and form fields given twice: 400 naming the field (no silent last-one-wins), then /healthz 200."""
    dup = ('{"image": "' + _good() + '", "target_prompt": "a", "target_prompt": "b"}').encode()
    r = requests.post(f"{url}/v1/edits", data=dup, headers={"content-type": "application/json"}, timeout=TIMEOUT)
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_json", r.text
    assert "'target_prompt' is given twice" in r.json()["error"]["message"]
    r = requests.post(
        f"{url}/v1/edits",
        files=[("image", ("x.png", png(scene(32, 32)), "image/png"))],
        data=[("target_prompt", "a"), ("target_prompt", "b")],
        timeout=TIMEOUT,
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_multipart", r.text
    assert "'target_prompt' is given twice" in r.json()["error"]["message"]
    assert requests.get(f"{url}/healthz", timeout=10).status_code == 200


def test_odd_paths_methods_and_hostile_values(url):
    """Trailing slashes, HEAD, overlong session ids and integers, a decompression-bomb header: each answered in the
    API's JSON error shape with what is accepted (or served), then /healthz 200."""
    for path in ("/v1/edits/", "/v1/models/", "/healthz/"):
        r = requests.request("POST" if "edits" in path else "GET", f"{url}{path}", timeout=10, allow_redirects=False)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", (path, r.status_code, r.text)
        assert f"paths take no trailing slash: {path.rstrip('/')}" in r.json()["error"]["message"]
    head = requests.head(f"{url}/healthz", timeout=10)
    assert head.status_code == 200 and head.text == ""
    long_id = "a" * 5000
    for method in ("GET", "DELETE"):
        r = requests.request(method, f"{url}/v1/sessions/{long_id}", timeout=10)
        assert r.status_code == 422 and "32 hex digits" in r.json()["error"]["message"], r.text
        assert long_id not in r.text
    r = post(url, f"/v1/sessions/{long_id}/edits", json={"prompt": "x"})
    assert r.status_code == 422 and long_id not in r.text
    seed = '{"image": "' + _good() + '", "target_prompt": "x", "seed": ' + "9" * 5000 + "}"
    r = post(url, "/v1/edits", data=seed.encode(), headers={"content-type": "application/json"})
    assert r.status_code == 422 and "seed: a 5000-digit integer is out of range" in r.text, r.text
    assert "set_int_max_str_digits" not in r.text
    r = post(url, "/v1/edits", json={"image": b64(bomb_png()), "target_prompt": "x"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large", r.text
    assert "90000 pixels" in r.json()["error"]["message"]
    assert requests.get(f"{url}/healthz", timeout=10).status_code == 200
