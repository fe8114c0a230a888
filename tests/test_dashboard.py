"""The pictures of a job (API routes) and the dashboard: its pages with a test client, then in
a real headless browser (Debian's chromium, driven by selenium through chromedriver)."""

from __future__ import annotations

import secrets
import shutil
import threading

import httpx
import pytest
from conftest_service import dataset, job_body, make_settings, served_in_thread, upload

from service.api.auth import create_tenant

PNG = b"\x89PNG\r\n\x1a\n"


def sign_in(client, headers) -> None:
    key = headers["Authorization"].removeprefix("Bearer ")
    response = client.post("/ui/login", data={"key": key}, follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/ui/"


def progress_event(app, job_id: str, step: int, loss: float) -> None:
    """A running job's progress, as its worker records it."""
    from service.jobs import states
    from service.models import Job

    with app.state.db.session() as session:
        if session.get(Job, job_id).status == "queued":
            states.claim(session, job_id, "test-worker")
        job = session.get(Job, job_id, populate_existing=True)
        values = dict(step=step, total_steps=10, loss=loss)
        assert states.touch_running(session, job, job.attempt, ("progress", values), **values)


def test_pictures_of_a_running_job_and_their_errors(client, new_tenant, app):
    headers, other = new_tenant(), new_tenant()
    file_id = upload(client, headers, dataset()).json()["id"]
    job_id = client.post("/v1/jobs", headers=headers, json=job_body(file_id)).json()["id"]

    missing = client.get(f"/v1/jobs/{job_id}/plots/loss.png", headers=headers)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_available"
    for step, loss in [(1, 3.0), (2, 2.5), (3, 2.1)]:
        progress_event(app, job_id, step, loss)

    png = client.get(f"/v1/jobs/{job_id}/plots/loss.png", headers=headers)
    assert png.status_code == 200 and png.headers["content-type"] == "image/png" and png.content.startswith(PNG)
    svg = client.get(f"/v1/jobs/{job_id}/plots/loss.svg", headers=headers)
    assert svg.headers["content-type"] == "image/svg+xml" and b"<svg" in svg.content
    assert client.get(f"/v1/jobs/{job_id}/plots/loss.svg", headers=headers).content == svg.content, "same data, same bytes"

    # No adapter and no routing before the job ends; unknown pictures name the known ones.
    for picture in ("head_similarity.png", "routing.svg"):
        error = client.get(f"/v1/jobs/{job_id}/plots/{picture}", headers=headers).json()["error"]
        assert error["code"] == "not_available"
    error = client.get(f"/v1/jobs/{job_id}/plots/loss.gif", headers=headers).json()["error"]
    assert error["code"] == "not_found" and "loss.png" in error["message"]
    # Another tenant's job is a 404, as everywhere; no key is a 401.
    assert client.get(f"/v1/jobs/{job_id}/plots/loss.png", headers=other).json()["error"]["code"] == "not_found"
    assert client.get(f"/v1/jobs/{job_id}/plots/loss.png").status_code == 401


def test_dashboard_pages_show_the_signed_in_tenants_jobs_only(client, new_tenant, app):
    headers, other = new_tenant("mine"), new_tenant("theirs")
    mine = client.post("/v1/jobs", headers=headers, json=job_body(upload(client, headers, dataset()).json()["id"])).json()["id"]
    theirs = client.post("/v1/jobs", headers=other, json=job_body(upload(client, other, dataset()).json()["id"])).json()["id"]
    progress_event(app, mine, 4, 1.5)
    client.cookies.clear()

    assert client.get("/", follow_redirects=False).headers["location"] == "/ui/"
    page = client.get("/ui/")
    assert page.status_code == 200 and 'name="key"' in page.text and mine not in page.text
    assert client.get(f"/ui/jobs/{mine}/plots/loss.png").status_code == 401

    refused = client.post("/ui/login", data={"key": "rlk_not-a-key"})
    assert refused.status_code == 401 and "does not work" in refused.text
    sign_in(client, headers)
    cookie = next(c for c in client.cookies.jar if c.name == "rlora_key")
    assert cookie.path == "/ui" and cookie.has_nonstandard_attr("HttpOnly")

    page = client.get("/ui/")
    assert mine in page.text and theirs not in page.text
    assert client.get("/ui/", params={"after": "job\x00"}).status_code == 200
    assert "default-src 'none'" in page.headers["content-security-policy"]
    job_page = client.get(f"/ui/jobs/{mine}")
    assert job_page.status_code == 200 and "step 4/10" in job_page.text and f"/ui/jobs/{mine}/plots/loss.png" in job_page.text
    assert client.get(f"/ui/jobs/{mine}/plots/loss.png").content.startswith(PNG)
    assert client.get(f"/ui/jobs/{theirs}").status_code == 404
    assert client.get(f"/ui/jobs/{theirs}/plots/loss.png").status_code == 404

    # Another site's form cannot sign a browser in or out.
    assert client.post("/ui/logout", headers={"Origin": "https://evil.example"}).status_code == 403
    assert client.post("/ui/logout", follow_redirects=False).status_code == 303
    assert 'name="key"' in client.get("/ui/").text


def _chromium_driver():
    """A headless chromium driven through Debian's chromedriver; skips where they are absent
    (``scripts/install-browser`` installs them, ``make test`` runs it)."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the dev extra has it)")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    chromedriver = shutil.which("chromedriver")
    if not chromium or not chromedriver:
        pytest.skip("chromium and chromedriver are not installed: run scripts/install-browser (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,1600"):
        options.add_argument(argument)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=chromedriver))


def _follow(driver, element) -> None:
    """Click a link or a form's button and wait for the next page: a click returns before the
    browser has navigated, and the old page's elements would be read."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.support.wait import WebDriverWait

    page = driver.find_element("tag name", "html")
    element.click()

    def old_page_gone(_) -> bool:
        # Selenium's staleness_of catches only StaleElementReferenceException; while the old
        # document is being torn down Chrome may answer "Node with given id does not belong
        # to the document" instead, which says the same.
        try:
            page.is_enabled()
        except WebDriverException:
            return True
        return False

    WebDriverWait(driver, 30).until(old_page_gone)
    WebDriverWait(driver, 30).until(lambda d: d.execute_script("return document.readyState") == "complete")


def test_the_dashboard_in_a_real_browser(service_settings, tmp_path_factory):
    from selenium.webdriver.common.by import By

    from service.api.app import create_app
    from worker.runner import run_next

    driver = _chromium_driver()
    settings = make_settings(tmp_path_factory.mktemp("dashboard-home"), service_settings.database, queue_prefix=f"d{secrets.token_hex(4)}")
    app = create_app(settings)
    try:
        with served_in_thread(app) as url:
            keys = {}
            with app.state.db.session() as session:
                for name in ("alice", "bob"):
                    _, keys[name] = create_tenant(session, f"{name}-{secrets.token_hex(4)}")
            jobs = {}
            for name, key in keys.items():
                headers = {"Authorization": f"Bearer {key}"}
                file_id = httpx.post(f"{url}/v1/files", headers=headers, files={"file": ("d.jsonl", dataset(16))}).json()["id"]
                body = job_body(file_id, max_steps=3, eval_max_examples=2)
                jobs[name] = httpx.post(f"{url}/v1/jobs", headers=headers, json=body).json()["id"]
            # Both jobs run to the end here, one after the other, on this process's worker.
            queue = f"{settings.queue_prefix}.cpu"
            for _ in jobs:
                assert run_next(settings, app.state.db, queue, "test-worker", threading.Event()) == "succeeded"

            driver.get(f"{url}/")
            driver.find_element(By.NAME, "key").send_keys(keys["alice"])
            _follow(driver, driver.find_element(By.CSS_SELECTOR, "form.login button"))
            rows = driver.find_elements(By.CSS_SELECTOR, "tr.job")
            assert [row.get_attribute("data-job-id") for row in rows] == [jobs["alice"]]
            assert "succeeded" in rows[0].text
            assert driver.execute_script("return document.cookie") == "", "the key is out of scripts' reach"

            _follow(driver, driver.find_element(By.LINK_TEXT, jobs["alice"]))
            assert driver.find_element(By.TAG_NAME, "h1").text == f"Job {jobs['alice']}"
            images = driver.find_elements(By.CSS_SELECTOR, "img.plot")
            assert {image.get_attribute("data-plot") for image in images} == {"loss", "head_similarity", "routing"}
            for image in images:
                loaded = driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image)
                assert loaded and loaded > 0, image.get_attribute("src")
            assert driver.find_elements(By.CSS_SELECTOR, "table.eval tbody tr")
            event_kinds = [row.find_elements(By.TAG_NAME, "td")[2].text for row in driver.find_elements(By.CSS_SELECTOR, "table.events tbody tr")]
            assert event_kinds[0] == "created" and event_kinds[-1] == "finished" and "phase" in event_kinds

            # Bob's job is not alice's to see, by link either.
            driver.get(f"{url}/ui/jobs/{jobs['bob']}")
            assert driver.find_element(By.TAG_NAME, "h1").text == f"No job {jobs['bob']}"
            driver.get(f"{url}/ui/")
            _follow(driver, driver.find_element(By.CSS_SELECTOR, "header form button"))
            assert driver.find_elements(By.NAME, "key"), "signed out"
    finally:
        driver.quit()
