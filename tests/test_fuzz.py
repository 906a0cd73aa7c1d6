"""Fuzzing: schemathesis against our own OpenAPI schema; hypothesis on the request model and labels."""
from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings, strategies as st

from diffusionapi.registry import UnknownName, Registry, derive_label, normalise
from diffusionapi.vocabulary import ModelEntry
from diffusionapi.schemas import Txt2ImgRequest

from .conftest import LiveServer, make_settings


@pytest.fixture(scope="module")
def fuzz_server(model_store, tmp_path_factory):
    # Tight limits so that the valid requests the fuzzer finds are cheap to run.
    s = make_settings(model_store, tmp_path_factory.mktemp("fuzz"), max_width=64, max_height=64, max_steps=2,
                      max_hires_scale=1.5, max_queued_jobs=1000)
    with LiveServer(s) as server:
        yield server


def test_no_5xx_and_responses_match_the_schema(fuzz_server):
    schema = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")
    operations = [r.ok() for r in schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /txt2img", "GET /queue/{job_id}", "DELETE /queue/{job_id}",
                                               "GET /models", "GET /hello", "GET /sampling_methods"}
    for op in operations:
        @given(op.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def run(case):
            # Names (models, LoRAs, upscalers) and the configured limits cannot be expressed in the
            # schema, so a schema-valid body may rightly get a 422: that one check is left out.
            case.call_and_validate(base_url=fuzz_server.url,
                                   excluded_checks=[schemathesis.checks.positive_data_acceptance])

        run()


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
