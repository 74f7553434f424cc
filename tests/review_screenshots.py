"""Screenshots of `tuneline review serve` for the README, taken in Debian's headless Chromium over
the repository's own data (questions, corrections, imports, generated answers where pulled) and
its committed reports, with the validate stage re-run for its findings:

    python -m tests.review_screenshots docs/ [data/generated/answers.jsonl from a repro]
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

from tests.browser import chromium
from tests.review_project import REPO, curate_now, served


def project(root: Path, answers: Path | None) -> Path:
    shutil.copytree(REPO / "data", root / "data", ignore=shutil.ignore_patterns("dataset"))
    if answers is not None:
        (root / "data/generated").mkdir(exist_ok=True)
        shutil.copy(answers, root / "data/generated/answers.jsonl")
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    (root / "reports").mkdir()
    shutil.copy(REPO / "reports/eval.json", root / "reports/eval.json")
    curate_now(root)
    subprocess.run([sys.executable, "-m", "pipeline", "validate", "data/dataset", "--report",
                    "reports/validation.json"], cwd=root, check=False,
                   env={**os.environ, "PYTHONPATH": str(REPO)})
    return root


def settle(driver) -> None:
    time.sleep(0.8)  # the debounced search and the fetch after it


def main(out: Path, answers: Path | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = project(Path(tmp) / "proj", answers)
        with served(root) as url, chromium(Path(tmp), width=1100, height=820) as driver:
            driver.get(url + "/")
            settle(driver)
            if answers is not None:
                Select(driver.find_element(By.ID, "f-source")).select_by_value("generated")
                settle(driver)
            answer = driver.find_elements(By.CSS_SELECTOR, "#rows .f-answer")[0]
            answer.send_keys(" (an expert is fixing this answer)")
            review = driver.find_elements(By.CSS_SELECTOR, "#rows button.review")[1]
            driver.execute_script("arguments[0].click(); window.scrollTo(0, 0)", review)
            driver.save_screenshot(str(out / "review-serve.png"))
            Select(driver.find_element(By.ID, "f-source")).select_by_value("")
            Select(driver.find_element(By.ID, "f-split")).select_by_value("test")
            settle(driver)
            driver.execute_script(
                "const m = document.querySelector('#rows .models').closest('.card');"
                "window.scrollTo(0, m.getBoundingClientRect().top + window.scrollY - 110)")
            driver.save_screenshot(str(out / "review-serve-test-rows.png"))
    print(f"wrote {out / 'review-serve.png'} and {out / 'review-serve-test-rows.png'}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs"),
         Path(sys.argv[2]) if len(sys.argv) > 2 else None)
