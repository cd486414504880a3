# The search page in a real browser (headless Chromium driven by Selenium): a typed query lists the right video
# first with its top-k frames outlined, the video loads from its best-matching frame, a file named like an HTML tag
# shows as text, the query's warnings and errors appear, Back returns to the previous query, the frames work from
# the keyboard, and the page fits a 420-px phone screen as well as a desktop one. Screenshots of both go to
# $SCREENSHOTS_DIR when it is set (docs/search.md shows the ones in docs/). Skipped only on a machine without Chromium
# and chromedriver; in CI (CI set, .ci/run installs them) a missing browser fails.
import os

import pytest

import search
from test_eval import _tok
from test_serve import XSS, folder, net, query, server, trained  # noqa: F401 (fixtures)

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
try:
    from selenium import webdriver
    from selenium.common.exceptions import NoAlertPresentException, StaleElementReferenceException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:
    webdriver = None
_missing = webdriver is None or not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER))
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    _missing and not os.environ.get("CI"), reason="needs selenium, /usr/bin/chromium and /usr/bin/chromedriver")]


@pytest.fixture
def browser(tmp_path, monkeypatch):
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must never download a browser or a driver
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
                "--window-size=1280,1000", f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()


def _search(driver, text):
    box = driver.find_element(By.ID, "q")
    box.clear()
    box.send_keys(text)
    status = driver.find_element(By.ID, "status")
    driver.execute_script("arguments[0].textContent = ''", status)  # two answers may read alike ("... (3 ms)")
    driver.find_element(By.CSS_SELECTOR, "#search button").click()
    WebDriverWait(driver, 60).until(lambda d: status.text not in ("", "searching\u2026"))
    return driver.find_elements(By.CSS_SELECTOR, "#results .hit")


def test_search_page_in_a_browser(browser, server, net):
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    browser.get(url)
    assert browser.find_element(By.ID, "language").text == "English (CLIP text encoder)"
    hits = _search(browser, "a blue screen")
    want = search.search_index(net, server.search.index, ["a blue screen"], tokenizer=_tok(), context_length=16,
                           top_k_frames=2, frame_match_weight=1.0, top=3)[0]
    assert [h.get_attribute("data-video-id") for h in hits] == [h["video_id"] for h in want]
    first = hits[0]
    assert first.get_attribute("data-video-id") == "clip_blue"
    figures = first.find_elements(By.CSS_SELECTOR, "figure")
    outlined = [i for i, f in enumerate(figures) if "top" in f.get_attribute("class").split()]
    assert outlined == want[0]["top_frames"] and len(figures) == 4
    style = lambda el, prop: browser.execute_script("return getComputedStyle(arguments[0])[arguments[1]]", el, prop)
    assert style(figures[outlined[0]].find_element(By.TAG_NAME, "img"), "borderTopColor") == "rgb(232, 89, 12)"
    plain = next(i for i in range(4) if i not in outlined)
    assert style(figures[plain].find_element(By.TAG_NAME, "img"), "borderTopColor") == "rgba(0, 0, 0, 0)"
    # every thumbnail arrived and decoded
    loaded = browser.execute_script("return [...arguments[0].querySelectorAll('img')].every("
                                    "i => i.complete && i.naturalWidth > 0)", first)
    assert loaded
    # the video plays from the best-matching frame: the browser fetched it (with Range requests) and sought there
    start = query(server, "a blue screen")[1]["hits"][0]["start"]
    video = first.find_element(By.TAG_NAME, "video")
    src, _, fragment = video.get_attribute("src").partition("#t=")
    assert src.endswith("/video/clip_blue") and float(fragment) == start > 0
    WebDriverWait(browser, 60).until(lambda d: d.execute_script("return arguments[0].readyState", video) >= 1)
    assert browser.execute_script("return arguments[0].error", video) is None
    assert abs(browser.execute_script("return arguments[0].currentTime", video) - start) < 0.05
    assert browser.execute_script("return arguments[0].duration", video) == pytest.approx(1.5, abs=0.05)
    # the query is in the address: a reload runs it again
    assert "q=a+blue+screen" in browser.current_url

    # a file named like an <img> tag is listed as text and nothing is injected
    hits = _search(browser, "a purple screen")
    odd = [h for h in hits if h.get_attribute("data-video-id") == XSS]
    assert odd and XSS in odd[0].text
    assert browser.execute_script("return document.querySelectorAll('img[src=\"x\"]').length") == 0
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text

    # warnings and errors reach the page
    _search(browser, "\u7ea2\u8272\u7684\u5c4f\u5e55")  # Chinese, for an English model
    assert "cjk" in browser.find_element(By.ID, "warnings").text
    _search(browser, "   ")
    assert "empty query" in browser.find_element(By.ID, "status").text
    assert browser.find_elements(By.CSS_SELECTOR, "#results .hit") == []

    # Rescan (nothing changed here): the page reloads with its query and says what the rescan did
    _search(browser, "a green screen")
    browser.find_element(By.ID, "rescan").click()
    reloaded = WebDriverWait(browser, 120, ignored_exceptions=(StaleElementReferenceException,))  # the page reloads
    reloaded.until(lambda d: d.find_element(By.ID, "status").text.startswith("rescanned:"))
    assert browser.find_element(By.ID, "status").text.startswith("rescanned: 5 videos, 0 extracted, 0 encoded")
    assert browser.find_element(By.ID, "q").get_attribute("value") == "a green screen"
    hits = browser.find_elements(By.CSS_SELECTOR, "#results .hit")
    assert hits and hits[0].get_attribute("data-video-id") == "clip_green"


def _box(driver, element):
    return driver.execute_script("const r = arguments[0].getBoundingClientRect(); "
                                 "return {left: r.left, right: r.right, top: r.top, bottom: r.bottom, width: r.width}",
                                 element)


def _screenshot(driver, name, tmp_path):
    """A PNG of the page, reduced to 64 colours (small enough for the repository), in $SCREENSHOTS_DIR if set."""
    from PIL import Image
    raw = tmp_path / name
    driver.save_screenshot(str(raw))
    folder = os.environ.get("SCREENSHOTS_DIR") or str(tmp_path / "shots")
    os.makedirs(folder, exist_ok=True)
    Image.open(raw).convert("RGB").quantize(64).save(os.path.join(folder, name), optimize=True)
    return Image.open(os.path.join(folder, name)).size


def test_page_on_a_phone_and_a_desktop(browser, server, tmp_path):
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    fits = "return [document.documentElement.scrollWidth, innerWidth]"
    for width, phone in ((1280, False), (420, True)):
        browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {"width": width, "height": 900,
                                                                       "deviceScaleFactor": 1, "mobile": phone})
        browser.get(url)
        # the files skipped as unreadable are folded away, named by their path under the folder
        details = browser.find_element(By.CSS_SELECTOR, "details.skipped")
        assert details.get_attribute("open") is None and "2 file(s) skipped" in details.text
        assert browser.execute_script("return document.querySelector('label[for=top]').textContent") == "hits"
        hits = _search(browser, "a blue screen")
        first = hits[0]
        assert first.get_attribute("data-video-id") == "clip_blue"
        assert first.find_element(By.CSS_SELECTOR, ".explain").text.startswith("score ")
        assert "top-2 frames" in first.find_element(By.CSS_SELECTOR, ".explain").text
        assert "0:01.5 long" in first.text  # the duration of the hit
        page_width, window_width = browser.execute_script(fits)
        assert window_width == width and page_width <= window_width  # no sideways scrolling
        assert _box(browser, browser.find_element(By.ID, "rescan"))["right"] <= width  # every control reachable
        imgs = first.find_elements(By.CSS_SELECTOR, "figure img")
        assert len(imgs) == 4 and all(i.get_attribute("loading") == "lazy" for i in imgs)
        assert min(_box(browser, i)["width"] for i in imgs) >= 40
        video, strip = _box(browser, first.find_element(By.TAG_NAME, "video")), _box(browser, first.find_element(
            By.CSS_SELECTOR, ".strip"))
        if phone:  # the player on top, as wide as the page, the frames below it
            assert video["bottom"] <= strip["top"] and video["width"] >= 0.9 * (width - 16)
        else:
            assert video["right"] <= strip["left"]
        assert _screenshot(browser, f"search_{'phone' if phone else 'desktop'}.png", tmp_path)[0] == width

    # the frames work from the keyboard: Tab to one, Enter plays the video from its time
    first = browser.find_elements(By.CSS_SELECTOR, "#results .hit")[0]
    button = first.find_elements(By.CSS_SELECTOR, "figure button")[2]
    want = float(search.frame_time(search.prepare.sample_frame_indices(6, 4)[2], 1.5, 6))
    button.send_keys(Keys.ENTER)
    video = first.find_element(By.TAG_NAME, "video")
    WebDriverWait(browser, 30).until(lambda d: abs(d.execute_script("return arguments[0].currentTime", video)
                                                   - want) < 0.3)
    assert "play clip_blue from" in button.get_attribute("aria-label")

    # an error looks like one; Back returns to the previous query and its hits
    _search(browser, "   ")
    status = browser.find_element(By.ID, "status")
    assert "error" in status.get_attribute("class").split() and status.get_attribute("role") == "alert"
    assert browser.execute_script("return getComputedStyle(arguments[0]).color", status) == "rgb(176, 0, 32)"
    _search(browser, "a green screen")
    assert "error" not in status.get_attribute("class").split()
    browser.back()
    WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "q").get_attribute("value") == "   ")
    browser.back()
    WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "q").get_attribute("value") == "a blue screen")
    WebDriverWait(browser, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#results .hit") and d.find_elements(
        By.CSS_SELECTOR, "#results .hit")[0].get_attribute("data-video-id") == "clip_blue")

