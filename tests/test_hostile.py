"""Hostile and careless clients (issue #31, docs/security.md): every such request is a 4xx (or a
bounded answer), nothing is queued for it, and the service keeps answering `/healthz` within a
second while it is handled and after.

The cases are classes, not examples: numbers no field can take, nesting, broken Unicode, prompts
the parser must stay linear on, png-info bombs (text and pixels), seeds that overflow, and jobs
above the cost budget. Hypothesis fuzzes the parsers directly and one field at a time over HTTP.
"""
from __future__ import annotations

import base64
import json
import struct
import subprocess
import sys
import threading
import time
import zlib

import httpx
import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st
from PIL import Image

from diffusionapi.engine import prompts as pp
from diffusionapi.images import build_infotext, encode_image, parse_infotext
from diffusionapi.limits import LimitExceeded, check_prompt
from diffusionapi.security import jsonbody

from .conftest import LiveServer, make_settings

HEALTH_TIMEOUT = 1.0  # the bar: /healthz answers within a second, during and after


@pytest.fixture(scope="module")
def server(model_store, tmp_path_factory):
    settings = make_settings(model_store, tmp_path_factory.mktemp("hostile"))
    with LiveServer(settings) as s:
        yield s


class HealthProbe:
    """Asks GET /healthz over a fresh connection every 50 ms in a thread; records every answer
    that did not come (a 200) within HEALTH_TIMEOUT."""

    def __init__(self, url: str):
        self.url, self.misses, self.answers = url, [], 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                r = httpx.get(self.url + "/healthz", timeout=HEALTH_TIMEOUT)
                if r.status_code == 200:
                    self.answers += 1
                else:
                    self.misses.append(r.status_code)
            except httpx.HTTPError as e:
                self.misses.append(repr(e))
            self._stop.wait(0.05)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(10)
        assert not self.misses, f"/healthz missed {len(self.misses)} times: {self.misses[:3]}"
        assert self.answers >= 1
        r = httpx.get(self.url + "/healthz", timeout=HEALTH_TIMEOUT)  # and after
        assert r.status_code == 200


def _post(server, path: str, body, *, content_type="application/json"):
    raw = body if isinstance(body, (bytes, str)) else json.dumps(body)
    # A fresh connection each time: one bad request must not depend on another's connection state.
    return httpx.post(server.url + path, content=raw, headers={"content-type": content_type}, timeout=60)


def _queued(server) -> int:
    return len(server.client.get("/queue").json()["jobs"])


# ---------------------------------------------------------------------------- PNG helpers

def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_with(width: int, height: int, *chunks: bytes, pixels: bool = True) -> bytes:
    """A PNG of the given header size; text chunks before the image data. With ``pixels``
    the data is a real (all-zero) RGBA image, compressed to almost nothing."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    if pixels:
        comp = zlib.compressobj(9)
        row = b"\x00" * (1 + 4 * width)
        data = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    else:
        data = zlib.compress(b"\x00" * (1 + 4 * width))  # one row: a header that promises more
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + b"".join(chunks) + _chunk(b"IDAT", data)
            + _chunk(b"IEND", b""))


def text_chunk(key: str, text: str, compressed: bool = False) -> bytes:
    if compressed:
        return _chunk(b"zTXt", key.encode() + b"\x00\x00" + zlib.compress(text.encode("latin-1"), 9))
    return _chunk(b"tEXt", key.encode() + b"\x00" + text.encode("latin-1"))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# ---------------------------------------------------------------------------- png-info bombs

QUADRATIC_LINE = "a" + ", " * 30_000 + "k: v"  # the old parser searched for ':' again at every ','


@pytest.mark.parametrize("path", ["/png-info", "/sdapi/v1/png-info"])
def test_png_info_text_bombs_are_refused_or_cheap(server, path):
    big = "x, " * 400_000  # 1.2 MB of text, 1 KB compressed
    cases = {
        "oversized compressed text": png_with(1, 1, text_chunk("parameters", big[:1_000_000], compressed=True)),
        "many text chunks": png_with(1, 1, *[text_chunk(f"k{i}", "y" * 60_000, compressed=True) for i in range(30)]),
    }
    with HealthProbe(server.url):
        for name, data in cases.items():
            r = _post(server, path, {"image": b64(data)})
            assert r.status_code == 413, (name, r.status_code, r.text[:200])
            assert "image" in r.text and "limit" in r.text
        # Under the cap, the pathological line that was quadratic is read in one pass.
        ok = png_with(1, 1, text_chunk("parameters", "prompt\n" + QUADRATIC_LINE[:60_000]))
        r = _post(server, path, {"image": b64(ok)})
        assert r.status_code == 200, r.text[:300]


@pytest.mark.parametrize("path", ["/png-info", "/sdapi/v1/png-info"])
def test_png_info_pixel_bombs_are_refused_from_the_header(server, path):
    with HealthProbe(server.url):
        for w, h in ((20_000, 20_000), (5_000, 5_000)):  # 400 Mpx (Pillow's own guard), 25 Mpx (ours)
            r = _post(server, path, {"image": b64(png_with(w, h, pixels=False))})
            assert r.status_code == 413, (w, r.status_code, r.text[:200])
            assert "pixels" in r.text or "too large" in r.text


@pytest.mark.parametrize("bomb", ["pixels", "text"])
def test_png_info_memory_is_bounded(bomb):
    """``pixels``: a PNG without infotext that decodes to 64 MB: reading its info costs no pixel
    memory (the old path called Pillow's getexif(), which decodes the whole image). ``text``: 60
    compressed text chunks of 1 MB each (Pillow would hold 60 MB of text): refused before they
    are inflated. Measured in a child process, against the same child without the read."""
    if bomb == "pixels":
        data = png_with(4096, 4096)
    else:
        data = png_with(1, 1, *[text_chunk(f"k{i}", "y" * 1_000_000, compressed=True) for i in range(60)])
    assert len(data) < 200_000
    code = ("import resource,sys\nfrom diffusionapi.images import read_untrusted_infotext\n"
            "data=sys.stdin.buffer.read()\nbase=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "if sys.argv[1]=='read':\n try: print(read_untrusted_infotext(data, 4096*4096, 65536))\n"
            " except ValueError as e: print(e)\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)\n")

    def grow(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", code, mode], input=data, capture_output=True, check=True)
        return int(out.stdout.decode().split()[-1])  # KiB

    assert grow("read") - grow("none") < 16 * 1024  # a decode would be >= 64 MiB


def test_png_info_bombs_in_parallel_leave_the_loop_free(server):
    """Eight clients send the heaviest png-info request the limits allow, at once; a ninth
    client's /healthz is answered all along (the work runs in worker threads)."""
    text = "prompt\n" + QUADRATIC_LINE[:65_000]
    data = b64(png_with(2048, 2048, text_chunk("parameters", text)))
    results: list[int] = []

    def one(path):
        results.append(_post(server, path, {"image": data}).status_code)

    with HealthProbe(server.url):
        threads = [threading.Thread(target=one, args=(p,)) for p in ["/png-info", "/sdapi/v1/png-info"] * 4]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert results == [200] * 8


def test_png_info_still_reads_real_infotext(server):
    text = build_infotext("a boat", "rain", {"Steps": 7, "Sampler": "Euler a", "Seed": 12, "Size": "64x32"})
    for kind in ("png", "jpg"):
        data = encode_image(Image.new("RGB", (64, 32)), kind, 90, text)
        assert _post(server, "/png-info", {"image": b64(data)}).json()["infotext"] == text
        assert _post(server, "/sdapi/v1/png-info", {"image": b64(data)}).json()["info"] == text


# ---------------------------------------------------------------------------- 4xx, not 500

DEEP = "[" * 100_000 + "]" * 100_000
TINY = {"prompt": "a", "width": 64, "height": 64, "steps": 1}


def _raw(fields: dict, **raw_values: str) -> str:
    """A JSON object with some values written raw (numbers JSON cannot round-trip from Python)."""
    body = json.dumps(fields)[:-1]
    for k, v in raw_values.items():
        body += f', "{k}": {v}'
    return body + "}"


HOSTILE = [
    # (name, path, body, the field the answer must name or None)
    ("width 10^400", "/txt2img", _raw(TINY, width="1" + "0" * 400), "width"),
    ("width 1e400", "/txt2img", _raw(TINY, width="1e400"), "width"),
    ("width as a 400-digit string", "/txt2img", _raw(TINY, width='"1' + "0" * 400 + '"'), "width"),
    ("10^5000: past Python's int digits", "/txt2img", _raw(TINY, width="9" * 5000), None),
    ("cfg Infinity", "/txt2img", _raw(TINY, cfg_scale="Infinity"), "cfg_scale"),
    ("cfg NaN", "/txt2img", _raw(TINY, cfg_scale="NaN"), "cfg_scale"),
    ("cfg '-inf' string", "/txt2img", _raw(TINY, cfg_scale='"-inf"'), "cfg_scale"),
    ("hires scale Infinity", "/txt2img", _raw(TINY, hires='{"enabled": true, "scale": Infinity}'), "hires"),
    ("hires scale 1e308", "/txt2img", _raw(TINY, hires='{"enabled": true, "scale": 1e308}'), "hires.scale"),
    ("seed 2^64-1, batch 2", "/txt2img", {**TINY, "seed": 2**64 - 1, "batch_size": 2}, "seed"),
    ("seed 2^64-8, n_iter 16", "/txt2img", {**TINY, "seed": 2**64 - 8, "n_iter": 16}, "seed"),
    ("seed 2^64", "/txt2img", {**TINY, "seed": 2**64}, "seed"),
    ("lone surrogate in prompt", "/txt2img", '{"prompt": "a\\ud800b", "steps": 1}', "prompt"),
    ("lone low surrogate in negative", "/txt2img", '{"prompt": "a", "negative_prompt": "\\udfff"}', "negative_prompt"),
    ("surrogate in a key", "/txt2img", '{"prompt": "a", "\\ud800": 1}', None),
    ("5000 nested (", "/txt2img", {**TINY, "prompt": "(" * 5000 + "a"}, "prompt"),
    ("5000 nested [", "/txt2img", {**TINY, "prompt": "[" * 5000 + "a"}, "prompt"),
    ("weight overflow", "/txt2img", {**TINY, "prompt": "((a:1" + "0" * 400 + "))"}, "prompt"),
    ("weight 1e11", "/txt2img", {**TINY, "prompt": "(a:99999999999)"}, "prompt"),
    ("AND weight 1e12", "/txt2img", {**TINY, "prompt": "a :1000000000000 AND b"}, "prompt"),
    ("nested 100k deep", "/txt2img", DEEP, None),
    ("objects nested 50k deep", "/txt2img", '{"a":' * 50_000 + "1" + "}" * 50_000, None),
    ("img2img width 10^400", "/img2img", _raw({"prompt": "a", "init_image": "x"}, width="1" + "0" * 400), "width"),
    ("upscale scale Infinity", "/upscale", _raw({"image": "x", "upscaler": "Lanczos"}, scale="Infinity"), "scale"),
    # the A1111 dialect
    ("sdapi nested 100k deep", "/sdapi/v1/txt2img", DEEP, None),
    ("sdapi objects nested", "/sdapi/v1/txt2img", '{"a":' * 50_000 + "1" + "}" * 50_000, None),
    ("sdapi width 10^400", "/sdapi/v1/txt2img", _raw(TINY, width="1" + "0" * 400), "width"),
    ("sdapi width '1e999' string", "/sdapi/v1/txt2img", _raw(TINY, width='"1e999"'), "width"),
    ("sdapi CLIP_stop 1e999", "/sdapi/v1/txt2img",
     _raw(TINY, override_settings='{"CLIP_stop_at_last_layers": 1e999}'), "CLIP_stop_at_last_layers"),
    ("sdapi CLIP_stop '1e999' string", "/sdapi/v1/txt2img",
     _raw(TINY, override_settings='{"CLIP_stop_at_last_layers": "1e999"}'), "CLIP_stop_at_last_layers"),
    ("sdapi options CLIP_stop 1e999", "/sdapi/v1/options", '{"CLIP_stop_at_last_layers": 1e999}',
     "CLIP_stop_at_last_layers"),
    ("sdapi enable_hr width 0", "/sdapi/v1/txt2img", {**TINY, "enable_hr": True, "width": 0}, "width"),
    ("sdapi enable_hr width 0 with resize", "/sdapi/v1/txt2img",
     {**TINY, "enable_hr": True, "width": 0, "hr_resize_x": 512}, "width"),
    ("sdapi hr_scale Infinity", "/sdapi/v1/txt2img", _raw({**TINY, "enable_hr": True}, hr_scale="Infinity"),
     "hr_scale"),
    ("sdapi upscaling_resize Infinity", "/sdapi/v1/extra-single-image",
     _raw({"image": "x"}, upscaling_resize="Infinity"), "upscaling_resize"),
    ("sdapi upscaling_resize 1e308", "/sdapi/v1/extra-single-image",
     {"image": b64(png_with(1, 1)), "upscaling_resize": 1e308}, None),
    ("sdapi upscale 16x past the pixel limit", "/sdapi/v1/extra-single-image",
     {"image": b64(png_with(1024, 1024)), "upscaling_resize": 16, "upscaler_1": "Lanczos"}, "upscaling_resize"),
    ("sdapi upscale to 0 wide", "/sdapi/v1/extra-single-image",
     {"image": b64(png_with(1, 1)), "resize_mode": 1, "upscaling_resize_w": 0, "upscaling_resize_h": 8},
     "upscaling_resize_w"),
    ("sdapi upscale of a 25 Mpx image", "/sdapi/v1/extra-single-image",
     {"image": b64(png_with(5000, 5000, pixels=False)), "upscaler_1": "Nearest"}, "image"),
    ("sdapi surrogate prompt", "/sdapi/v1/txt2img", '{"prompt": "\\ud83d", "steps": 1}', "prompt"),
    ("sdapi seed 2^64-1 batch 2", "/sdapi/v1/txt2img", {**TINY, "seed": 2**64 - 1, "batch_size": 2}, "seed"),
    ("sdapi 5000 nested (", "/sdapi/v1/txt2img", {**TINY, "prompt": "(" * 5000}, "prompt"),
    ("sdapi png-info 400 Mpx", "/sdapi/v1/png-info", {"image": b64(png_with(20_000, 20_000, pixels=False))}, "image"),
    ("png-info 400 Mpx", "/png-info", {"image": b64(png_with(20_000, 20_000, pixels=False))}, "image"),
]


@pytest.mark.parametrize("name,path,body,field", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_input_is_a_4xx_naming_the_field(server, name, path, body, field):
    before = _queued(server)
    with HealthProbe(server.url):
        r = _post(server, path, body)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    data = r.json()
    message = data["detail"] if path.startswith("/sdapi/") else data["error"]
    assert isinstance(message, str)
    if field:
        assert field in message, message[:300]
    if path.startswith("/sdapi/"):
        assert data["error"] in ("HTTPException",) and data["errors"] == data["detail"]  # A1111's shape
    else:
        assert data["status"] == "error"
    assert _queued(server) == before  # nothing was queued


def test_prompt_parser_is_linear_on_hostile_prompts():
    """Each was quadratic (or worse) in a 10,000-character prompt; now each is one pass. The
    check is on growth, not on time: 4x the text must cost well under 16x the work."""
    makers = {
        "spaces": lambda n: "a" + " " * n + "b",
        "open brackets": lambda n: "(a" * (n // 2),
        "unclosed tags": lambda n: "<a:" * (n // 3),
        "colons": lambda n: "(a: " * (n // 4),
        "digits": lambda n: "a:" + "1" * n + " x",
    }

    def work(text):
        t = time.process_time()
        for f in (pp.split_and, pp.parse_attention, pp.extract_extra_networks):
            f(text)
        try:
            check_prompt(text, "prompt")
        except LimitExceeded:
            pass
        return time.process_time() - t

    for name, make in makers.items():
        small = min(work(make(2_500)) for _ in range(3))
        big = min(work(make(10_000)) for _ in range(3))
        assert big < max(small, 0.002) * 10, (name, small, big)


# ---------------------------------------------------------------------------- cost budget

def test_cost_budget_refuses_at_submit_and_says_what_to_lower(server):
    before = _queued(server)
    big = {"prompt": " AND ".join(["a cat"] * 200), "width": 2048, "height": 2048, "steps": 150}
    r = _post(server, "/txt2img", big)
    assert r.status_code == 422, r.text[:300]
    msg = r.json()["error"]
    assert msg.startswith("cost: ") and "DIFFUSIONAPI_MAX_COST" in msg
    for lever in ("width/height", "steps", "AND parts"):
        assert lever in msg
    r = _post(server, "/txt2img", {"prompt": " BREAK ".join(["a"] * 400), "width": 2048, "height": 2048,
                                   "steps": 150, "batch_size": 1})
    assert r.status_code == 422 and "cost" in r.json()["error"]
    r = _post(server, "/sdapi/v1/txt2img", big)
    assert r.status_code == 422 and "DIFFUSIONAPI_MAX_COST" in r.json()["detail"]
    assert _queued(server) == before


def test_cost_counts_hires_batch_and_conditioning():
    from diffusionapi.limits import job_cost
    from types import SimpleNamespace as NS

    def plan(**kw):
        base = dict(prompt="a", negative_prompt="", width=512, height=512, steps=20, batch_size=1, n_iter=1,
                    hires=None, init=None, controlnets=(), ip_adapters=())
        return NS(**{**base, **kw})

    one = job_cost(plan())[0]
    assert one == pytest.approx(512 * 512 * 20 / 1e6)
    assert job_cost(plan(batch_size=2, n_iter=3))[0] == pytest.approx(6 * one)
    assert job_cost(plan(prompt="a AND b AND c"))[0] == pytest.approx(2 * one)  # (3 + 1 negative) / 2
    assert job_cost(plan(prompt="a BREAK b"))[0] == pytest.approx(1.5 * one)
    hires = NS(width=1024, height=1024, steps=10)
    assert job_cost(plan(hires=hires))[0] == pytest.approx(one + 1024 * 1024 * 10 / 1e6)


# ---------------------------------------------------------------------------- fuzzing

HOSTILE_VALUES = st.one_of(
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["1e999", "-inf", "NaN", "9" * 400, "\ud800", "(" * 3000, "", " ", "0x10", "1_000"]),
    st.text(max_size=50),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
    st.none(), st.booleans(),
)
NATIVE_FIELDS = ["width", "height", "steps", "cfg_scale", "seed", "batch_size", "n_iter", "clip_skip",
                 "refiner_switch_at", "jpeg_quality", "sampler_name", "scheduler_type", "hires", "loras",
                 "preview", "prompt", "negative_prompt", "fileType", "model"]
SDAPI_FIELDS = ["width", "height", "steps", "cfg_scale", "seed", "batch_size", "n_iter", "hr_scale",
                "enable_hr", "hr_resize_x", "hr_second_pass_steps", "denoising_strength", "override_settings",
                "sampler_name", "scheduler", "prompt", "clip_skip", "refiner_switch_at", "alwayson_scripts"]


def _to_json(value) -> str:
    """JSON text, with NaN/Infinity written as JSON-ish clients write them and lone surrogates
    escaped (json.dumps does both)."""
    return json.dumps(value)


@pytest.fixture(scope="module")
def small_server(model_store, tmp_path_factory):
    """Limits so tight that any request the fuzzer makes valid is a tiny job (the /sdapi route
    waits for its job to finish)."""
    settings = make_settings(model_store, tmp_path_factory.mktemp("fuzz"), max_width=64, max_height=64,
                             max_steps=2, max_batch_size=1, max_n_iter=1, max_hires_scale=1.5, max_cost=0.05)
    with LiveServer(settings) as s:
        yield s


@hsettings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(field=st.sampled_from(NATIVE_FIELDS + ["sdapi:" + f for f in SDAPI_FIELDS]), value=HOSTILE_VALUES)
def test_fuzz_one_field_never_5xx(small_server, field, value):
    server, path = small_server, "/txt2img"
    if field.startswith("sdapi:"):
        path, field = "/sdapi/v1/txt2img", field.split(":", 1)[1]
    body = '{"prompt": "fuzz", "width": 64, "height": 64, "steps": 1, ' + json.dumps(field) + ": " + _to_json(value) + "}"
    with HealthProbe(server.url):
        r = _post(server, path, body)
    assert r.status_code < 500 or r.status_code == 503, (field, value, r.status_code, r.text[:300])
    if path == "/txt2img" and r.status_code == 200:  # valid after all: don't leave it running
        server.client.delete(f"/queue/{r.json()['job_id']}")
        server.wait(r.json()["job_id"])


@hsettings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("[]{}\":,0123456789.eE-+ tfrnulaINfy\\ud") + ["\ud800"]), max_size=200))
def test_fuzz_json_parser_refuses_only_with_known_errors(text):
    try:
        value = jsonbody.parse(text)
    except jsonbody.BodyError as e:
        assert 400 <= e.status < 500 and str(e)
    except ValueError:
        pass  # not JSON: the route answers as for any malformed body
    else:
        jsonbody.check(value)


@hsettings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(list("ab ,:\"\\\n()[]|<>0.5e9") + ["AND", "BREAK", "Negative prompt:", "Steps: 2"]),
                max_size=120).map("".join))
def test_fuzz_prompt_and_infotext_parsers_never_raise_unknown_errors(text):
    items = parse_infotext(text)
    assert isinstance(items["Prompt"], str)
    for f in (pp.split_and, pp.parse_attention, lambda t: pp.prompt_schedule(t, 20)):
        f(text)
    try:
        pp.extract_extra_networks(text)
        check_prompt(text, "prompt")
    except (pp.PromptError, LimitExceeded):
        pass


@pytest.mark.parametrize("body,param", [('{"prompt": "a", "n": 1e400}', "n"), ('{"prompt": "\\ud800"}', "prompt"),
                                        ("[" * 100_000 + "]" * 100_000, None)])
def test_the_openai_dialect_answers_hostile_bodies_in_its_own_shape(server, body, param):
    r = _post(server, "/v1/images/generations", body)
    assert 400 <= r.status_code < 500, r.text[:300]
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]
