"""What someone who opens the server's address in a browser gets: the console (its
login page when not logged in), and the interactive API documentation at /docs."""

from __future__ import annotations

from .conftest import Api


def test_root_leads_to_the_console(api: Api) -> None:
    r = api.client.get("/", follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"] == "/console/"
    page = api.client.get("/")  # then on to the login page, as a browser goes
    assert page.status_code == 200, page.text
    assert page.headers["content-type"].startswith("text/html")
    assert str(page.url).split("?")[0].endswith("/console/login")


def test_docs_answer_html(api: Api) -> None:
    r = api.client.get("/docs")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
