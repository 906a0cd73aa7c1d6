"""The playground at `/` and the offline docs, end to end in a real headless Chromium (Playwright).

Every test blocks the network to anything but the app (``page.route``) and records what it
blocked: the pages must not need a CDN. Chromium is Debian's (`scripts/system-deps.sh`
installs it for `./test.sh`); Playwright's own browser download is never used.
"""
from __future__ import annotations

import base64
import io
import os
import shutil
from pathlib import Path

import httpx
import pytest
from PIL import Image

from .conftest import LiveServer, make_settings

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = ROOT / "outputs" / "playground-screenshot.png"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# Records what the progress bar and the preview image showed, as the page changed them.
WATCH = """
window.__seen = {progress: [], previews: []};
document.addEventListener("DOMContentLoaded", () => {
  const bar = document.getElementById("progress");
  const preview = document.getElementById("preview");
  if (!bar || !preview) return;  // not the playground page
  new MutationObserver(() => window.__seen.progress.push(bar.value)).observe(bar, {attributes: true});
  new MutationObserver(() => { if (preview.src) window.__seen.previews.push(preview.src); })
    .observe(preview, {attributes: true, attributeFilter: ["src"]});
});
"""


def chromium_path() -> str:
    for candidate in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and Path(candidate).exists():
            return candidate
    pytest.fail("Chromium is not installed: run scripts/system-deps.sh (Debian package `chromium`) "
                "or set CHROMIUM to a Chromium binary")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def pg_server(model_store, tmp_path_factory):
    from diffusionapi.demo import tiny_sd15_pipeline

    from .tiny_files import write_tiny_lora

    work = tmp_path_factory.mktemp("playground")
    write_tiny_lora(tiny_sd15_pipeline(), work / "loras" / "ink.safetensors", seed=3)
    settings = make_settings(model_store, work, loras_dir=work / "loras", max_steps=60, max_hires_scale=2.0)
    with LiveServer(settings) as s:
        yield s


def has(server: LiveServer, method: str, path: str) -> bool:
    return method in server.app.openapi()["paths"].get(path, {})


class Page:
    """A fresh browser context (own storage) whose requests may only reach the app."""

    def __init__(self, browser, server: LiveServer, **context_args):
        self.server = server
        self.blocked: list[str] = []
        self.errors: list[str] = []
        self.context = browser.new_context(**{"viewport": {"width": 1280, "height": 900}, **context_args})
        self.context.route("**/*", self._route)
        self.context.add_init_script(WATCH)
        self.page = self.context.new_page()
        self.page.set_default_timeout(120_000)  # jobs on a busy 2-core machine can take a while
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        # A Content-Security-Policy violation is reported on the console.
        self.page.on("console", lambda m: self.errors.append(m.text) if "Content Security Policy" in m.text else None)

    def _route(self, route):
        url = route.request.url
        if url.startswith(self.server.url + "/"):
            route.continue_()
        else:
            self.blocked.append(url)
            route.abort()

    def open(self, path: str = "/"):
        self.page.goto(self.server.url + path)
        if path == "/":
            self.page.wait_for_selector("body[data-ready=true]")
        return self.page

    def close(self):
        self.context.close()
        assert self.errors == [], self.errors
        assert self.blocked == [], f"the page tried to reach outside the app: {self.blocked}"


@pytest.fixture
def ui(browser, pg_server):
    p = Page(browser, pg_server)
    yield p
    p.close()


def label(page, text):
    return page.get_by_label(text, exact=True)


def fill_basic(page, *, prompt="a lighthouse at dusk", steps=4, size=64, seed=None):
    label(page, "Prompt").fill(prompt)
    label(page, "Steps").fill(str(steps))
    label(page, "Width").fill(str(size))
    label(page, "Height").fill(str(size))
    if seed is not None:
        label(page, "Random seed").uncheck()
        label(page, "Seed").fill(str(seed))


def queued_ids(server) -> list[str]:
    return [j["job_id"] for j in server.client.get("/queue").json()["jobs"]]


# ---------------------------------------------------------------------------------- HTTP level

def test_playground_and_docs_are_served_without_the_key_the_api_is_not(model_store, tmp_path):
    with LiveServer(make_settings(model_store, tmp_path, api_key="k3y")) as s:
        c = httpx.Client(base_url=s.url)
        page = c.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert 'src="static/js/main.js"' in page.text
        for asset in ("/static/js/main.js", "/static/playground.css", "/docs", "/redoc", "/openapi.json",
                      "/static-offline-docs/swagger-ui-bundle.js", "/static-offline-docs/redoc.standalone.js"):
            assert c.get(asset).status_code == 200, asset
        assert c.get("/static/js/main.js").headers["cache-control"] == "no-cache"
        # The pages are public; the data is not, and the static mount reaches nothing else.
        assert c.get("/models").status_code == 401
        assert c.get("/queue").status_code == 401
        assert c.get("/static/../models").status_code in (401, 404)
        assert c.get("/static/%2e%2e/models").status_code in (401, 404)
        assert c.get("/models", headers={"X-API-Key": "k3y"}).status_code == 200


# ---------------------------------------------------------------------------------- browser

def test_generate_progress_preview_image_gallery_and_screenshot(ui, pg_server):
    page = ui.open()
    fill_basic(page, prompt="a lighthouse at dusk", steps=20, size=64, seed=1234)
    label(page, "Negative prompt").fill("fog")
    label(page, "Model").select_option(label="Tiny SD (SD 1.5)")
    label(page, "Sampler").select_option("Euler")
    label(page, "Add a LoRA").select_option("ink")
    label(page, "Weight of LoRA ink").fill("0.5")
    page.get_by_text("Output and live previews", exact=True).click()
    label(page, "Preview every N steps").fill("1")
    label(page, "Prompt").press("Control+Enter")  # keyboard submit

    page.wait_for_selector("#result img")
    seen = page.evaluate("window.__seen")
    moving = sorted({v for v in seen["progress"] if 0 < v < 100})
    assert len(moving) >= 2, f"the progress bar did not move: {seen['progress']}"
    assert page.eval_on_selector("#progress", "p => p.value") == 100
    if has(pg_server, "get", "/queue/{job_id}/events"):
        assert len(set(seen["previews"])) >= 2, "the live preview did not change"

    infotext = page.inner_text("#result-infotext")
    assert infotext.startswith("a lighthouse at dusk\nNegative prompt: fog\n")
    for part in ("Steps: 20", "Sampler: Euler", "Seed: 1234", "Size: 64x64", "Model: tiny-sd15", "ink"):
        assert part in infotext
    # The image shown (and offered for download) is the file the server wrote.
    href = page.get_attribute("#result a[download]", "href")
    shown = base64.b64decode(page.evaluate(
        """async (u) => { const b = await (await fetch(u)).arrayBuffer();
                         let s = ""; for (const x of new Uint8Array(b)) s += String.fromCharCode(x); return btoa(s); }""",
        href))
    outputs = list(pg_server.settings.outputs_dir.glob("*.jpg"))
    assert shown in [p.read_bytes() for p in outputs]
    assert Image.open(io.BytesIO(shown)).size == (64, 64)
    # The gallery is written to IndexedDB and rendered after the result is shown: wait for it.
    page.wait_for_function("() => document.querySelectorAll('#gallery-list li').length === 1")

    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    assert Image.open(SCREENSHOT).size[0] == 1280

    # The gallery is this browser's: it survives a reload; "Reuse parameters" refills the form.
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    assert label(page, "Prompt").input_value() == ""
    page.locator("#gallery-list .open").first.click()
    page.get_by_role("button", name="Reuse parameters").click()
    assert label(page, "Prompt").input_value() == "a lighthouse at dusk"
    assert label(page, "Seed").input_value() == "1234" and not label(page, "Random seed").is_checked()
    assert label(page, "Sampler").input_value() == "Euler"
    assert label(page, "Width").input_value() == "64"
    assert label(page, "Weight of LoRA ink").input_value() == "0.5"
    page.get_by_role("button", name="Remove from gallery: a lighthouse at dusk").click()
    page.wait_for_function("() => document.querySelectorAll('#gallery-list li').length === 0")


def test_validation_errors_are_shown_next_to_their_fields(ui, pg_server):
    page = ui.open()
    fill_basic(page, steps=500)
    page.get_by_role("button", name="Generate").click()
    error = page.locator('[data-field="steps"] p.error')
    error.wait_for()
    assert "60" in error.inner_text()  # the configured limit
    assert label(page, "Steps").get_attribute("aria-invalid") == "true"
    assert page.evaluate("document.activeElement.id") == "steps"
    assert "steps" in page.inner_text("#form-error")
    assert queued_ids(pg_server) == []

    # A nested field (hires.scale) inside a closed box: the box opens and the message sits there.
    label(page, "Steps").fill("4")
    page.get_by_text("Hires fix", exact=True).click()
    label(page, "Enable hires fix").check()
    label(page, "Upscale by").fill("9")
    page.get_by_text("Hires fix", exact=True).click()  # closed again
    page.get_by_role("button", name="Generate").click()
    nested = page.locator('[data-field="hires.scale"] p.error')
    nested.wait_for()
    assert page.locator("#hires-box").get_attribute("open") is not None
    assert label(page, "Upscale by").get_attribute("aria-invalid") == "true"
    assert not error.is_visible()  # the earlier error is gone
    assert queued_ids(pg_server) == []


def test_cancel_a_queued_job_from_the_queue_panel(ui, pg_server):
    blocker = pg_server.submit_blocker()  # held until cancelled (tests/holding.py)
    waiting = pg_server.submit(prompt="waiting", width=64, height=64, steps=2)
    try:
        page = ui.open()
        page.get_by_role("button", name="Refresh", exact=True).click()
        row = page.locator(f'#queue-table tr[data-job-id="{waiting}"]')
        row.wait_for()
        assert "queued" in row.inner_text()
        page.get_by_role("button", name=f"Cancel job {waiting}").click()
        page.wait_for_function("() => document.getElementById('queue-status').textContent.includes('cancelled')")
        # The final read (here) says cancelled; the job never ran.
        final = pg_server.client.get(f"/queue/{waiting}").json()
        assert final["state"] == "cancelled" and final.get("image") is None
    finally:
        pg_server.client.delete(f"/queue/{blocker}")
        pg_server.wait(blocker)
        pg_server.client.get(f"/queue/{waiting}")


def test_reuse_parameters_from_a_dropped_png(ui, pg_server):
    if not has(pg_server, "post", "/png-info"):
        pytest.skip("POST /png-info (issue #15) is not on this branch yet")
    done = pg_server.run(prompt="a castle on a hill", negative_prompt="rain", steps=3, cfg_scale=5.5, seed=4242,
                         width=96, height=64, sampler_name="Euler a", scheduler_type="exponential",
                         fileType="png", model="tiny-sd15")
    png = Path(done["output_path"]) if Path(done["output_path"]).is_absolute() else \
        pg_server.settings.outputs_dir / Path(done["output_path"]).name
    page = ui.open()
    transfer = page.evaluate_handle(
        """([b64, name]) => { const bin = atob(b64); const bytes = new Uint8Array(bin.length);
             for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
             const dt = new DataTransfer(); dt.items.add(new File([bytes], name, {type: "image/png"})); return dt; }""",
        [base64.b64encode(png.read_bytes()).decode(), "castle.png"])
    page.dispatch_event("#drop-zone", "drop", {"dataTransfer": transfer})
    page.wait_for_function("() => document.getElementById('prompt').value === 'a castle on a hill'")
    assert label(page, "Negative prompt").input_value() == "rain"
    assert label(page, "Steps").input_value() == "3"
    assert float(label(page, "CFG scale").input_value()) == 5.5
    assert label(page, "Seed").input_value() == "4242" and not label(page, "Random seed").is_checked()
    assert (label(page, "Width").input_value(), label(page, "Height").input_value()) == ("96", "64")
    assert label(page, "Sampler").input_value() == "Euler a"
    assert label(page, "Schedule type").input_value() == "exponential"
    assert label(page, "Model").input_value() == "tiny-sd15"
    assert "castle.png" in page.inner_text("#notice")


def test_docs_and_redoc_render_offline(ui, pg_server):
    page = ui.open("/docs")
    page.wait_for_selector(".opblock")
    summaries = page.locator(".opblock-summary-path").all_inner_texts()
    assert {"/txt2img", "/queue/{job_id}", "/models"} <= {s.replace("\u200b", "") for s in summaries}
    page.goto(pg_server.url + "/redoc")
    page.get_by_text("/txt2img").first.wait_for()
    assert page.locator("h2").count() >= 5  # one heading per operation
    # ReDoc's bundle wants its logo from a CDN: the page's policy refuses it without a request.
    logo = [e for e in ui.errors if "cdn.redoc.ly/redoc/logo-mini.svg" in e]
    assert logo and all("Content Security Policy" in e for e in logo)
    ui.errors = [e for e in ui.errors if e not in logo]


def test_api_key_field_is_used_and_remembered(browser, model_store, tmp_path):
    with LiveServer(make_settings(model_store, tmp_path, api_key="open-sesame")) as s:
        ui = Page(browser, s)
        try:
            page = ui.page
            page.goto(s.url + "/")
            key_error = page.locator("#api-key-error")
            key_error.wait_for()
            assert "needs an API key" in key_error.inner_text()
            label(page, "API key").fill("open-sesame")
            label(page, "API key").press("Tab")  # change event
            page.wait_for_selector("body[data-ready=true]")
            assert "tiny-sd15" in label(page, "Model").inner_html()
            page.reload()
            page.wait_for_selector("body[data-ready=true]")  # the key came from localStorage
            assert label(page, "API key").input_value() == "open-sesame"
            fill_basic(page, steps=2)
            page.get_by_role("button", name="Generate").click()
            page.wait_for_selector("#result img")
        finally:
            ui.close()


def test_phone_width_labels_and_no_overflow(browser, pg_server):
    ui = Page(browser, pg_server, viewport={"width": 375, "height": 740}, is_mobile=True, has_touch=True)
    try:
        page = ui.open()
        for box in ("Hires fix", "Refiner (SDXL)", "Image to image / inpaint", "Output and live previews"):
            page.get_by_text(box, exact=True).click()
        page.locator("#init-area").evaluate("e => e.hidden = false")
        label(page, "Add a LoRA").select_option("ink")
        unlabelled = page.evaluate("""() => [...document.querySelectorAll("input, select, textarea, button")]
            .filter(e => e.type !== "hidden")
            .filter(e => !(e.labels && e.labels.length) && !e.getAttribute("aria-label")
                         && !(e.tagName === "BUTTON" && e.textContent.trim()))
            .map(e => e.outerHTML.slice(0, 80))""")
        assert unlabelled == []
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        assert page.locator("#generate").bounding_box()["width"] > 0
    finally:
        ui.close()


def test_img2img_with_a_painted_mask(ui, pg_server, tmp_path):
    if not has(pg_server, "post", "/img2img"):
        pytest.skip("POST /img2img (issue #14) is not on this branch yet")
    src = tmp_path / "input.png"
    Image.new("RGB", (64, 64), (200, 40, 40)).save(src)
    page = ui.open()
    sent = []
    page.on("request", lambda r: sent.append(r) if r.url.endswith("/img2img") else None)
    fill_basic(page, prompt="repaint the middle", steps=4, size=64)
    page.get_by_text("Image to image / inpaint", exact=True).click()
    label(page, "Input image (PNG, JPEG or WebP)").set_input_files(str(src))
    canvas = page.locator("#mask-canvas")
    canvas.wait_for()
    canvas.scroll_into_view_if_needed()  # the mouse paints in viewport coordinates
    box = canvas.bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.5)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.7, box["y"] + box["height"] * 0.5, steps=5)
    page.mouse.up()
    label(page, "Denoising strength").fill("0.6")
    page.get_by_role("button", name="Generate").click()
    page.wait_for_selector("#result img")
    body = sent[0].post_data_json
    assert body["init_image"].startswith("data:image/png;base64,") and body["denoising_strength"] == 0.6
    mask = Image.open(io.BytesIO(base64.b64decode(body["mask"].split(",", 1)[1]))).convert("L")
    assert mask.size == (64, 64)
    assert mask.getpixel((32, 32)) == 255 and mask.getpixel((2, 2)) == 0  # painted stroke vs untouched corner


def test_batch_shows_every_image(ui, pg_server):
    fields = pg_server.app.openapi()["components"]["schemas"]["Txt2ImgRequest"]["properties"]
    if "batch_size" not in fields:
        pytest.skip("batch_size (issue #14) is not on this branch yet")
    page = ui.open()
    fill_basic(page, steps=2, seed=77)
    label(page, "Batch size").fill("2")
    page.get_by_role("button", name="Generate").click()
    page.wait_for_function("() => document.querySelectorAll('#result img').length === 2")
    page.wait_for_function("() => document.querySelectorAll('#gallery-list li').length === 2")
    captions = page.locator("#result figcaption").all_inner_texts()
    assert len({c.split("·")[0] for c in captions}) == 2  # each image reports its own seed
