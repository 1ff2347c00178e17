"""The chat page of `lfm2 serve` (lfm2/web; sources in webui/), tested as a person uses it: Playwright
driving the system's Chromium (Debian's `chromium` package, not a browser Playwright downloads),
headless, against a live `lfm2 serve` on the bundled model.

Every browser test records what the page does besides: each request must go to the server's origin
(blob: and data: URLs stay inside the browser), and no console error, page error or dialog may occur.
Where a reply the model cannot be made to write is needed (HTML and scripts in its output, reasoning,
an image request), the test answers /v1/chat/completions itself with a scripted stream (`page.route`).

Screenshots of the main states are written to $LFM2_SCREENSHOTS, by default build/web-screenshots/
(ignored by git); the README's is one of them (docs/web.md). Without Chromium or Playwright the
browser tests skip, but where the environment variable CI is set they fail: .ci/run installs both.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from lfm2.web import STATIC

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # the browser tests skip, or fail under CI (the `browser` fixture)
    expect = sync_playwright = None

ROOT = Path(__file__).resolve().parents[1]
WEBUI = ROOT / "webui"
SCREENSHOTS = Path(os.environ.get("LFM2_SCREENSHOTS") or ROOT / "build" / "web-screenshots")
CHECKPOINT_DEFAULTS = {"temperature": 0.3, "min_p": 0.15, "repetition_penalty": 1.05}  # lfm2-tiny's generation_config
PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9a"
                       "wAAAABJRU5ErkJggg==")  # one pixel


def _unavailable(reason: str):
    """Skip, but fail under CI, where a skipped browser test would pass for nothing."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason}: CI must run the browser tests (.ci/run installs Chromium and Playwright)")
    pytest.skip(reason)


# -- the server ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> str:
    """`lfm2 serve` on the bundled model, in a subprocess on a free port; its base URL."""
    yield from _serve(tmp_path_factory)


def _serve(tmp_path_factory, *options: str):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "lfm2", "serve", "--port", str(port), "--log-level", "warning",
                                 *options],
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"lfm2 serve did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


# -- without a browser ----------------------------------------------------------------------------


def test_page_and_assets_come_with_a_strict_policy(server):
    page = httpx.get(server + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "connect-src 'self'" in csp and "script-src 'self';" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert "<script src=\"/static/app.js\" defer></script>" in page.text
    for name, kind in (("app.js", "text/javascript"), ("app.css", "text/css"), ("favicon.svg", "image/svg+xml")):
        asset = httpx.get(f"{server}/static/{name}")
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind), name
        assert asset.headers["content-security-policy"] == csp and asset.headers["x-content-type-options"] == "nosniff"
    for missing in ("/static/nope.js", "/static/..%2F__init__.py", "/static/"):
        assert httpx.get(server + missing).status_code == 404, missing


def test_info_has_the_checkpoint_defaults_and_stays_out_of_the_api_schema(server):
    info = httpx.get(server + "/web/info").json()
    assert info["model"] == "lfm2-tiny" and info["max_model_len"] == 2048
    assert {k: info["defaults"][k] for k in CHECKPOINT_DEFAULTS} == CHECKPOINT_DEFAULTS
    assert info["capabilities"] == {"tools": True, "vision": False}
    paths = httpx.get(server + "/openapi.json").json()["paths"]
    assert "/" not in paths and "/web/info" not in paths and not any(p.startswith("/static") for p in paths)


def test_the_built_page_is_up_to_date():
    """lfm2/web/static records a digest of the sources it was built from (webui/build.mjs computes it
    the same way): an edit to webui/ without `npm run build` fails here, no Node needed."""
    if not WEBUI.is_dir():
        pytest.skip("webui/ (the page's sources) is not in this copy of lfm2")
    names = sorted([p.relative_to(WEBUI).as_posix() for p in (WEBUI / "src").rglob("*") if p.is_file()]
                   + ["build.mjs", "package-lock.json"])
    digest = hashlib.sha256()
    for name in names:
        digest.update(name.encode() + b"\0" + (WEBUI / name).read_bytes() + b"\0")
    assert (STATIC / "source-hash.txt").read_text().strip() == digest.hexdigest(), (
        "lfm2/web/static is older than webui/: rebuild it with `cd webui && npm ci && npm run build`")


def test_the_page_declares_no_load_from_elsewhere():
    """No URL to another host where a page declares what it loads (HTML, CSS, the icon; the SVG
    namespace is a name, never fetched): the Content-Security-Policy would block such a load and the
    browser tests would see its console error, but only on the paths they take. (app.js holds a few
    URLs in its libraries' warning messages, which are text.)"""
    for name in ("index.html", "app.css", "favicon.svg"):
        urls = re.findall(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}[^\s\"'`)]*", (STATIC / name).read_text())
        assert [u for u in urls if u != "http://www.w3.org/2000/svg"] == [], name


# -- in the browser -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    chromium = os.environ.get("LFM2_CHROMIUM") or shutil.which("chromium")
    if chromium is None:
        _unavailable("no Chromium to drive (Debian: apt-get install chromium; or set LFM2_CHROMIUM)")
    if sync_playwright is None:
        _unavailable("Playwright is not installed (pip install -e '.[test]')")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True)
        yield browser
        browser.close()


class Watch:
    """What a page did besides what the test asked: requests, console errors, page errors, dialogs."""

    def __init__(self, page, origin: str) -> None:
        self.origin, self.requests, self.errors, self.dialogs, self.chats = origin, [], [], [], []
        page.on("request", self._request)
        page.on("console", lambda msg: msg.type == "error" and self.errors.append(f"console: {msg.text}"))
        page.on("pageerror", lambda exc: self.errors.append(f"page error: {exc}"))
        page.on("dialog", lambda dialog: (self.dialogs.append(dialog.message), dialog.dismiss()))

    def _request(self, request) -> None:
        self.requests.append(request.url)
        if request.url.endswith("/v1/chat/completions") and request.method == "POST":
            self.chats.append(json.loads(request.post_data))

    def check(self) -> None:
        inside = (self.origin + "/", "blob:" + self.origin + "/", "data:")
        assert [u for u in self.requests if not u.startswith(inside)] == [], "requests left the server's origin"
        assert self.errors == []
        assert self.dialogs == []


@pytest.fixture
def page(browser, server):
    """A fresh browser context (empty local storage) on the chat page, watched."""
    context = browser.new_context(viewport={"width": 1100, "height": 760}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(30_000)
    watch = Watch(page, server)
    page.watch = watch
    page.goto(server + "/")
    page.wait_for_selector("body[data-ready]")
    yield page
    context.close()
    watch.check()


def shot(page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))


def settings(page, **fields) -> None:
    """Set fields of the settings panel (by name; True/False tick a checkbox) and close it."""
    page.get_by_role("button", name="Settings").click()
    for name, value in fields.items():
        field = page.locator(f"#settings-form [name={name}]")
        if isinstance(value, bool):
            field.set_checked(value)
        else:
            field.fill(str(value))
    page.get_by_role("button", name="Close", exact=True).click()


def send(page, text: str) -> None:
    """Type `text` and press Enter, then wait for the reply to end."""
    page.get_by_role("textbox", name="Message").fill(text)
    page.keyboard.press("Enter")
    idle(page)


def idle(page) -> None:
    page.wait_for_selector("#composer[aria-busy=false]")


def replies(page) -> list[str]:
    return page.locator("article.assistant .md:not(.reasoning-text)").all_inner_texts()


def test_sends_a_message_and_shows_the_streamed_reply(page, server):
    settings(page, temperature=0)
    with page.expect_response("**/v1/chat/completions") as response:
        send(page, "Hello!")
    assert response.value.headers["content-type"].startswith("text/event-stream")
    body = page.watch.chats[-1]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["messages"] == [{"role": "user", "content": "Hello!"}]
    # The same request unstreamed, from the API: the page shows exactly the model's reply.
    direct = httpx.post(server + "/v1/chat/completions", timeout=60, json={**body, "stream": False})
    expected = direct.json()["choices"][0]["message"]["content"]
    assert replies(page) == [expected.strip()]
    stats = page.locator("article.assistant .stats").inner_text()
    assert re.search(r"first token \d+ ms · [\d.]+ tokens/s · \d+ prompt tokens · \d+ completion tokens", stats), stats
    usage = direct.json()["usage"]
    assert f"{usage['prompt_tokens']} prompt tokens · {usage['completion_tokens']} completion tokens" in stats
    assert page.locator("#attach").is_hidden()  # the bundled model takes text only
    shot(page, "chat")


def test_stop_mid_stream_with_the_button_and_with_escape(page, server):
    # ignore_eos (an extra request field) makes the reply long enough to stop in the middle.
    settings(page, max_tokens=1500, extra='{"ignore_eos": true}')
    for i, how in enumerate(("button", "Escape")):
        page.get_by_role("textbox", name="Message").fill("Tell me a long story.")
        page.keyboard.press("Enter")
        last = page.locator("article.assistant").nth(i)
        expect(last.locator(".md")).to_contain_text(re.compile(r"\S.{20}", re.S))  # shown while it streams
        assert page.get_by_role("button", name="Stop").is_visible()
        if how == "button":
            page.get_by_role("button", name="Stop").click()
        else:
            page.keyboard.press("Escape")
        idle(page)
        assert last.locator(".note").inner_text() == "Stopped."
        assert last.locator(".md").inner_text().strip()
        assert page.get_by_role("button", name="Send", exact=True).is_visible()
    shot(page, "stopped")
    deadline = time.time() + 10  # the server cancels a request whose client left
    while httpx.get(server + "/health").json()["active"] and time.time() < deadline:
        time.sleep(0.1)
    assert httpx.get(server + "/health").json()["active"] == 0


def test_a_tool_call_is_a_card_and_its_result_is_answered(page):
    settings(page, temperature=0, demo_tools=True)
    send(page, "What's the weather in Lisbon?")
    card = page.locator(".tool-card")
    assert card.locator(".tool-name").inner_text() == "get_weather"
    assert json.loads(card.locator(".tool-args").inner_text()) == {"city": "Lisbon"}
    assert [t["function"]["name"] for t in page.watch.chats[-1]["tools"]] == ["get_weather", "calculate"]
    page.get_by_role("button", name="Run demo tool").click()
    idle(page)
    assert json.loads(card.locator(".tool-result code").inner_text()) == {"temperature": 18, "condition": "cloudy"}
    sent = page.watch.chats[-1]["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "tool"]
    assert sent[2]["tool_call_id"] == sent[1]["tool_calls"][0]["id"]
    answer = replies(page)[-1]
    assert "cloudy" in answer and "18" in answer, answer
    shot(page, "tool-call")


def test_a_reload_keeps_the_conversations_and_the_list_switches_renames_deletes(page):
    settings(page, temperature=0)
    send(page, "Hello!")
    first = replies(page)
    page.get_by_role("button", name="New chat").click()
    send(page, "What color is snow?")
    page.reload()
    page.wait_for_selector("body[data-ready]")
    items = page.locator("#conversation-list li")
    assert items.locator(".open").all_inner_texts() == ["What color is snow?", "Hello!"]
    assert page.locator("article.user .plain").all_inner_texts() == ["What color is snow?"]
    page.get_by_role("button", name="Hello!", exact=True).click()
    assert replies(page) == first
    page.get_by_role("button", name="Rename “Hello!”").click()
    page.get_by_role("textbox", name="New name of the conversation").fill("Greetings")
    page.keyboard.press("Enter")
    page.reload()
    page.wait_for_selector("body[data-ready]")
    assert items.locator(".open").all_inner_texts() == ["What color is snow?", "Greetings"]  # newest first
    assert replies(page) == first  # the current conversation is kept too
    page.get_by_role("button", name="Delete “What color is snow?”").click()
    page.get_by_role("button", name="Confirm deleting “What color is snow?”").click()
    assert items.locator(".open").all_inner_texts() == ["Greetings"]
    page.reload()
    page.wait_for_selector("body[data-ready]")
    assert items.locator(".open").all_inner_texts() == ["Greetings"]


def test_export_then_import_restores_a_conversation(page, tmp_path):
    settings(page, temperature=0)
    send(page, "Hello!")
    shown = page.locator("#messages").inner_text()
    with page.expect_download() as download:
        page.get_by_role("button", name="Export").click()
    path = tmp_path / "chats.json"
    download.value.save_as(path)
    data = json.loads(path.read_text())
    assert data["format"] == "lfm2-chat" and len(data["conversations"]) == 1
    assert [m["role"] for m in data["conversations"][0]["messages"]] == ["user", "assistant"]
    page.get_by_role("button", name="Delete “Hello!”").click()
    page.get_by_role("button", name="Confirm deleting “Hello!”").click()
    assert page.locator("article").count() == 0
    assert page.locator("#conversation-list li .open").all_inner_texts() == ["New chat"]
    page.locator("#import-file").set_input_files(str(path))
    page.get_by_role("status").filter(has_text="Imported 1 conversation").wait_for()
    assert page.locator("#messages").inner_text() == shown
    page.reload()
    page.wait_for_selector("body[data-ready]")
    assert page.locator("#messages").inner_text() == shown
    page.locator("#import-file").set_input_files(files=[{"name": "bad.json", "mimeType": "application/json",
                                                         "buffer": b'{"format": "lfm2-chat", "conversations": 3}'}])
    page.get_by_role("status").filter(has_text="Could not import bad.json").wait_for()


def _stream(*deltas: dict) -> str:
    """A chat completion stream of `deltas`, as the server sends one."""
    def event(delta: dict, finish: str | None = None) -> str:
        chunk = {"id": "chatcmpl-test", "object": "chat.completion.chunk", "created": 0, "model": "lfm2-tiny",
                 "system_fingerprint": None,
                 "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        return f"data: {json.dumps(chunk)}\n\n"

    usage = {"id": "chatcmpl-test", "object": "chat.completion.chunk", "created": 0, "model": "lfm2-tiny",
             "system_fingerprint": None, "choices": [],
             "usage": {"prompt_tokens": 9, "completion_tokens": len(deltas), "total_tokens": 9 + len(deltas)}}
    return ("".join(event(d) for d in ({"role": "assistant", "content": ""}, *deltas)) + event({}, "stop")
            + f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n")


def _scripted(page, body: str) -> None:
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, headers={"Content-Type": "text/event-stream"}, body=body))


UNTRUSTED = ("Here it is:\n\n<script>window.__pwned = 1</script>\n\n<img src=x onerror=\"window.__pwned = 2\">\n\n"
             "[a link](javascript:window.__pwned=3) and ![tracker](http://example.com/pixel.png)\n\n"
             "```python\ndef square(x):\n    return x ** 2\n```\n\nEuler: $e^{i\\pi} + 1 = 0$ and a_b_c stays.")


def test_model_output_with_html_and_scripts_is_shown_as_text(page):
    _scripted(page, _stream({"reasoning_content": "Let me think <b>hard</b>."},
                            *({"content": UNTRUSTED[i:i + 20]} for i in range(0, len(UNTRUSTED), 20))))
    send(page, "Show me something dangerous")
    reply = page.locator("article.assistant")
    text = reply.locator(".md:not(.reasoning-text)").inner_text()
    assert "<script>window.__pwned = 1</script>" in text
    assert '<img src=x onerror="window.__pwned = 2">' in text
    assert page.evaluate("window.__pwned") is None
    assert reply.locator("script, img, iframe").count() == 0
    link = reply.locator("a", has_text="a link")  # without its javascript: address, not a link to a screen reader
    assert link.get_attribute("href") is None
    link.click()  # nothing runs, nothing opens
    assert page.evaluate("window.__pwned") is None
    assert reply.get_by_role("link", name="[image: tracker]").get_attribute("rel") == "noopener noreferrer"
    assert reply.locator("pre code .hljs-keyword").first.inner_text() == "def"
    assert reply.locator(".math").inner_text() == "e^{i\\pi} + 1 = 0"
    assert "a_b_c stays" in text
    reasoning = reply.locator("details.reasoning")
    assert reasoning.get_attribute("open") is None
    reasoning.locator("summary").click()
    assert reasoning.locator(".reasoning-text").inner_text() == "Let me think <b>hard</b>."
    assert "9 prompt tokens" in reply.locator(".stats").inner_text()  # the stream's usage
    shot(page, "untrusted-output")


def test_regenerate_and_edit_and_resend(page):
    settings(page, temperature=0)
    send(page, "Hello!")
    page.get_by_role("button", name="Regenerate this reply").click()
    idle(page)
    assert page.watch.chats[-1]["messages"] == [{"role": "user", "content": "Hello!"}]
    assert page.locator("article").count() == 2
    page.get_by_role("button", name="Edit and resend this message").click()
    page.get_by_role("textbox", name="Edit your message").fill("What is the capital of Japan?")
    page.keyboard.press("Enter")
    idle(page)
    assert page.watch.chats[-1]["messages"] == [{"role": "user", "content": "What is the capital of Japan?"}]
    assert page.locator("article.user .plain").all_inner_texts() == ["What is the capital of Japan?"]
    assert len(replies(page)) == 1


def test_settings_start_from_the_checkpoint_defaults_and_go_into_the_request(page):
    page.get_by_role("button", name="Settings").click()
    for name, value in CHECKPOINT_DEFAULTS.items():
        assert float(page.locator(f"#settings-form [name={name}]").input_value()) == value
        assert page.locator(f"#{name}-default").inner_text() == f"checkpoint default: {value}"
    page.locator("#settings-form [name=system]").fill("You are terse.")
    page.locator("#settings-form [name=temperature]").fill("0.7")
    page.locator("#settings-form [name=max_tokens]").fill("20")
    page.locator("#settings-form [name=extra]").fill("{not json")
    assert "Extra request fields: not valid JSON" in page.locator("#settings-error").inner_text()
    page.get_by_role("button", name="Close", exact=True).click()
    page.get_by_role("textbox", name="Message").fill("Hi")
    page.keyboard.press("Enter")  # refused by the page, not sent to be refused by the server
    page.get_by_role("status").filter(has_text="Settings, extra request fields: not valid JSON").wait_for()
    assert page.get_by_role("textbox", name="Message").input_value() == "Hi" and page.watch.chats == []
    page.get_by_role("button", name="Settings").click()
    page.locator("#settings-form [name=extra]").fill('{"seed": 7}')
    shot(page, "settings")
    page.get_by_role("button", name="Close", exact=True).click()
    send(page, "Hi")
    body = page.watch.chats[-1]
    assert body["messages"][0] == {"role": "system", "content": "You are terse."}
    assert (body["temperature"], body["min_p"], body["repetition_penalty"]) == (0.7, 0.15, 1.05)
    assert body["max_tokens"] == 20 and body["seed"] == 7
    page.get_by_role("button", name="Settings").click()
    page.get_by_role("button", name="Use the checkpoint's defaults").click()
    assert float(page.locator("#settings-form [name=temperature]").input_value()) == 0.3
    page.keyboard.press("Escape")  # closes the panel


def test_images_are_attached_when_the_model_has_vision(page, server):
    info = httpx.get(server + "/web/info").json()
    info["capabilities"]["vision"] = True
    page.route("**/web/info", lambda route: route.fulfill(json=info))
    _scripted(page, _stream({"content": "A very small picture."}))
    page.reload()
    page.wait_for_selector("body[data-ready]")
    assert page.get_by_role("button", name="Attach an image").is_visible()
    page.locator("#attach-file").set_input_files(files=[{"name": "dot.png", "mimeType": "image/png", "buffer": PNG}])
    page.get_by_role("img", name="image 1 to send").wait_for()
    send(page, "What is this?")
    content = page.watch.chats[-1]["messages"][-1]["content"]
    url = "data:image/png;base64," + base64.b64encode(PNG).decode()
    assert content == [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": url}}]
    assert page.locator("article.user img").count() == 1 and page.locator("#attachments img").count() == 0


def test_phone_width_dark_theme_keyboard_and_labels(browser, server):
    context = browser.new_context(viewport={"width": 390, "height": 844}, color_scheme="dark", is_mobile=True)
    page = context.new_page()
    watch = Watch(page, server)
    page.goto(server + "/")
    page.wait_for_selector("body[data-ready]")
    settings(page, temperature=0, max_tokens=40)
    box = page.get_by_role("textbox", name="Message")
    box.press_sequentially("first line")
    page.keyboard.press("Shift+Enter")
    box.press_sequentially("second line")
    assert box.input_value() == "first line\nsecond line" and not watch.chats  # Shift+Enter is a new line
    page.keyboard.press("Enter")
    idle(page)
    assert page.locator("article.user .plain").inner_text() == "first line\nsecond line"
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    assert page.evaluate("getComputedStyle(document.body).backgroundColor") == "rgb(23, 24, 28)"
    sidebar = page.get_by_role("complementary", name="Conversations")
    expect(sidebar).not_to_be_in_viewport()  # off screen until asked for
    shot(page, "phone-dark")
    page.get_by_role("button", name="Chats").click()
    expect(sidebar).to_be_in_viewport(ratio=1)
    shot(page, "phone-conversations")
    page.get_by_role("button", name="Close the conversation list").click()
    page.get_by_role("button", name="Theme: auto. Change the theme").click()  # auto -> light
    assert page.evaluate("getComputedStyle(document.body).backgroundColor") == "rgb(255, 255, 255)"
    # Every control has a name a screen reader can say.
    unnamed = page.evaluate("""() => [...document.querySelectorAll('button, textarea, input, select')]
        .filter(el => !(el.getAttribute('aria-label') || el.labels?.length || el.textContent.trim()))
        .map(el => el.outerHTML)""")
    assert unnamed == []
    context.close()
    watch.check()


KEY = "s3cret-key"


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory) -> str:
    """`lfm2 serve --api-key`: the page's files are open, the API needs the key."""
    yield from _serve(tmp_path_factory, "--api-key", KEY)


def test_with_an_api_key_the_page_asks_for_it_once_and_sends_it(browser, keyed_server):
    for path, status in [("/", 200), ("/static/app.js", 200), ("/web/info", 401), ("/v1/models", 401)]:
        assert httpx.get(keyed_server + path, timeout=30).status_code == status, path
    context = browser.new_context(viewport={"width": 1100, "height": 760})
    page = context.new_page()
    page.set_default_timeout(30_000)
    asked, sent = [], []
    page.on("dialog", lambda dialog: (asked.append(dialog.message), dialog.accept(KEY)))
    page.on("request", lambda r: r.url.endswith("/v1/chat/completions") and sent.append(r.headers))
    try:
        page.goto(keyed_server + "/")
        page.wait_for_selector("body[data-ready]")
        assert len(asked) == 1 and "API key" in asked[0]
        settings(page, temperature=0)
        send(page, "Hello!")
        assert replies(page) and replies(page)[0]
        assert sent[-1].get("authorization") == f"Bearer {KEY}"
        page.reload()  # the key is kept in this browser: not asked again
        page.wait_for_selector("body[data-ready]")
        assert len(asked) == 1
    finally:
        context.close()
