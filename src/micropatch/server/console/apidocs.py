"""/docs: the API's interactive documentation (Swagger UI) served from this package,
not from a CDN, so it works on a network without internet. The two files are
swagger-ui-dist 5.36.0 from the npm registry, unmodified (Apache-2.0: LICENSE, NOTICE
and the bundle's third-party notices beside them in static/swagger/)."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse

from micropatch.server.console.pages import PREFIX

ASSETS = f"{PREFIX}/static/swagger"


def mount_docs(app: FastAPI) -> None:
    """Serve /docs with the vendored assets (the app is made with docs_url=None)."""

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} · API",
            swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS}/swagger-ui.css",
            swagger_favicon_url="data:,",
        )
