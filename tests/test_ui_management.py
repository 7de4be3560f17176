"""The RabbitMQ management UI of the compose stack, in a real headless browser.

Debian's Chromium and its chromedriver (/usr/bin, installed by scripts/ensure-test-deps) driven
through Selenium: the compose admin logs in with the password the stack generated, opens the
smartgrid vhost's queues page, and sees the pending queue, the dead letters and the queue of
each substation. The page is saved as a screenshot; with SMARTGRID_UPDATE_SCREENSHOTS=1 it
replaces docs/management-ui-queues.png, the one the README shows.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from smartgrid import contract
from tests.compose_stack import Stack
from tests.docker_engine import ROOT

if TYPE_CHECKING:  # selenium is imported by the fixture, once the browser is known to be there
    from selenium.webdriver.chrome.webdriver import WebDriver

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(600)]

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOT = ROOT / "docs" / "management-ui-queues.png"
#: No GPU, no sandbox (root in a container-like machine), and no calls home: this machine
#: refuses every connection beyond its own, and Chromium would retry them at every start.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
    "--window-size=1400,1000",
)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        reason = f"{', '.join(missing)} missing: run sudo scripts/ensure-test-deps"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI skips nothing: {reason}")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = str(CHROMIUM)
    for flag in (*FLAGS, f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    # The driver is given: Selenium Manager must not look for (or download) one.
    os.environ.setdefault("SE_OFFLINE", "true")
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def test_the_admin_sees_every_queue_of_the_smartgrid_vhost(compose_stack: Stack, browser, tmp_path):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import Select, WebDriverWait

    stack = compose_stack
    stack.up()  # already up after test_compose.py; brought up when this test runs alone
    password = stack.secret("rabbitmq-admin-password")
    substations = ["substation-1", "substation-2", "substation-3"]
    # The UI redraws its tables every few seconds: an element found a moment ago may be gone.
    wait = WebDriverWait(browser, 60, ignored_exceptions=(StaleElementReferenceException,))

    browser.get(stack.url("RABBITMQ_UI_HOST_PORT", "/"))
    wait.until(ready.visibility_of_element_located((By.NAME, "username"))).send_keys("admin")
    browser.find_element(By.NAME, "password").send_keys(password)
    browser.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
    wait.until(ready.visibility_of_element_located((By.ID, "logout")))

    browser.get(stack.url("RABBITMQ_UI_HOST_PORT", "/#/queues"))
    vhost = wait.until(ready.element_to_be_clickable((By.ID, "show-vhost")))
    Select(vhost).select_by_value("smartgrid")
    expected = [
        contract.PENDING_QUEUE,
        contract.DEAD_LETTER_QUEUE,
        *(contract.substation_queue_name(s) for s in substations),
    ]

    def listed(driver) -> set[str]:
        names = {a.text for a in driver.find_elements(By.CSS_SELECTOR, "#main table.list td a")}
        return names if set(expected) <= names else set()

    names = wait.until(listed)
    assert browser.find_element(By.ID, "logout").is_displayed()  # still logged in as admin
    assert "admin" in browser.find_element(By.ID, "header").text

    shot = tmp_path / SCREENSHOT.name
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("SMARTGRID_UPDATE_SCREENSHOTS") == "1":
        shutil.copyfile(shot, SCREENSHOT)
    print(f"queues listed: {sorted(names)}; screenshot {shot}")
