"""The web chat page at `GET /`, in a real headless Chromium driven by Selenium against a real
`ownlm serve`: the page loads and lists the models, a message gets a streamed answer equal to the
engine's, stop cancels the sequence on the server, conversations survive a reload, markdown is
rendered (and model text never becomes markup), and a key-protected server asks for the key.

The browser is Debian's `chromium` and `chromium-driver`; CI installs them (.ci/run) and sets
OWNLM_REQUIRE_BROWSER=1, so there the browser tests fail instead of skipping when it is missing."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest

import ownlm
import server_util
from conftest import ROOT, build_hf_model
from ownlm import manage
from ownlm.server import page
from ownlm.store.store import Store
from server_util import metric

KEY = "page-key-0123456789"
WIDE = "clé-de-la-page-0123456789"  # a second key, outside ASCII
STATIC = Path(page.__file__).resolve().parent / "static"
INSTALL = "apt-get install -y chromium chromium-driver"


# --- the files, without a browser -----------------------------------------------------------------

def test_static_files_are_self_contained_and_packaged():
    files = sorted(p.name for p in STATIC.iterdir() if p.is_file())
    assert {"index.html", "chat.js", "chat.css"} <= set(files) and set(page.FILES) | {"index.html"} == set(files)
    for name in files:
        text = (STATIC / name).read_text()
        # nothing fetched from elsewhere: no URL but the SVG namespace (a name, never fetched)
        urls = set(re.findall(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}[^\s\"')]*", text)) - {"http://www.w3.org/2000/svg"}
        assert not urls, f"{name} refers to {urls}"
        assert "@import" not in text and "url(" not in text, name
    html = (STATIC / "index.html").read_text()
    assert not re.search(r"<script(?![^>]*\bsrc=)", html) and " style=" not in html and not re.search(r"\son\w+=", html)
    js = (STATIC / "chat.js").read_text()
    assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|eval\(|new Function", js)
    line = re.search(r'^"ownlm\.server" = (\[.*\])$', (ROOT / "pyproject.toml").read_text(), re.M)
    patterns = json.loads(line.group(1))  # package-data: what a wheel or `pip install .` ships
    assert all(any(fnmatch.fnmatch(f"static/{n}", p) for p in patterns) for n in files)


# --- a real server and a real browser -------------------------------------------------------------

@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A tiny random Llama with room for answers that last seconds (for the stop button)."""
    return build_hf_model(tmp_path_factory.mktemp("page") / "tiny", "llama", max_position_embeddings=16384)


@pytest.fixture(scope="module")
def lm(folder):
    return ownlm.load(str(folder), dtype="float32")


@pytest.fixture(scope="module")
def home(tmp_path_factory, folder) -> Path:
    base = tmp_path_factory.mktemp("page-serve")
    manage.import_path(folder, name="tiny", store=Store(base / "home"), quiet=True)
    return base / "home"


@pytest.fixture(scope="module")
def served(home):
    s = server_util.Server(home, ["tiny", "--preload", "--dtype", "float32"])
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def keyed(home):
    s = server_util.Server(home, ["tiny", "--preload", "--dtype", "float32", "--api-key", KEY, "--api-key", WIDE])
    yield s
    assert s.stop() == 0


def test_page_headers_and_the_guard(served, keyed):
    for base in (served.base, keyed.base):  # the page and its files load without a key
        r = httpx.get(f"{base}/", timeout=30)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        csp = r.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp and "unsafe" not in csp
        assert "connect-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert r.headers["x-content-type-options"] == "nosniff"
        for name, kind in page.FILES.items():
            a = httpx.get(f"{base}/ui/{name}", timeout=30)
            assert a.status_code == 200 and a.headers["content-type"] == kind and "content-security-policy" in a.headers
    assert httpx.get(f"{served.base}/ui/nope.js", timeout=30).status_code == 404
    assert httpx.get(f"{served.base}/ui/../app.py", timeout=30).status_code == 404
    # everything else still needs the key: the API, other files, other methods on the page's paths
    assert httpx.get(f"{keyed.base}/v1/models", timeout=30).status_code == 401
    assert httpx.get(f"{keyed.base}/ui/nope.js", timeout=30).status_code == 401
    assert httpx.post(f"{keyed.base}/", json={}, timeout=30).status_code == 401
    auth = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(f"{keyed.base}/v1/models", headers=auth, timeout=30).status_code == 200
    # the page's own origin may POST (browsers send Origin on same-origin fetches); another site may not
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    same = httpx.post(f"{served.base}/v1/chat/completions", json=body, headers={"Origin": served.base}, timeout=60)
    assert same.status_code == 200, same.text
    other = httpx.post(f"{served.base}/v1/chat/completions", json=body, headers={"Origin": "http://evil.example"},
                       timeout=60)
    assert other.status_code == 403
    # another site's <img> or link sends no Origin, but Sec-Fetch-Site: it reaches only the page's files
    cross = {"Sec-Fetch-Site": "cross-site"}
    for path in ("/tokenizer_info?model=tiny", "/v1/models", "/health", "/api/tags"):
        r = httpx.get(f"{served.base}{path}", headers=cross, timeout=30)
        assert r.status_code == 403 and "another site" in r.text, path
    assert httpx.get(f"{served.base}/", headers=cross, timeout=30).status_code == 200
    assert httpx.get(f"{served.base}/tokenizer_info?model=tiny", headers={"Sec-Fetch-Site": "same-origin"},
                     timeout=60).status_code == 200
    # a key outside ASCII, sent as its UTF-8 bytes, matches both ways of sending it
    for header in ({"Authorization": f"Bearer {WIDE}".encode()}, {"x-api-key": WIDE.encode()}):
        assert httpx.get(f"{keyed.base}/v1/models", headers=header, timeout=30).status_code == 200


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        if os.environ.get("OWNLM_REQUIRE_BROWSER"):
            pytest.fail(f"OWNLM_REQUIRE_BROWSER is set but chromium / chromedriver are missing: {INSTALL}")
        pytest.skip(f"the chat page tests need Debian's chromium and chromium-driver: {INSTALL}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the page's console, read by js_errors
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
                "--window-size=1200,900", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


def wait(driver, condition, timeout: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition)


def by_id(driver, element_id: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def js_errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"
            and "favicon" not in e["message"] and "401" not in e["message"]]


def open_page(driver, base: str, fresh: bool = True):
    driver.get(f"{base}/")
    if fresh:
        driver.execute_script("localStorage.clear(); sessionStorage.clear();")
        driver.get(f"{base}/")
    # a get of the page the browser is already on can return before the new document has its title
    wait(driver, lambda d: d.title == "ownlm chat", timeout=30)


def wait_models(driver) -> list[str]:
    wait(driver, lambda d: d.execute_script("return document.querySelectorAll('#model option').length") > 0)
    return driver.execute_script("return [...document.querySelectorAll('#model option')].map(o => o.value)")


def settings(driver, system: str = "", temperature: str = "0", max_tokens: str = "64"):
    driver.execute_script("""
        for (const [id, value] of Object.entries(arguments[0])) {
            const el = document.getElementById(id);
            el.value = value;
            el.dispatchEvent(new Event('change'));
        }""", {"system": system, "temperature": temperature, "max-tokens": max_tokens})


def send(driver, text: str):
    by_id(driver, "input").send_keys(text)
    by_id(driver, "send").click()


def last_answer(driver):
    from selenium.webdriver.common.by import By

    wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#messages .message.assistant"))
    return driver.find_elements(By.CSS_SELECTOR, "#messages .message.assistant")[-1]


def wait_done(driver, timeout: float = 120):
    answer = last_answer(driver)
    wait(driver, lambda d: answer.get_attribute("data-state") == "done", timeout)
    return answer


def stored(driver) -> list[dict]:
    return json.loads(driver.execute_script("return localStorage.getItem('ownlm.chats')") or "[]")


WATCH = """
window.states = [];
new MutationObserver(() => {
    const all = document.querySelectorAll('#messages .message.assistant');
    const last = all[all.length - 1];
    if (last && last.dataset.state === 'streaming') {
        window.states.push(last.querySelector('.content').textContent);
        window.stopShown = window.stopShown || !document.getElementById('stop').hidden;
    }
}).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
"""


def test_a_message_gets_a_streamed_answer(browser, served, lm):
    open_page(browser, served.base)
    assert wait_models(browser) == ["tiny"]
    wait(browser, lambda d: by_id(d, "status").text == "ready")
    settings(browser, system="Answer briefly.", temperature="0", max_tokens="200")
    browser.execute_script(WATCH)
    send(browser, "Name three colors.")
    answer = wait_done(browser)
    assert browser.execute_script("return window.stopShown")  # while it streamed, the stop button showed
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name three colors."}]
    expected = lm.chat(messages, temperature=0, max_tokens=200)
    chat = stored(browser)[0]
    assert [m["role"] for m in chat["messages"]] == ["user", "assistant"]
    assert chat["messages"][1]["content"] == expected.text and chat["model"] == "tiny"
    assert answer.get_attribute("data-finish") == expected.finish_reason
    assert f"{expected.usage['completion_tokens']} tokens" in answer.find_element("css selector", ".meta").text
    states = [s for s in dict.fromkeys(browser.execute_script("return window.states")) if s]
    # it arrived in pieces (chunks counted as they came; the page may draw several in one frame)
    assert states and int(answer.get_attribute("data-chunks")) >= 2, states
    assert all(later.startswith(earlier[:-1]) for earlier, later in zip(states, states[1:]))  # each adds to the last
    assert by_id(browser, "stop").get_attribute("hidden") and not by_id(browser, "send").get_attribute("hidden")
    assert not js_errors(browser)


def test_stop_cancels_the_answer(browser, served, lm):
    prompt = [{"role": "user", "content": "Tell me a long story."}]
    open_page(browser, served.base)
    wait_models(browser)
    settings(browser, temperature="0", max_tokens="16000")
    cancelled = metric(served.base, "ownlm_sequences_cancelled_total")
    send(browser, prompt[0]["content"])
    answer = last_answer(browser)
    wait(browser, lambda d: int(answer.get_attribute("data-chunks") or 0) >= 2)
    by_id(browser, "stop").click()
    wait_done(browser, timeout=30)
    # (greedy, this model never ends this answer: "stop" here would mean the answer ran out by itself)
    assert answer.get_attribute("data-finish") == "stopped" and "stopped" in answer.text
    partial = stored(browser)[0]["messages"][1]["content"]
    assert partial
    engine = ""
    for piece in lm.chat_stream(prompt, temperature=0, max_tokens=16000):  # the engine's answer, as far as needed
        engine += piece
        if len(engine) >= len(partial):
            break
    assert engine.startswith(partial)
    deadline = time.monotonic() + 20  # the server sees the connection close and retires the sequence
    while metric(served.base, "ownlm_sequences_cancelled_total") <= cancelled:
        assert time.monotonic() < deadline, "the server did not cancel the sequence"
        time.sleep(0.1)
    # the next message works
    settings(browser, temperature="0", max_tokens="8")
    send(browser, "And now?")
    assert wait_done(browser).get_attribute("data-finish") in ("length", "stop")
    assert not js_errors(browser)


def test_conversations_are_kept_in_the_browser(browser, served):
    open_page(browser, served.base)
    wait_models(browser)
    settings(browser, temperature="0", max_tokens="6")
    send(browser, "First conversation")
    wait_done(browser)
    by_id(browser, "new-chat").click()
    send(browser, "Second conversation")
    wait_done(browser)
    before = stored(browser)
    assert [c["title"] for c in before] == ["First conversation", "Second conversation"]
    open_page(browser, served.base, fresh=False)  # a reload: the list, the open conversation and the settings stay
    wait_models(browser)
    titles = [b.text for b in browser.find_elements("css selector", "#conversations .open")]
    assert titles == ["Second conversation", "First conversation"]
    assert by_id(browser, "max-tokens").get_attribute("value") == "6"
    assert "Second conversation" in by_id(browser, "messages").text
    browser.find_elements("css selector", "#conversations .open")[1].click()
    assert "First conversation" in by_id(browser, "messages").text
    browser.find_elements("css selector", "#conversations .delete")[0].click()  # delete "Second"
    open_page(browser, served.base, fresh=False)
    assert [c["title"] for c in stored(browser)] == ["First conversation"]


def test_two_tabs_keep_each_others_conversations_and_a_full_storage_is_said(browser, served):
    open_page(browser, served.base)
    wait_models(browser)
    settings(browser, temperature="0", max_tokens="2")
    first = browser.current_window_handle
    browser.switch_to.new_window("tab")
    open_page(browser, served.base, fresh=False)  # the second tab loads before the first has a conversation
    wait_models(browser)
    browser.switch_to.window(first)
    send(browser, "From the first tab")
    wait_done(browser)
    browser.switch_to.window([h for h in browser.window_handles if h != first][0])
    by_id(browser, "new-chat").click()
    send(browser, "From the second tab")
    wait_done(browser)
    assert sorted(c["title"] for c in stored(browser)) == ["From the first tab", "From the second tab"]
    titles = [b.text for b in browser.find_elements("css selector", "#conversations .open")]
    assert "From the first tab" in titles
    browser.close()
    browser.switch_to.window(first)
    # a storage that refuses the write (full): every status after says the conversation is not kept
    browser.execute_script("Storage.prototype.setItem = function () { throw new Error('quota exceeded'); };")
    send(browser, "Not kept")
    wait_done(browser)
    status = by_id(browser, "status")
    assert "not kept in this browser: quota exceeded" in status.text and "error" in status.get_attribute("class")


MARKDOWN = """Here is **bold**, *italic* and `inline code`, a [link](https://example.org/a?b=1&c=2) and a
[bad link](javascript:alert(1)).

```python
def add(a, b):
    return a + b  # <script>alert(1)</script>
```

- one
- two

1. first
2. second

<img src=x onerror="window.pwned = 1"> <b>not bold</b>"""


def test_markdown_is_rendered_and_model_text_stays_text(browser, served):
    open_page(browser, served.base)
    browser.execute_script("""
        localStorage.setItem('ownlm.chats', JSON.stringify([{id: 'md', title: 'markdown', model: 'tiny', updated: 1,
            messages: [{role: 'user', content: 'show me'}, {role: 'assistant', content: arguments[0]}]}]));
        localStorage.setItem('ownlm.current', JSON.stringify('md'));""", MARKDOWN)
    open_page(browser, served.base, fresh=False)
    content = last_answer(browser).find_element("css selector", ".content")
    q = lambda sel: content.find_elements("css selector", sel)  # noqa: E731
    code = q("pre > code")
    assert len(code) == 1 and code[0].get_attribute("class") == "language-python"
    assert code[0].get_attribute("textContent") == "def add(a, b):\n    return a + b  # <script>alert(1)</script>"
    assert [e.text for e in q("strong")] == ["bold"] and [e.text for e in q("em")] == ["italic"]
    assert [e.text for e in q("p > code")] == ["inline code"]
    assert [e.text for e in q("ul > li")] == ["one", "two"] and [e.text for e in q("ol > li")] == ["first", "second"]
    links = q("a")
    assert len(links) == 1 and links[0].get_attribute("href") == "https://example.org/a?b=1&c=2"
    assert links[0].get_attribute("rel") == "noopener noreferrer"
    assert "[bad link](javascript:alert(1))" in content.text
    assert not q("img") and not q("b") and not q("script")
    assert '<img src=x onerror="window.pwned = 1">' in content.text
    assert browser.execute_script("return window.pwned === undefined")


def test_a_message_nested_past_the_stack_does_not_stop_the_page(browser, served):
    """A line of 5,000 ">" (each a quote inside the last) and one of 40,000 "[" in a stored answer:
    the page still loads its models, quotes nest 8 deep and the rest is text, and no script error."""
    deep, brackets = ">" * 5000 + " deep", "[" * 40000
    open_page(browser, served.base)
    browser.execute_script("""
        localStorage.setItem('ownlm.chats', JSON.stringify([{id: 'q', title: 'quotes', model: 'tiny', updated: 1,
            messages: [{role: 'user', content: 'x'},
                       {role: 'assistant', content: arguments[0] + '\\n\\n' + arguments[1]},
                       {role: 'assistant', content: ''}]}]));
        localStorage.setItem('ownlm.current', JSON.stringify('q'));""", deep, brackets)
    open_page(browser, served.base, fresh=False)
    assert "tiny" in " ".join(wait_models(browser))
    content = browser.find_elements("css selector", "#messages .message.assistant .content")[0]
    assert len(content.find_elements("css selector", "blockquote")) == 8
    text = content.get_attribute("textContent")
    assert ">" * (5000 - 8) + " deep" in text and brackets in text
    assert not js_errors(browser)
    # the stopped answer left empty is not sent as an assistant turn with the next message
    browser.execute_script("""
        const sent = [];
        const real = window.fetch;
        window.fetch = (url, init) => { if (String(url).includes('chat/completions')) sent.push(init.body);
                                        return real(url, init); };
        window.sentBodies = sent;""")
    settings(browser, temperature="0", max_tokens="2")
    send(browser, "again")
    wait_done(browser)
    (body,) = browser.execute_script("return window.sentBodies")
    assert [m["role"] for m in json.loads(body)["messages"]] == ["user", "assistant", "user"]


def test_a_key_protected_server_asks_for_the_key(browser, keyed):
    open_page(browser, keyed.base)
    panel = by_id(browser, "key-panel")
    wait(browser, lambda d: panel.is_displayed())
    assert "needs an API key" in panel.text and "session storage" in panel.text
    by_id(browser, "key").send_keys("wrong-key")
    by_id(browser, "key-submit").click()
    wait(browser, lambda d: "refused" in by_id(d, "key-reason").text and panel.is_displayed())
    by_id(browser, "key").send_keys(KEY)
    by_id(browser, "key-submit").click()
    assert wait_models(browser) == ["tiny"]
    assert not panel.is_displayed()
    assert browser.execute_script("return sessionStorage.getItem('ownlm.apiKey')") == KEY
    assert browser.execute_script("return localStorage.getItem('ownlm.apiKey')") is None  # not kept on disk
    settings(browser, temperature="0", max_tokens="6")
    send(browser, "Hello")
    answer = wait_done(browser)
    assert answer.get_attribute("data-finish") in ("length", "stop") and stored(browser)[0]["messages"][1]["content"]
