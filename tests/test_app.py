"""The web GUI (breastgen.app) in a real headless browser: the app runs as `python -m breastgen.app` on a free
localhost port, on the bundles' demo checkpoints (the `bundle_demo` runs the bundle tests use too); Playwright
drives Debian's chromium (`make chromium` installs it). Screenshots go to tests/artifacts/ (or
$BREASTGEN_TEST_ARTIFACTS)."""

from __future__ import annotations

import io
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT

pytest.importorskip("gradio")
BUNDLES = ("mammo_ldm_text2image", "mammo_ldm_inpainting", "he2ihc_pyramidpix2pix", "histo_ddpm_atypia")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
ARTIFACTS = Path(os.environ.get("BREASTGEN_TEST_ARTIFACTS") or ROOT / "tests" / "artifacts")
TIMEOUT_MS = int(os.environ.get("BREASTGEN_GUI_TIMEOUT_MS", 60_000))


def _chromium() -> str | None:
    for name in (os.environ.get("BREASTGEN_CHROMIUM"), "chromium", "chromium-browser"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def browser():
    exe = _chromium()
    if exe is None:
        message = "Debian's chromium is not installed: run `make chromium` (apt-get install -y chromium)"
        if os.environ.get("BREASTGEN_REQUIRE_BROWSER"):  # set by `make test` / `make test-gui`
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def app(bundle_demo, demo_data, tmp_path_factory):
    """The GUI on the demo checkpoints, served by a subprocess; stopped after the module's tests."""
    work = tmp_path_factory.mktemp("app")
    demo_out = work / "demo_out"
    demo_out.mkdir()
    for name in BUNDLES:  # the layout `make demo` writes: <demo_out>/<bundle>/models/...
        (demo_out / name).symlink_to(bundle_demo(ROOT / "bundles" / name), target_is_directory=True)
    port = _free_port()
    log_path = work / "app.log"
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "breastgen.app", "--bundle-dir", str(ROOT / "bundles"),
                             "--demo-out", str(demo_out), "--demo-data", str(demo_data), "--port", str(port),
                             "--max-upload-mb", "1"], stdout=log, stderr=subprocess.STDOUT, cwd=work)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    while True:
        if proc.poll() is not None:
            pytest.fail(f"the app exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the app did not answer within 180 s:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.5)
    temp = Path(re.search(r"temporary files in (\S+);", log_path.read_text()).group(1))
    assert temp.is_dir() and temp.is_relative_to(tempfile.gettempdir())
    yield SimpleNamespace(url=url, proc=proc, log=log_path)
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()
    assert not temp.exists(), f"the app left its temporary folder {temp}"


@pytest.fixture
def page(browser, app):
    context = browser.new_context(viewport={"width": 1280, "height": 1200})
    pg = context.new_page()
    pg.set_default_timeout(TIMEOUT_MS)
    requests: list[str] = []
    pg.on("request", lambda r: requests.append(r.url))
    pg.goto(app.url)
    pg.wait_for_selector("#t2i-generate")
    yield pg
    context.close()
    outside = sorted({u for u in requests if not u.startswith((app.url, "data:", "blob:"))})
    assert not outside, f"the page fetched from outside the app (offline machines): {outside}"


def _open_tab(page, title: str) -> None:
    page.get_by_role("tab", name=title).click()


def _choose(page, elem_id: str, option: str) -> None:
    page.click(f"#{elem_id} input")
    page.get_by_role("option", name=option, exact=True).click()


def _set_slider(page, elem_id: str, value: int) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def _upload(page, elem_id: str, path: Path) -> None:
    """Upload ``path`` into a File component and wait until the app has it."""
    page.set_input_files(f"#{elem_id} input[type=file]", str(path))
    page.wait_for_selector(f"#{elem_id} a[download='{path.name}']")


def _status(page, prefix: str, expect: str) -> str:
    """Wait until the tab's status line contains ``expect``; return its text."""
    sel = f"#{prefix}-status .bg-status"
    try:
        page.wait_for_function("([sel, text]) => (document.querySelector(sel)?.innerText || '').includes(text)",
                               arg=[sel, expect])
    except Exception:  # noqa: BLE001 - report what the page shows instead
        shown = page.eval_on_selector(f"#{prefix}-status", "e => e.innerText")
        pytest.fail(f"status of {prefix!r} never showed {expect!r}; it shows {shown!r}")
    return page.inner_text(sel)


def _fetch_image(page, src: str) -> np.ndarray:
    resp = page.request.get(src)
    assert resp.ok, f"{src}: HTTP {resp.status}"
    return np.asarray(Image.open(io.BytesIO(resp.body())))


def _gallery(page, prefix: str, n: int) -> list[np.ndarray]:
    page.wait_for_function("([sel, n]) => document.querySelectorAll(sel).length === n && "
                           "[...document.querySelectorAll(sel)].every(i => i.complete && i.naturalWidth > 0)",
                           arg=[f"#{prefix}-gallery img", n])
    return [_fetch_image(page, s) for s in page.eval_on_selector_all(f"#{prefix}-gallery img",
                                                                      "els => els.map(e => e.src)")]


def _downloads(page, prefix: str) -> dict[str, str]:
    """File name -> download URL of the tab's download list."""
    hrefs = page.eval_on_selector_all(f"#{prefix}-files a[href]", "els => els.map(e => e.href)")
    return {urllib.request.unquote(h.split("?")[0].rsplit("/", 1)[-1]): h for h in hrefs}


def _screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


def _assert_not_blank(img: np.ndarray, what: str) -> None:
    a = img.astype(np.float64)
    assert a.std() > 5.0 and np.ptp(a) > 40, f"{what} looks blank (std {a.std():.2f}, range {np.ptp(a):.0f})"


def _size_from_config(bundle: str) -> int:
    from breastgen.app.registry import BundleModel

    return int(BundleModel(ROOT / "bundles" / bundle, ROOT / "unused").get("image_size"))


def test_text_to_mammogram_generates_the_requested_images(page, app):
    size = _size_from_config("mammo_ldm_text2image")
    _choose(page, "t2i-density", "low")  # live preview of the attribute prompt
    page.wait_for_function("() => document.querySelector('#t2i-preview textarea').value.includes('low density')")
    prompt = "a mammogram in MLO view with high density and big area"
    page.fill("#t2i-prompt textarea", prompt)
    page.wait_for_function("() => document.querySelector('#t2i-source input[value=\"free text\"]').checked")
    _set_slider(page, "t2i-count", 3)
    _set_slider(page, "t2i-steps", 60)  # long enough to see the progress bar
    page.fill("#t2i-seed input", "7")
    page.click("#t2i-generate")
    page.get_by_text("denoising").first.wait_for()  # the progress bar's label while sampling
    status = _status(page, "t2i", "image(s)")
    assert "error" not in status and prompt in status and "seeds 7–9" in status and "60 steps" in status, status
    images = _gallery(page, "t2i", 3)
    for img in images:
        assert img.shape[:2] == (size, size), img.shape
        _assert_not_blank(img, "generated mammogram")
    assert not np.array_equal(images[0], images[1]), "different seeds gave the same image"
    files = _downloads(page, "t2i")
    assert sorted(files) == [f"sample_{s:06d}.{ext}" for s in (7, 8, 9) for ext in ("dcm", "png")], files
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(page.request.get(files["sample_000007.dcm"]).body()))
    assert (ds.Rows, ds.Columns) == (size, size) and str(ds.PatientName) == "SYNTHETIC"
    assert "MLO" in ds.ImageComments or ds.get("ViewPosition") == "MLO"
    _screenshot(page, "gui_text2image.png")
    assert app.proc.poll() is None


def test_he_to_ihc_translates_an_uploaded_image(page, demo_data):
    _open_tab(page, "3 · HE → IHC")
    he = sorted((demo_data / "histo" / "bci" / "HE" / "test").glob("*.png"))[0]
    _upload(page, "he-upload", he)
    page.click("#he-generate")
    status = _status(page, "he", "translated")
    assert he.name in status, status
    page.wait_for_function("() => document.querySelector('#he-after img')?.naturalWidth > 0")
    out = _fetch_image(page, page.get_attribute("#he-after img", "src"))
    w, h = Image.open(he).size
    assert out.shape == (h, w, 3), out.shape
    _assert_not_blank(out, "IHC image")
    _screenshot(page, "gui_he2ihc.png")


def test_histology_by_class_and_by_mask(page):
    size = _size_from_config("histo_ddpm_atypia")
    _open_tab(page, "4 · Histology synthesis")
    _choose(page, "histo-class", "atypia 3")
    _set_slider(page, "histo-count", 3)
    page.click("#histo-generate")
    status = _status(page, "histo", "class-conditional tile(s)")
    assert "atypia 3" in status, status
    for img in _gallery(page, "histo", 3):
        assert img.shape[:2] == (size, size)
        _assert_not_blank(img, "class-conditional tile")
    _choose(page, "histo-class", "(none)")
    page.click("#histo-example input")
    page.get_by_role("option").nth(1).click()
    page.click("#histo-generate")
    _status(page, "histo", "mask-guided tile(s)")
    for img in _gallery(page, "histo", 3):
        _assert_not_blank(img, "mask-guided tile")
    page.wait_for_function("() => document.querySelector('#histo-mask img')?.naturalWidth > 0")
    _screenshot(page, "gui_histology.png")


def test_bad_uploads_show_an_error_in_the_page_and_the_server_keeps_running(page, app, tmp_path):
    fake_dcm = tmp_path / "scan.dcm"
    fake_dcm.write_text("this is a text file, not DICOM\n" * 20)
    fake_png = tmp_path / "he.png"
    fake_png.write_text("not an image")
    oblong = tmp_path / "oblong_mask.png"
    Image.fromarray(np.where(np.arange(40 * 32).reshape(32, 40) % 7 == 0, 255, 0).astype(np.uint8)).save(oblong)
    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * (2 * 1024 * 1024))  # over the 1 MB limit the app was started with

    _open_tab(page, "4 · Histology synthesis")
    for path, expect in ((fake_dcm, "error: scan.dcm: not an image file"), (oblong, "error: oblong_mask.png: mask is 40 x 32")):
        _upload(page, "histo-upload", path)
        page.click("#histo-generate")
        status = _status(page, "histo", expect)
        assert "Traceback" not in status and len(status.splitlines()) == 1, status
        page.locator("#histo-upload button[aria-label='Clear']").first.click()

    _open_tab(page, "3 · HE → IHC")
    _upload(page, "he-upload", fake_png)
    page.click("#he-generate")
    _status(page, "he", "error: 1 image(s) not RGB or unreadable: he.png")
    _screenshot(page, "gui_bad_upload.png")

    page.locator("#he-upload button[aria-label='Clear']").first.click()
    page.set_input_files("#he-upload input[type=file]", str(big))  # refused by the upload size limit
    page.get_by_text("exceed the maximum allowed size").first.wait_for()  # Gradio's message, in the page

    assert app.proc.poll() is None, "the server died"
    _open_tab(page, "1 · Text → mammogram")
    page.click("#t2i-generate")
    _status(page, "t2i", "image(s)")
    assert app.proc.poll() is None


def _load_mammogram(page, path: Path) -> None:
    _open_tab(page, "2 · Lesion inpainting")
    _upload(page, "inp-upload", path)
    _status(page, "inp", f"{path.name}: ")


def _lesion_case(demo_data: Path) -> tuple[Path, list[int]]:
    """A demo mammogram (DICOM) with a lesion box on the breast."""
    from breastgen.data.datalists import load_datalist

    case = next(e for e in load_datalist(demo_data / "mammo" / "datalist.json", "test") if e.get("bbox"))
    return Path(case["image"]), [int(v) for v in case["bbox"]]


def _inpainted(page, mask: str) -> dict[str, np.ndarray]:
    _status(page, "inp", f"(mask: {mask}")
    page.wait_for_function("() => document.querySelector('#inp-compare img')?.naturalWidth > 0")
    files = _downloads(page, "inp")
    assert sorted(files) == ["inpainted_0000.dcm", "inpainted_0000.png", "mask_0000.png"], files
    return {"image": _fetch_image(page, files["inpainted_0000.png"]), "mask": _fetch_image(page, files["mask_0000.png"])}


def test_inpainting_with_a_typed_box_and_a_drawn_mask(page, demo_data):
    from breastgen.data.readers import load_image

    path, (x0, y0, x1, y1) = _lesion_case(demo_data)
    original = np.asarray(load_image(path)[0]).T  # rows, cols as the PNG stores them
    _load_mammogram(page, path)
    page.fill("#inp-box textarea", f"{x0}, {y0}, {x1}, {y1}")  # typing a box selects "typed box"
    page.wait_for_function("() => document.querySelector('#inp-source input[value=\"typed box\"]').checked")
    _choose(page, "inp-pathology", "malignant")
    page.click("#inp-generate")
    out = _inpainted(page, "bbox [")
    assert out["image"].shape == original.shape, out["image"].shape
    rows, cols = np.nonzero(out["mask"])
    assert (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1) == (x0, y0, x1, y1)
    inside = out["mask"] > 0
    assert (out["image"][inside] != original[inside]).mean() > 0.5, "nothing was inpainted in the box"
    assert (out["image"] == original).mean() > 0.8, "the image changed far from the box"
    assert "a mammogram with a malignant mass" in page.inner_text("#inp-status")
    _screenshot(page, "gui_inpainting_box.png")

    page.click("#inp-source label:has-text('drawn with the brush')")  # then a stroke across the middle of the canvas
    page.wait_for_function("() => document.querySelector('#inp-source input[value=\"drawn with the brush\"]').checked")
    box = page.locator("#inp-editor canvas").first.bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(cx - 10, cy)
    page.mouse.down()
    for dx in range(-10, 11, 2):
        page.mouse.move(cx + dx, cy + dx / 2)
    page.mouse.up()
    page.click("#inp-generate")
    out = _inpainted(page, "drawn with the brush")
    rows, cols = np.nonzero(out["mask"])
    assert len(rows) > 0 and out["image"].shape == original.shape
    # the stroke was drawn at the middle of the displayed image: the mask is there in full-image pixels
    assert abs(rows.mean() - original.shape[0] / 2) < 0.15 * original.shape[0], rows.mean()
    assert abs(cols.mean() - original.shape[1] / 2) < 0.15 * original.shape[1], cols.mean()
    _screenshot(page, "gui_inpainting_drawn.png")


def test_inpainting_refuses_a_fake_dicom_and_a_mask_of_the_wrong_size(page, demo_data, tmp_path):
    fake = tmp_path / "case7.dcm"
    fake.write_text("not a DICOM file\n" * 10)
    _open_tab(page, "2 · Lesion inpainting")
    _upload(page, "inp-upload", fake)
    assert "Traceback" not in _status(page, "inp", "error: case7.dcm: ")
    page.locator("#inp-upload button[aria-label='Clear']").first.click()

    path, _ = _lesion_case(demo_data)
    _load_mammogram(page, path)
    small = tmp_path / "small_mask.png"
    Image.fromarray(np.pad(np.full((10, 10), 255, np.uint8), 45)).save(small)  # 100 x 100
    _upload(page, "inp-mask", small)
    page.wait_for_function("() => document.querySelector('#inp-source input[value=\"mask image\"]').checked")
    page.click("#inp-generate")
    status = _status(page, "inp", "error: small_mask.png: mask size (100, 100) differs from image size")
    assert len(status.splitlines()) == 1, status


# ------------------------------------------------------------------------------------------------ no browser
def _notices(blocks) -> dict[str, str]:
    return {c.elem_id.removeprefix("notice-"): str(c.value) for c in blocks.blocks.values()
            if str(getattr(c, "elem_id", "") or "").startswith("notice-")}


def test_missing_checkpoints_and_bundles_are_reported_in_their_tabs(tmp_path, monkeypatch):
    from breastgen.app.registry import tab_specs
    from breastgen.app.server import AppOptions, build_app, bundle_model
    from breastgen.app.workspace import Workspace
    from breastgen.errors import find_breastgen_error

    assert [s.order for s in tab_specs()] == [1, 2, 3, 4]
    bundles = tmp_path / "bundles"  # one bundle not installed
    bundles.mkdir()
    for name in ("mammo_ldm_text2image", "he2ihc_pyramidpix2pix", "histo_ddpm_atypia"):
        (bundles / name).symlink_to(ROOT / "bundles" / name, target_is_directory=True)
    options = AppOptions(bundle_dir=bundles, demo_out=tmp_path / "empty", demo_data=None)
    monkeypatch.delenv("GRADIO_TEMP_DIR", raising=False)  # restored after the test (Workspace sets it)
    workspace = Workspace(parent=str(tmp_path))
    blocks, _ = build_app(options, workspace)
    notices = _notices(blocks)
    broken = [c.elem_id for c in blocks.blocks.values() if str(getattr(c, "elem_id", "") or "").startswith("error-")]
    assert not broken, f"tabs that failed to build without demo data: {broken}"
    assert "not installed" in notices["mammo_ldm_inpainting"], notices
    for name, ckpt in (("mammo_ldm_text2image", "autoencoder.pt"), ("he2ihc_pyramidpix2pix", "generator.pt"),
                       ("histo_ddpm_atypia", "classcond.pt")):
        assert "No trained checkpoint" in notices[name] and ckpt in notices[name] and "make demo" in notices[name]
    spec = next(s for s in tab_specs() if s.bundle == "he2ihc_pyramidpix2pix")
    with pytest.raises(Exception) as info:  # what the tab's handler shows in its status line
        bundle_model(spec, options).get("load")
    assert "generator.pt" in str(find_breastgen_error(info.value))
    workspace.cleanup()
    assert not workspace.root.exists()


def test_binding_beyond_localhost_warns():
    from breastgen.app.server import host_warning

    assert host_warning("127.0.0.1", 7860) is None and host_warning("localhost", 7860) is None
    assert "anyone who can reach this machine" in host_warning("0.0.0.0", 7860)


def test_cli_rejects_a_malformed_option_in_one_line(capsys):
    from breastgen.app.__main__ import main

    with pytest.raises(SystemExit) as info:
        main(["--checkpoints", "mammo_ldm_text2image"])
    assert info.value.code == 2
    assert capsys.readouterr().err.strip() == "error: --checkpoints must be NAME=PATH, got 'mammo_ldm_text2image'"
