"""``import cpt`` is light: what it loads, checked in a fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("peft", "accelerate", "transformers.trainer", "transformers.modeling_utils", "transformers.integrations")

_SCRIPT = """
import json, sys
import cpt
after_import = sorted(sys.modules)
from cpt import CPTModel, classify, fit, load_model_and_tokenizer
print(json.dumps([after_import, sorted(sys.modules)]))
"""


def _loaded(modules: list[str], prefix: str) -> list[str]:
    return [m for m in modules if m == prefix or m.startswith(prefix + ".")]


def test_import_cpt_loads_only_cpt_and_names_load_on_use() -> None:
    result = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    after_import, after_names = json.loads(result.stdout.strip().splitlines()[-1])

    assert [m for m in after_import if m.split(".")[0] == "cpt"] == ["cpt"]
    for heavy in (*HEAVY, "torch", "transformers"):
        assert _loaded(after_import, heavy) == [], heavy

    assert {"cpt.model", "cpt.infer", "cpt.workflow", "cpt.pretrained"} <= set(after_names)
    for heavy in ("peft", "transformers.trainer", "transformers.trainer_callback", "cpt.callback"):
        assert _loaded(after_names, heavy) == [], heavy


def test_every_public_name_resolves() -> None:
    import cpt
    import cpt.callback

    for name in cpt.__all__:
        value = getattr(cpt, name)
        assert name == "CODES_PER_EXAMPLE" or value.__name__ == name
    assert set(cpt.__all__) <= set(dir(cpt))
    assert cpt.CPTProjectionCallback is cpt.callback.CPTProjectionCallback
