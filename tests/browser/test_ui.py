"""The web UI in real headless Chromium, against the real app over a small real index.

Needs Debian's ``chromium`` (``/usr/bin/chromium``, or ``CLIPSEARCH_CHROMIUM``) and ``playwright`` from PyPI;
the browser that Playwright would download is never used. The tests assert on the DOM and the URL; the
screenshots they save under ``tmp_path`` are for people.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest

from app.config import Settings
from app.encoder import Encoder
from app.store import Store
from indexer import Indexer

CHROMIUM = Path(os.environ.get("CLIPSEARCH_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
]

if not CHROMIUM.exists():
    pytest.skip(
        f"browser tests need Chromium at {CHROMIUM} (apt-get install chromium, or set CLIPSEARCH_CHROMIUM)",
        allow_module_level=True,
    )
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="browser tests need playwright from PyPI (pip install playwright)"
)
uvicorn = pytest.importorskip("uvicorn")
expect = sync_api.expect

from app.api.main import create_app  # noqa: E402  (after the skips: nothing to import when they apply)

pytestmark = pytest.mark.slow

TIMEOUT_MS = 20_000
expect.set_options(timeout=TIMEOUT_MS)


# --- the app, served for real ----------------------------------------------------------------------


@contextmanager
def serve(app: Any) -> Iterator[str]:
    """Run an ASGI app under uvicorn in a background thread on a free local port; yield its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="uvicorn")
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the app stopped during startup (see the log above)")
        if time.monotonic() > deadline:
            raise TimeoutError("the app did not start within 120 s")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def build_index(settings: Settings, folder: Path) -> None:
    store = Store(settings.effective_database_url)
    try:
        Indexer(settings, store, Encoder.from_settings(settings), progress=False).run([folder])
    finally:
        store.close()


@pytest.fixture
def catalog(photos: list[Path]) -> Path:
    """24 real photos (tests.helpers.copy_photos via the `photos` fixture)."""
    return photos[0].parent


@pytest.fixture
def base_url(settings: Settings, catalog: Path) -> Iterator[str]:
    """The real app (create_app) over an index of the catalog, served on 127.0.0.1."""
    build_index(settings, catalog)
    with serve(create_app(settings)) as url:
        yield url


# --- the browser -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh page; any uncaught JavaScript error fails the test."""
    context = browser.new_context(viewport={"width": 1280, "height": 800}, color_scheme="light")
    # Every hit in one list (the relevance cut-off off), as these tests count and step through all of them;
    # the cut-off's divider has its own test with its own page (below).
    context.add_init_script("try { localStorage.setItem('clipsearch.cutoff', 'none') } catch {}")
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    js_errors: list[str] = []
    page.on("pageerror", lambda exc: js_errors.append(str(exc)))
    yield page
    context.close()
    assert not js_errors, f"JavaScript errors on the page: {js_errors}"


def url_params(page: Any) -> dict[str, list[str]]:
    return parse_qs(urlparse(page.url).query)


def tile_paths(page: Any) -> list[str]:
    return page.locator(".result .tile").evaluate_all("tiles => tiles.map(t => t.title)")


def result_ids(page: Any) -> list[int]:
    return [int(i) for i in page.locator(".result").evaluate_all("items => items.map(i => i.dataset.id)")]


def result_scores(page: Any) -> list[float]:
    return [float(s) for s in page.locator(".result").evaluate_all("items => items.map(i => i.dataset.score)")]


def wait_for_results(page: Any, count: int | None = None) -> None:
    expect(page.locator("#status")).to_have_attribute("data-state", "results")
    if count is not None:
        expect(page.locator(".result")).to_have_count(count)


def file_payload(path: Path, mime: str = "image/jpeg") -> dict[str, str]:
    return {"b64": base64.b64encode(path.read_bytes()).decode(), "name": path.name, "type": mime}


# JavaScript that builds a DataTransfer holding one file (bytes passed in as base64), as a real drop has.
MAKE_TRANSFER = """({b64, name, type}) => {
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    const transfer = new DataTransfer();
    transfer.items.add(new File([bytes], name, {type}));
    return transfer;
}"""


def drop_file(page: Any, path: Path, mime: str = "image/jpeg") -> None:
    """Drag a file over the page (the drop zone must appear), then drop it."""
    transfer = page.evaluate_handle(MAKE_TRANSFER, file_payload(path, mime))
    page.dispatch_event("main", "dragenter", {"dataTransfer": transfer})
    page.dispatch_event("main", "dragover", {"dataTransfer": transfer})
    expect(page.locator("#dropzone")).to_be_visible()
    page.dispatch_event("#dropzone", "drop", {"dataTransfer": transfer})


def paste_file(page: Any, path: Path) -> None:
    page.evaluate(
        f"""(payload) => {{
            const transfer = ({MAKE_TRANSFER})(payload);
            document.body.dispatchEvent(
                new ClipboardEvent("paste", {{clipboardData: transfer, bubbles: true, cancelable: true}}));
        }}""",
        file_payload(path),
    )


# --- the tests -------------------------------------------------------------------------------------


def test_typing_shows_thumbnails_and_the_large_view_leads_to_more_like_this(
    base_url: str, page: Any, catalog: Path, tmp_path: Path
) -> None:
    search_requests: list[str] = []
    page.on("request", lambda r: search_requests.append(r.url) if urlparse(r.url).path == "/search" else None)
    page.goto(base_url + "/")
    expect(page.locator("#status")).to_have_attribute("data-state", "idle")
    expect(page.locator("#search")).to_be_focused()

    page.locator("#search").press_sequentially("a plate of food", delay=40)
    wait_for_results(page, 24)
    # Debounced: one request for the whole phrase, not one per keystroke.
    assert 1 <= len(search_requests) <= 3, search_requests
    assert parse_qs(urlparse(search_requests[-1]).query)["q"] == ["a plate of food"]
    assert url_params(page) == {"q": ["a plate of food"]}
    expect(page.locator("#status")).to_contain_text("24 images for “a plate of food”")
    scores = result_scores(page)
    assert scores == sorted(scores, reverse=True)
    assert {Path(p).name for p in tile_paths(page)} == {p.name for p in catalog.iterdir()}
    page.wait_for_function(
        "() => [...document.querySelectorAll('.result img')].slice(0, 6)"
        ".every((img) => img.complete && img.naturalWidth > 0)"
    )
    expect(page.locator(".result img").first).to_have_attribute("loading", "lazy")
    page.locator(".result").nth(1).hover()
    expect(page.locator(".result").nth(1).locator(".score")).to_be_visible()
    page.screenshot(path=str(tmp_path / "results.png"))

    paths = tile_paths(page)
    page.locator(".result .tile").nth(2).click()
    viewer = page.locator("#viewer")
    expect(viewer).to_be_visible()
    expect(page.locator("#viewer-path")).to_have_text(paths[2])
    expect(page.locator("#viewer-dims")).to_have_text(re.compile(r"^\d+ × \d+ px$"))
    expect(page.locator("#viewer-score")).to_have_text(f"{scores[2]:.3f}")
    page.wait_for_function(
        "() => { const img = document.querySelector('#viewer-image');"
        " return img.complete && img.naturalWidth > 0 && img.src.endsWith('/images/' + "
        "document.querySelector('#viewer').dataset.id); }"
    )
    page.screenshot(path=str(tmp_path / "viewer.png"))
    page.keyboard.press("ArrowRight")
    expect(page.locator("#viewer-path")).to_have_text(paths[3])
    page.locator("#viewer-prev").click()
    expect(page.locator("#viewer-path")).to_have_text(paths[2])

    source_id = result_ids(page)[2]
    page.locator("#more-like-this").click()
    expect(viewer).to_be_hidden()
    expect(page).to_have_url(f"{base_url}/?similar={source_id}")
    wait_for_results(page, 23)
    assert source_id not in result_ids(page)
    expect(page.locator("#query-chip")).to_be_visible()
    expect(page.locator("#query-chip")).to_contain_text(Path(paths[2]).name)
    expect(page.locator("#search")).to_have_value("")
    page.screenshot(path=str(tmp_path / "similar.png"))

    page.go_back()
    expect(page.locator("#search")).to_have_value("a plate of food")
    wait_for_results(page, 24)
    assert url_params(page) == {"q": ["a plate of food"]}
    page.go_forward()
    wait_for_results(page, 23)
    assert url_params(page) == {"similar": [str(source_id)]}

    # Words typed next to a "more like this" image refine it (text + image arithmetic; "-" negates a word).
    with page.expect_request(lambda r: urlparse(r.url).path == "/search") as refined:
        page.locator("#search").fill("at night -people")
    assert parse_qs(urlparse(refined.value.url).query) | {"k": [], "offset": []} == {
        "q": ["at night", "-people"],
        "image_id": [str(source_id)],
        "safe": ["true"],  # safe search is on by default in the UI
        "k": [],
        "offset": [],
    }
    wait_for_results(page)
    assert source_id not in result_ids(page)
    assert url_params(page) == {"q": ["at night -people"], "similar": [str(source_id)]}
    page.locator("#query-chip-clear").click()
    expect(page.locator("#query-chip")).to_be_hidden()
    wait_for_results(page, 24)
    assert url_params(page) == {"q": ["at night -people"]}
    assert all((tmp_path / name).stat().st_size > 0 for name in ("results.png", "viewer.png", "similar.png"))


def test_picking_dropping_or_pasting_an_image_searches_by_that_image(
    base_url: str, page: Any, catalog: Path, tmp_path: Path
) -> None:
    photos = sorted(catalog.iterdir())
    page.goto(base_url + "/?q=street")
    wait_for_results(page, 24)

    def image_search(action: Any, photo: Path) -> None:
        with page.expect_response(lambda r: urlparse(r.url).path == "/search/image") as response:
            action()
        assert response.value.status == 200, response.value.text()
        assert response.value.request.method == "POST"
        wait_for_results(page, 24)
        # A photo from the catalog is its own best match.
        assert Path(tile_paths(page)[0]).name == photo.name
        expect(page.locator("#query-chip")).to_contain_text(photo.name)
        assert url_params(page) == {}
        expect(page.locator("#search")).to_have_value("")

    image_search(lambda: page.set_input_files("#file-input", photos[5]), photos[5])
    image_search(lambda: drop_file(page, photos[9]), photos[9])
    expect(page.locator("#dropzone")).to_be_hidden()
    expect(page.locator(".result.loaded")).to_have_count(24)  # every thumbnail arrived
    page.screenshot(path=str(tmp_path / "dropped.png"))
    image_search(lambda: paste_file(page, photos[13]), photos[13])

    # Back and forward walk through the image searches, then to the text search before them.
    page.go_back()
    wait_for_results(page, 24)
    assert Path(tile_paths(page)[0]).name == photos[9].name
    page.go_back()
    page.go_back()
    expect(page.locator("#search")).to_have_value("street")
    wait_for_results(page, 24)

    # A file that is not an image: the API's own message is shown.
    not_an_image = tmp_path / "notes.txt"
    not_an_image.write_text("this is not a picture\n")
    with page.expect_response(lambda r: urlparse(r.url).path == "/search/image") as response:
        drop_file(page, not_an_image, mime="text/plain")
    assert response.value.status == 415
    detail = response.value.json()["detail"]
    expect(page.locator("#status")).to_have_attribute("data-state", "error")
    expect(page.locator("#status .status-title")).to_have_text(detail)
    expect(page.locator(".result")).to_have_count(0)


def test_infinite_scroll_pages_through_all_results_without_duplicates(base_url: str, page: Any) -> None:
    requests: list[dict[str, list[str]]] = []
    page.on("request", lambda r: requests.append(parse_qs(urlparse(r.url).query)) if "/search?" in r.url else None)
    page.goto(base_url + "/?q=animals&k=8")
    wait_for_results(page)
    page.mouse.wheel(0, 5000)
    expect(page.locator(".result")).to_have_count(24)
    page.wait_for_timeout(300)  # a further (wrong) page request would show up here
    assert [r["offset"] for r in requests] == [["0"], ["8"], ["16"]]
    assert all(r["k"] == ["8"] for r in requests)
    ids = result_ids(page)
    assert len(set(ids)) == 24
    scores = result_scores(page)
    assert scores == sorted(scores, reverse=True)
    assert url_params(page) == {"q": ["animals"], "k": ["8"]}


def test_min_score_filters_results_and_an_empty_result_says_so(base_url: str, page: Any) -> None:
    page.goto(base_url + "/?q=animals")
    wait_for_results(page, 24)
    source = result_ids(page)[0]

    # A shared link with a cut-off nothing reaches: the empty state explains it and offers a way out.
    with page.expect_request(lambda r: urlparse(r.url).path == "/search") as request:
        page.goto(base_url + "/?q=animals&min_score=0.99")
    assert parse_qs(urlparse(request.value.url).query)["min_score"] == ["0.99"]
    expect(page.locator("#status")).to_have_attribute("data-state", "empty")
    expect(page.locator("#status")).to_contain_text("No images match “animals” with a score of at least 0.99")
    expect(page.locator(".result")).to_have_count(0)
    expect(page.locator("#min-score")).to_have_value("0.99")
    expect(page.locator("#min-score-value")).to_have_text("0.99")
    page.locator("#reset-min-score").click()
    wait_for_results(page, 24)
    assert url_params(page) == {"q": ["animals"]}

    # The slider cuts a "more like this" list at a score picked from the middle of it.
    page.goto(f"{base_url}/?similar={source}")
    wait_for_results(page, 23)
    scores = result_scores(page)
    cut = round(scores[len(scores) // 2], 2)
    page.locator("#min-score").fill(f"{cut:.2f}")
    expect(page).to_have_url(f"{base_url}/?similar={source}&min_score={cut:.2f}")
    expect(page.locator(".result")).to_have_count(sum(s >= cut for s in scores))
    assert all(s >= cut for s in result_scores(page))


def test_keyboard_moves_through_the_grid_and_the_large_view(base_url: str, page: Any) -> None:
    page.goto(base_url + "/?q=people")
    wait_for_results(page, 24)
    paths = tile_paths(page)
    page.locator("footer").click()
    page.keyboard.press("/")
    expect(page.locator("#search")).to_be_focused()

    def focused_index() -> int:
        return int(page.evaluate("() => document.activeElement.closest('.result')?.dataset.index ?? -1"))

    page.keyboard.press("ArrowDown")
    assert focused_index() == 0
    page.keyboard.press("ArrowRight")
    assert focused_index() == 1
    columns = int(page.evaluate("() => getComputedStyle(document.querySelector('#results'))"
                                ".gridTemplateColumns.split(' ').length"))  # fmt: skip
    page.keyboard.press("ArrowDown")
    assert focused_index() == 1 + columns
    page.keyboard.press("Enter")
    expect(page.locator("#viewer")).to_be_visible()
    expect(page.locator("#viewer-path")).to_have_text(paths[1 + columns])
    page.keyboard.press("ArrowRight")
    expect(page.locator("#viewer-path")).to_have_text(paths[2 + columns])
    page.keyboard.press("Escape")
    expect(page.locator("#viewer")).to_be_hidden()
    expect(page.locator(".result .tile").nth(2 + columns)).to_be_focused()  # the image last shown
    page.keyboard.press("ArrowUp")
    assert focused_index() == 2
    page.keyboard.press("ArrowUp")
    expect(page.locator("#search")).to_be_focused()


def test_api_errors_and_an_unready_index_are_explained(
    base_url: str, page: Any, settings: Settings, catalog: Path, tmp_path: Path
) -> None:
    with page.expect_response(lambda r: urlparse(r.url).path == "/similar/999999") as response:
        page.goto(base_url + "/?similar=999999")
    assert response.value.status == 404
    expect(page.locator("#status")).to_have_attribute("data-state", "error")
    expect(page.locator("#status .status-title")).to_have_text(response.value.json()["detail"])
    expect(page.locator("#ready-banner")).to_be_hidden()
    expect(page.locator("#index-info")).to_contain_text("24 images indexed")

    # The same configuration before anything was indexed: /readyz answers 503 and the page says why.
    fresh = settings.with_overrides(data_dir=tmp_path / "empty-data")
    with serve(create_app(fresh)) as empty_url:
        with page.expect_response(lambda r: urlparse(r.url).path == "/readyz") as ready:
            page.goto(empty_url + "/?q=dog")
        assert ready.value.status == 503
        expect(page.locator("#ready-banner")).to_be_visible()
        expect(page.locator("#ready-banner")).to_contain_text(ready.value.json()["detail"])
        expect(page.locator("#status")).to_have_attribute("data-state", "error")
        expect(page.locator("#status")).to_contain_text("Search is not ready yet")
        page.screenshot(path=str(tmp_path / "not-ready.png"))

        # Once the indexer has written an index, the page notices by itself and runs the search.
        build_index(fresh, catalog)
        expect(page.locator("#ready-banner")).to_be_hidden()
        wait_for_results(page, 24)
    shutil.rmtree(tmp_path / "empty-data", ignore_errors=True)


# --- tags and safe search --------------------------------------------------------------------------


@pytest.fixture
def tagged_url(tmp_path: Path, shared_data: Path, instrument_model_dir: Path) -> Iterator[str]:
    """18 Caltech-101 photos (six classes) indexed with the trained instrument model, tagged with their class
    names; the revolver photos carry the flag "weapons"."""
    from tests.helpers import CALTECH_TAG_VOCABULARY, WEAPON_FLAG_VOCABULARY, copy_caltech

    copy_caltech(tmp_path / "caltech")
    (tmp_path / "tags.yaml").write_text(CALTECH_TAG_VOCABULARY)
    (tmp_path / "flags.yaml").write_text(WEAPON_FLAG_VOCABULARY)
    settings = Settings(
        data_dir=tmp_path / "data",
        model=f"local-dir:{instrument_model_dir}",
        device="cpu",
        decode_workers=2,
        tag_vocabulary=str(tmp_path / "tags.yaml"),
        safe_search_vocabulary=str(tmp_path / "flags.yaml"),
    )
    build_index(settings, tmp_path / "caltech")
    with serve(create_app(settings)) as url:
        yield url


def tile_names(page: Any) -> list[str]:
    return [Path(p).name for p in tile_paths(page)]


def test_facet_chips_filter_by_tag_and_safe_search_hides_flagged_images(
    tagged_url: str, page: Any, tmp_path: Path
) -> None:
    page.goto(tagged_url + "/?q=a photo of an animal")
    # Safe search is on by default: the three revolver photos (flagged "weapons") are hidden.
    expect(page.locator("#safe-search")).to_be_checked()
    wait_for_results(page, 15)
    assert not any(name.startswith("revolver_") for name in tile_names(page))
    chips = page.locator("#facets .facet")
    expect(chips).to_have_count(5)
    leopard = page.locator('#facets .facet[data-tag="leopard"]')
    expect(leopard).to_have_attribute("aria-pressed", "false")
    expect(leopard.locator(".facet-count")).to_have_text("3")
    page.screenshot(path=str(tmp_path / "facets.png"))

    leopard.click()
    wait_for_results(page, 3)
    assert all(name.startswith("leopards_") for name in tile_names(page))
    assert url_params(page) == {"q": ["a photo of an animal"], "tag": ["leopard"]}
    expect(leopard).to_have_attribute("aria-pressed", "true")
    expect(page.locator("#status")).to_contain_text("3 images for “a photo of an animal” tagged “leopard”")

    # The large view lists the image's tags with their scores.
    page.locator(".result .tile").first.click()
    expect(page.locator("#viewer")).to_be_visible()
    expect(page.locator("#viewer-tags")).to_contain_text(re.compile(r"leopard \d\.\d\d"))
    expect(page.locator("#viewer-flags li")).to_have_count(0)
    page.keyboard.press("Escape")

    # The chip again removes the filter; the URL follows, and back returns to the filtered grid.
    page.locator('#facets .facet[data-tag="leopard"]').click()
    wait_for_results(page, 15)
    assert url_params(page) == {"q": ["a photo of an animal"]}
    page.go_back()
    wait_for_results(page, 3)
    assert url_params(page)["tag"] == ["leopard"]

    # Safe search off: the flagged photos come back; the choice is in the URL and remembered.
    page.goto(tagged_url + "/?q=a photo of a revolver")
    wait_for_results(page, 15)
    with page.expect_request(lambda r: urlparse(r.url).path == "/search") as request:
        page.locator("#safe-search").uncheck()
    assert "safe" not in parse_qs(urlparse(request.value.url).query)
    wait_for_results(page, 18)
    assert url_params(page) == {"q": ["a photo of a revolver"], "safe": ["off"]}
    revolver = next(i for i, name in enumerate(tile_names(page)) if name.startswith("revolver_"))
    page.locator(".result .tile").nth(revolver).click()
    expect(page.locator("#viewer-flags")).to_contain_text(re.compile(r"weapons \d\.\d\d"))
    expect(page.locator("#viewer-tags")).to_contain_text("revolver")
    page.screenshot(path=str(tmp_path / "flagged.png"))
    page.keyboard.press("Escape")

    page.goto(tagged_url + "/?q=a photo of a revolver")  # no safe= in the link: the stored choice applies
    expect(page.locator("#safe-search")).not_to_be_checked()
    wait_for_results(page, 18)
    page.locator("#safe-search").check()
    wait_for_results(page, 15)
    assert url_params(page) == {"q": ["a photo of a revolver"]}
    assert page.evaluate("() => localStorage.getItem('clipsearch.safeSearch')") == "on"


# --- the relevance cut-off -------------------------------------------------------------------------


def test_less_relevant_results_wait_behind_a_divider_until_asked_for(tagged_url: str, browser: Any) -> None:
    """The UI asks for cutoff=auto: the hits that pass come first, the weaker ones are folded behind
    "Show less relevant (N)", and the button unfolds them."""
    context = browser.new_context(viewport={"width": 1280, "height": 800}, color_scheme="light")
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    js_errors: list[str] = []
    page.on("pageerror", lambda exc: js_errors.append(str(exc)))
    try:
        query = "a photo of a sunflower"
        with page.expect_request(lambda r: urlparse(r.url).path == "/search") as request:
            page.goto(f"{tagged_url}/?q={query}")
        sent = parse_qs(urlparse(request.value.url).query)
        assert sent["cutoff"] == ["auto"]
        wait_for_results(page)
        api = page.request.get(
            f"{tagged_url}/search", params={"q": query, "cutoff": "auto", "safe": "true", "k": "100"}
        ).json()
        relevant = [Path(h["path"]).name for h in api["hits"] if h["relevant"]]
        weaker = api["total"] - api["relevant_total"]
        assert relevant and weaker > 0, api

        toggle = page.locator("[data-testid=weaker-divider] button")
        expect(toggle).to_have_text(f"Show less relevant ({weaker})")
        shown = page.locator(".result:visible")
        expect(shown).to_have_count(len(relevant))
        names = shown.locator(".tile").evaluate_all("tiles => tiles.map(t => t.title.split('/').pop())")
        assert names == relevant
        assert names[0].startswith("sunflower_")
        expect(page.locator("#status")).to_contain_text(f"{weaker} less relevant")

        toggle.click()
        expect(shown).to_have_count(api["total"])
        expect(toggle).to_have_text("Less relevant")
        expect(toggle).to_be_disabled()
        scores = result_scores(page)
        assert scores == sorted(scores, reverse=True)
        assert all(s < api["cutoff"] for s in scores[len(relevant) :])
    finally:
        context.close()
    assert not js_errors, f"JavaScript errors on the page: {js_errors}"


def test_find_copies_shows_the_verdict_and_the_matched_region_on_both_images(
    base_url: str, page: Any, catalog: Path, tmp_path: Path
) -> None:
    from PIL import Image

    photos = sorted(catalog.iterdir())
    with Image.open(photos[4]) as opened:
        image = opened.convert("RGB")
    width, height = image.size
    crop = tmp_path / "found-online.jpg"
    image.crop((width * 15 // 100, height * 15 // 100, width * 85 // 100, height * 85 // 100)).save(crop, quality=80)

    page.goto(base_url + "/")
    page.click("#find-copies")
    expect(page.locator("#copies")).to_be_visible()
    with page.expect_response(lambda r: urlparse(r.url).path == "/lookup") as response:
        page.set_input_files("#copies-file", crop)
    assert response.value.status == 200, response.value.text()
    answer = response.value.json()
    expect(page.locator("#copies-status")).to_have_attribute("data-state", "done")
    expect(page.locator("#copies-status .verdict-badge")).to_have_attribute("data-verdict", "near_duplicate")
    first = page.locator(".copy-match").first
    expect(first).to_have_attribute("data-id", str(answer["matches"][0]["id"]))
    assert Path(answer["matches"][0]["path"]).name == photos[4].name
    expect(first.locator(".verdict-badge")).to_have_text("Edited copy")
    expect(first.locator("[data-testid=copy-evidence]")).to_contain_text("inliers")
    # The matched region, drawn over both images: on the original it is the middle ~70 % that was cropped.
    expect(first.locator(".match-box")).to_have_count(2)
    box = first.locator(".boxed").nth(1).locator(".match-box")
    left = float(box.evaluate("b => parseFloat(b.style.left)"))
    box_width = float(box.evaluate("b => parseFloat(b.style.width)"))
    assert abs(left - 15) < 5 and abs(box_width - 70) < 8
    page.screenshot(path=str(tmp_path / "copies.png"))

    # A non-image: the API's message, and the search results underneath are left alone.
    not_an_image = tmp_path / "notes.txt"
    not_an_image.write_text("not a picture\n")
    with page.expect_response(lambda r: urlparse(r.url).path == "/lookup") as response:
        page.set_input_files("#copies-file", not_an_image)
    assert response.value.status == 415
    expect(page.locator("#copies-status")).to_have_attribute("data-state", "error")
    expect(page.locator("#copies-status")).to_have_text(response.value.json()["detail"])
    page.click("#copies-close")
    expect(page.locator("#copies")).to_be_hidden()
