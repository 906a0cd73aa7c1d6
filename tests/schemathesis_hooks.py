"""Schemathesis hooks for the suite's fuzz run (tests/test_fuzz.py, via SCHEMATHESIS_HOOKS).

- Installed names (models, LoRAs, refiners, upscalers) are not in the OpenAPI document — they
  change while the server runs — so a schema-valid body almost always names a model that is not
  there and is rightly refused. For the stateful phase to follow the links from a submit to the
  job's status, cancel and events, positive submit bodies name what the fuzz server has.
- `GET /queue/{id}?wait=N` long-polls up to 60 s by design; the run's budget is two minutes,
  so a valid `wait` (0..60) becomes at most a second, in negative cases too: there it is not
  what makes the case invalid, so the case stays as invalid as it was.
"""
import schemathesis
from schemathesis import GenerationMode

MODEL = "tiny-sd15"  # tests/conftest.py's default model
MAX_WAIT = 1.0


def _positive(case) -> bool:
    meta = getattr(case, "_meta", None)
    return meta is not None and meta.generation.mode == GenerationMode.POSITIVE


@schemathesis.hook
def map_case(context, case):
    wait = case.query.get("wait") if isinstance(case.query, dict) else None
    if isinstance(wait, (int, float)) and not isinstance(wait, bool) and MAX_WAIT < wait <= 60:
        case.query = {**case.query, "wait": MAX_WAIT}
    if _positive(case) and case.method.upper() == "POST" and isinstance(case.body, dict) and "prompt" in case.body:
        body = dict(case.body)
        if "model" in body:
            body["model"] = MODEL
        body.pop("refiner_checkpoint", None)
        body.pop("loras", None)
        if isinstance(body.get("hires"), dict):
            body["hires"] = {**body["hires"], "upscaler": "Latent"}
        # The fuzz server's limits are below the seed's defaults (steps 30, 512x512), to keep jobs cheap.
        for field, small in (("steps", 1), ("width", 64), ("height", 64)):
            body.setdefault(field, small)
        case.body = body
    return case
