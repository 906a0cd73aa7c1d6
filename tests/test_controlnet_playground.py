"""The playground's ControlNet / IP-Adapter panel in a real headless Chromium (as tests/test_playground.py)."""
from __future__ import annotations

import pytest

from .test_controlnet import cn_dirs, cn_server, control_image  # noqa: F401 - fixtures
from .test_playground import Page, browser, fill_basic, label  # noqa: F401 - fixtures

pytestmark = pytest.mark.browser  # the fast tier (./test.sh --quick) leaves these out


@pytest.fixture
def ui(browser, cn_server):  # noqa: F811
    p = Page(browser, cn_server)
    yield p
    p.close()


def test_controlnet_panel_previews_the_preprocessor_and_guides_the_image(ui, cn_server, tmp_path):  # noqa: F811
    src = tmp_path / "control.png"
    control_image(64, seed=2).save(src)
    ref = tmp_path / "ref.png"
    control_image(64, seed=12).save(ref)
    page = ui.open()
    fill_basic(page, prompt="a guided test", steps=4, size=64, seed=42)
    label(page, "Model").select_option("tiny-sd15")
    page.get_by_text("ControlNet / IP-Adapter", exact=True).click()
    label(page, "Control image").set_input_files(str(src))
    label(page, "ControlNet model").select_option("tiny-cn-sd15")
    label(page, "Preprocessor").select_option("canny")
    page.get_by_role("button", name="Preview preprocessor").click()
    page.wait_for_selector("#cn-preview:not([hidden])")
    shown = page.eval_on_selector("#cn-preview", "img => img.naturalWidth")
    assert shown == 64
    label(page, "Control weight").fill("0.8")
    label(page, "Guidance end").fill("0.75")
    label(page, "IP-Adapter model").select_option("ip-adapter_tiny_sd15")
    label(page, "Reference image").set_input_files(str(ref))
    page.get_by_role("button", name="Generate").click()
    page.wait_for_selector("#result img")
    infotext = page.inner_text("#result-infotext")
    assert 'ControlNet 0: "Module: canny, Model: tiny-cn-sd15 [' in infotext
    assert "Weight: 0.8" in infotext and "Guidance End: 0.75" in infotext
    assert 'IP-Adapter 0: "Model: ip-adapter_tiny_sd15' in infotext


def test_a_bad_unit_shows_the_error_next_to_its_field(ui, cn_server):  # noqa: F811
    page = ui.open()
    fill_basic(page, prompt="x", steps=2, size=64)
    label(page, "Model").select_option("tiny-sd15")
    page.get_by_text("ControlNet / IP-Adapter", exact=True).click()
    label(page, "ControlNet model").select_option("tiny-cn-sd15")  # no control image: txt2img needs one
    page.get_by_role("button", name="Generate").click()
    page.wait_for_selector("[data-field='controlnets.0.image'] p.error:not([hidden])")
    assert "needs an image" in page.inner_text("[data-field='controlnets.0.image'] p.error")
    assert page.get_attribute("#cn-file", "aria-invalid") == "true"
