"""
The chat page (assets/chat.html) in a real browser: headless Chromium from Debian's packages driven by
selenium. A conversation three times longer than a small model's context goes on without an error (the
server fits it, the page says what it left out), Stop ends a reply mid-stream and the generation behind it,
an API error is shown as text, and the favicon is served. Skipped, with the reason, where Chromium or its
driver is missing (.ci/run installs both: apt-get install chromium chromium-driver).

LUMI_CHAT_SCREENSHOT=DIR keeps a screenshot of the page after each part, to look at.
"""
import os
import shutil
import threading
import time

import pytest

import checkpoint
import engine
from serve import Server
from tokenizer import render_chat

pytestmark = pytest.mark.slow
webdriver = pytest.importorskip('selenium.webdriver', reason='selenium is in requirements-test.txt')
CHROMIUM = shutil.which('chromium') or shutil.which('chromium-browser')
DRIVER = shutil.which('chromedriver')
if not (CHROMIUM and DRIVER):
    pytest.skip('Chromium or chromedriver is not installed (apt-get install chromium chromium-driver)',
                allow_module_level=True)


@pytest.fixture(scope='module')
def browser(tmp_path_factory):
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ('--headless=new', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
                '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage',
                '--window-size=900,1000', f'--user-data-dir={tmp_path_factory.mktemp("chromium")}'):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=DRIVER))
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


def serving(generate, tok, window, **options):
    srv = Server(generate, tok, window, engine.Sampling(max_new_tokens=16), 'lumi-test', port=0, quiet=True,
                 **options)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f'http://127.0.0.1:{srv.server_address[1]}/'


def stop_serving(srv):
    srv.shutdown()
    srv.server_close()


def wait_for(condition, seconds=60):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.05)
    return False


def say(driver, text, wait=True):
    """Type a message and send it with Enter; wait until its reply (or error) is shown and, if wait, has
    ended (the button says Send again)."""
    before = len(log(driver))
    driver.find_element('id', 'input').send_keys(text + '\n')
    assert wait_for(lambda: len(log(driver)) >= before + 2), 'the message was not sent'
    if wait:
        assert wait_for(lambda: driver.find_element('id', 'send').text == 'Send'), 'the reply never ended'


def log(driver):
    """(class, text) of each line of the conversation shown."""
    return driver.execute_script(
        "return [...document.querySelectorAll('#log p')].map(p => [p.className, p.textContent]);")


def snapshot(driver, name):
    folder = os.environ.get('LUMI_CHAT_SCREENSHOT')
    if folder:
        os.makedirs(folder, exist_ok=True)
        driver.save_screenshot(os.path.join(folder, f'{name}.png'))


def test_a_conversation_three_times_the_context_goes_on(browser, lively_checkpoint):
    model, tok, _ = checkpoint.load_model(lively_checkpoint)
    window = model.cfg.block_size  # 64 tokens

    def generate(prompts, params, chat, seed):
        return engine.stream_text(model, tok, prompts, params, chat, engine.make_generator(seed, 'cpu'))
    srv, url = serving(generate, tok, window)
    try:
        browser.get(url)
        assert browser.title == 'Lumi' and browser.find_element('id', 'name').text == 'lumi-test'
        max_tokens = browser.find_element('id', 'max')
        max_tokens.clear()
        max_tokens.send_keys('12')
        total = 0
        for turn in range(30):
            say(browser, f'Tell me about the fox, part {turn}.')
            shown = [(c, t) for c, t in log(browser) if c != 'note']
            assert not [t for c, t in shown if 'error' in c], shown
            messages = [{'role': 'user' if 'user' in c else 'assistant', 'content': t} for c, t in shown]
            total = len(render_chat(tok, messages, add_generation_prompt=False)[0])
            if total >= 3 * window and turn >= 3:
                break
        assert total >= 3 * window, total
        notes = [t for c, t in log(browser) if c == 'note']
        faded = [c for c, _ in log(browser) if c.endswith(' dropped')]  # shown faded, no longer sent
        assert len(notes) == 1 and notes[0].startswith(f"{len(faded)} earlier messages no longer fit the "
                                                        "model's context")
        assert faded and log(browser)[len(faded)][0] == 'note'  # above the first message still sent
        snapshot(browser, 'long-conversation')
        assert browser.execute_async_script(
            "fetch('/favicon.ico').then(r => arguments[0](r.status + ' ' + r.headers.get('Content-Type')));"
        ) == '200 image/x-icon'
    finally:
        stop_serving(srv)


def test_stop_ends_the_reply_and_the_generation_and_errors_show_as_text(browser, tokenizer):
    made = []

    def generate(prompts, params, chat, seed):  # a slow reply that would go on for minutes
        for i in range(100_000):
            made.append(i)
            time.sleep(0.02)
            yield 0, f'word{i} ', None, i + 1
    srv, url = serving(generate, tokenizer, 4096, api_key='s3cret', max_tokens_limit=100_000)
    try:
        browser.get(url)
        say(browser, 'hello')  # no key yet
        assert log(browser)[-1] == ['error', "error: You didn't provide an API key: send 'Authorization: "
                                             "Bearer KEY' (the key goes under API key, below)"]
        snapshot(browser, 'api-error')
        browser.find_element('id', 'key').send_keys('s3cret')
        max_tokens = browser.find_element('id', 'max')
        max_tokens.clear()
        max_tokens.send_keys('100000')
        say(browser, 'tell me a long story', wait=False)
        assert wait_for(lambda: 'word5 ' in log(browser)[-1][1])
        button = browser.find_element('id', 'send')
        assert button.text == 'Stop'
        button.click()
        assert wait_for(lambda: browser.find_element('id', 'send').text == 'Send')
        assert log(browser)[-1][1].endswith(' [stopped]')
        assert wait_for(lambda: not srv.turns.busy(), 10)  # the server stopped generating
        stopped_at = len(made)
        time.sleep(0.5)
        assert len(made) == stopped_at < 100_000
        snapshot(browser, 'stopped')
        say(browser, 'and now?', wait=False)  # the conversation goes on after a stop
        assert wait_for(lambda: 'word' in log(browser)[-1][1])
        browser.find_element('id', 'send').click()
        assert wait_for(lambda: browser.find_element('id', 'send').text == 'Send')
    finally:
        stop_serving(srv)
