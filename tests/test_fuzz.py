"""Fuzzing: schemathesis against our own OpenAPI schema; hypothesis on the request model and labels."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from diffusionapi.registry import UnknownName, Registry, derive_label, normalise
from diffusionapi.vocabulary import ModelEntry
from diffusionapi.schemas import Txt2ImgRequest

from .conftest import LiveServer, make_settings


@pytest.fixture(scope="module")
def fuzz_server(model_store, tmp_path_factory):
    # Tight limits so that the valid requests the fuzzer finds are cheap to run; an API key so
    # that `ignored_auth` checks every operation the document marks as guarded refuses a request
    # without it (the run sends it with -H).
    s = make_settings(model_store, tmp_path_factory.mktemp("fuzz"), max_width=64, max_height=64, max_steps=2,
                      max_hires_scale=1.5, max_queued_jobs=1000, api_key=FUZZ_KEY)
    with LiveServer(s) as server:
        yield server


# Every schemathesis check but three, each left out for a reason:
# - positive_data_acceptance: names (models, LoRAs, upscalers) cannot be in the schema, so a
#   schema-valid body may rightly get a 422 (tests/schemathesis_hooks.py steers positive submits
#   to installed names so the stateful phase can follow the links);
# - use_after_free: DELETE /queue/{id} cancels; the cancelled job's final status is then served
#   once, as for every job (README), so a GET after a DELETE is a 200 by design;
# - max_response_time (which `--checks all` adds): a timing, and the tests assert none.
CHECKS = ("not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_headers_conformance", "response_schema_conformance", "negative_data_rejection",
          "missing_required_header", "unsupported_method", "allow_header_conformance",
          "ensure_resource_availability", "ignored_auth", "object_level_authorization")
ROOT = Path(__file__).resolve().parents[1]
FUZZ_KEY = "fuzz-key"


def schemathesis_run(url: str, workdir: Path, *args: str) -> str:
    """The schemathesis CLI against a live server, as anyone would run it; returns its output."""
    env = dict(os.environ, SCHEMATHESIS_HOOKS="tests.schemathesis_hooks", PYTHONPATH=str(ROOT), NO_COLOR="1")
    proc = subprocess.run([sys.executable, "-m", "schemathesis.cli", "run", url + "/openapi.json",
                           "--checks", ",".join(CHECKS), "--seed", "1", "--workers", "1",
                           "--request-timeout", "60", "--no-color", *args],
                          cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-8000:]
    return out


@pytest.mark.slow
def test_schemathesis_all_phases_no_5xx_responses_match_and_links_are_followed(fuzz_server, tmp_path):
    out = schemathesis_run(fuzz_server.url, tmp_path, "--phases", "examples,coverage,fuzzing,stateful", "--max-examples", "15",
                           "-H", f"X-API-Key: {FUZZ_KEY}")
    operations = sum(len([m for m in item if m != "parameters"]) for item in fuzz_server.app.openapi()["paths"].values())
    assert re.search(rf"Tested:\s+{operations}\b", out), out[-4000:]  # every operation was exercised
    links = re.search(r"API Links:\s+(\d+) covered / (\d+) selected", out)
    assert links, out[-4000:]
    covered, selected = map(int, links.groups())
    # The stateful phase followed links from a submit to the job's operations (status, cancel).
    # /img2img and /upscale need a decodable image, which the fuzzer does not make, so their
    # links are selected but rarely reached.
    assert selected >= 3 and covered >= 2, out[-4000:]


@given(st.dictionaries(st.sampled_from(["prompt", "steps", "width", "height", "cfg_scale", "seed", "loras",
                                         "sampler_name", "scheduler_type", "fileType", "hires", "jpeg_quality"]),
                       st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
                                 st.text(max_size=20), st.lists(st.text(max_size=5), max_size=3))))
@settings(max_examples=300, deadline=None)
def test_request_model_accepts_or_raises_validation_error_only(data):
    from pydantic import ValidationError

    try:
        req = Txt2ImgRequest.model_validate(data)
    except ValidationError:
        return
    assert req.steps >= 1 and req.width >= 8 and req.height >= 8
    assert req.fileType in ("jpg", "png") and 1 <= req.jpeg_quality <= 100
    assert all(lora.name for lora in req.lora_list())


class _Fake(Registry):
    def __init__(self, models):
        self._m = models

    def models(self, problems=None):
        return self._m


names = st.text(alphabet=st.characters(codec="ascii", categories=("L", "N")) | st.sampled_from("-_ ."),
                min_size=1, max_size=24).filter(lambda s: s.strip())


@given(st.lists(names, min_size=1, max_size=6, unique=True), st.data())
@settings(max_examples=200, deadline=None)
def test_label_resolution(model_names, data):
    from pathlib import Path

    models = [ModelEntry(n, derive_label(n), Path("/x") / n, "sd15", "diffusers") for n in model_names]
    reg = _Fake(models)
    pick = data.draw(st.sampled_from(models))
    assert reg.resolve_model(pick.name).name == pick.name  # exact names always win
    # Any spelling of the label with '-', '_' and ' ' swapped and case changed finds a model with that label.
    variant = data.draw(st.sampled_from([pick.label.upper(), pick.label.replace(" ", "_"), pick.label.lower()]))
    try:
        hit = reg.resolve_model(variant)
        assert normalise(hit.label) == normalise(variant) or normalise(hit.name) == normalise(variant) \
            or hit.name == variant
    except UnknownName as e:
        assert "ambiguous" in str(e)
    junk = data.draw(names)
    if all(normalise(junk) not in (normalise(m.name), normalise(m.label)) and junk != m.name for m in models):
        with pytest.raises(UnknownName, match="valid choices"):
            reg.resolve_model(junk)


def test_derived_labels():
    assert derive_label("models--Meina--MeinaMix_V11") == "MeinaMix V11"
    assert derive_label("models--runwayml--stable-diffusion-v1-5") == "stable-diffusion-v1-5"
    assert derive_label("my_model") == "my model"
