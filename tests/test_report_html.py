"""The visual report: one self-contained HTML page, checked in a real browser."""

import os
import re
import shutil
import subprocess

import pytest
import torch
from torch import nn

from pruners import prune, sensitivity

SECTIONS = ("summary", "widths", "blocks", "frozen", "check")


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()


def _report_page(tmp_path):
    model, x = _model(), torch.randn(2, 3, 16, 16)
    table = sensitivity(model, x, evaluate=lambda m: -float(m(x).abs().mean().detach()),
                        ratios=(0.25, 0.5), progress=False)
    result = prune(model, x, target_flops=0.5, recover="bn", calibration=[x])
    path = tmp_path / "report.html"
    result.report.save_html(str(path), sensitivity=table, title="tiny CNN")
    return result, path


def test_the_page_is_self_contained_and_has_every_section(tmp_path):
    result, path = _report_page(tmp_path)
    page = path.read_text()
    assert page.startswith("<!DOCTYPE html>")
    for section in SECTIONS + ("recovery", "sensitivity"):
        assert f"id='{section}'" in page
    assert not re.search(r"""(src|href)\s*=|url\(|@import|<script""", page, re.I)
    for layer in result.report.layers:  # every layer's bar is labelled
        assert f">{layer.module}</text>" in page
    assert result.report.blocks and result.report.blocks[0].flops_after < \
        result.report.blocks[0].flops_before


def test_the_width_chart_is_a_png(tmp_path):
    result, _ = _report_page(tmp_path)
    result.report.save_png(str(tmp_path / "widths.png"))
    assert (tmp_path / "widths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _chromium():
    found = shutil.which("chromium") or shutil.which("chromium-browser") or \
        shutil.which("google-chrome")
    if found is None:
        if os.environ.get("PRUNERS_REQUIRE_CHROMIUM"):
            pytest.fail("PRUNERS_REQUIRE_CHROMIUM is set but no chromium is installed")
        pytest.skip("no chromium on this machine (Debian: apt-get install chromium)")
    return found


def test_the_page_renders_in_headless_chromium(tmp_path):
    browser = _chromium()
    _, path = _report_page(tmp_path)
    shot = tmp_path / "shot.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--user-data-dir={tmp_path / 'profile'}"]
    subprocess.run([browser, *flags, f"--screenshot={shot}", "--window-size=1100,1600",
                    path.as_uri()], check=True, capture_output=True, timeout=120)
    dom = subprocess.run([browser, *flags, "--dump-dom", path.as_uri()], check=True,
                         capture_output=True, text=True, timeout=120).stdout
    for section in SECTIONS + ("recovery", "sensitivity"):
        assert f'id="{section}"' in dom  # parsed by the browser, not just written
    from PIL import Image

    with Image.open(shot) as im:
        pixels = im.convert("RGB").resize((275, 400))
        colors = pixels.getcolors(maxcolors=1 << 16) or []
        inked = sum(n for n, c in colors if sum(c) < 600)  # not white or near-white
    assert len(colors) > 20 and inked > 0.02 * 275 * 400  # text and bars, not a blank page
