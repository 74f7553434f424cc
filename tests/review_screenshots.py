"""Screenshots of `tuneline review serve` for the README, taken in Debian's headless Chromium over
the repository's own expert data (questions, corrections, imports) and its committed reports:

    python -m tests.review_screenshots docs/
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

from tests.browser import chromium
from tests.review_project import REPO, curate_now, served


def project(root: Path) -> Path:
    shutil.copytree(REPO / "data", root / "data", ignore=shutil.ignore_patterns("dataset"))
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    (root / "reports").mkdir()
    for name in ("validation.json", "eval.json"):
        shutil.copy(REPO / "reports" / name, root / "reports" / name)
    curate_now(root)
    return root


def settle(driver) -> None:
    time.sleep(0.8)  # the debounced search and the fetch after it


def main(out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = project(Path(tmp) / "proj")
        with served(root) as url, chromium(Path(tmp), width=1100, height=820) as driver:
            driver.get(url + "/")
            settle(driver)
            answer = driver.find_elements(By.CSS_SELECTOR, "#rows .f-answer")[1]
            answer.send_keys(" Edited in the browser.")
            review = driver.find_elements(By.CSS_SELECTOR, "#rows button.review")[0]
            driver.execute_script("arguments[0].click(); window.scrollTo(0, 0)", review)
            driver.save_screenshot(str(out / "review-serve.png"))
            Select(driver.find_element(By.ID, "f-split")).select_by_value("test")
            settle(driver)
            driver.execute_script(
                "document.querySelector('#rows .models').scrollIntoView({block: 'center'})")
            driver.save_screenshot(str(out / "review-serve-test-rows.png"))
    print(f"wrote {out / 'review-serve.png'} and {out / 'review-serve-test-rows.png'}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs"))
