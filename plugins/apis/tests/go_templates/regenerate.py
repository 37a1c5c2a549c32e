"""Writes golden.json: Ollama-style chat templates rendered by Go's text/template.

Run `python plugins/apis/tests/go_templates/regenerate.py` with Go installed after
changing `cases.py`; the tests compare dmr's Jinja translation against this file.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from cases import CONVERSATIONS, TEMPLATES, TOOLS  # noqa: E402


def main() -> None:
    cases = [
        {
            "name": name,
            "conversation": index,
            "template": template,
            "messages": messages,
            "tools": tools,
        }
        for name, template in TEMPLATES.items()
        for index, messages in enumerate(CONVERSATIONS)
        for tools in (None, TOOLS)
    ]
    with tempfile.TemporaryDirectory() as work:
        shutil.copy(HERE / "ollama_render.go", Path(work) / "main.go")
        (Path(work) / "go.mod").write_text("module render\ngo 1.19\n")
        subprocess.run(["go", "build", "-o", "render", "."], cwd=work, check=True)
        rendered = subprocess.run(
            [str(Path(work) / "render")],
            input=json.dumps(cases),
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    for case, expected in zip(cases, json.loads(rendered), strict=True):
        if expected.startswith("ERROR"):
            raise SystemExit(f"{case['name']}: {expected}")
        case["expected"] = expected
    (HERE / "golden.json").write_text(json.dumps(cases, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {len(cases)} cases")


if __name__ == "__main__":
    main()
